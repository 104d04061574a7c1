"""The operational sections, ``[service]`` and ``[metrics]``: frozen dataclasses and validation.

Part of :mod:`gateway.config` (which re-exports the classes); kept apart so how the
gateway runs (stop, reload, metrics) reads as one piece.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from gateway import config_values as v
from gateway.config_values import ConfigError, Context


@dataclass(frozen=True)
class ServiceSection:
    """``[service]``: how the process runs, stops and reloads."""

    stop_timeout: float = 30.0  # SIGTERM: sessions in progress get this long, then 421 4.3.2
    certificate_check_interval: float = 60.0  # poll certificate files for renewal; 0: off
    # Processes serving the listeners and the spool together (gateway.supervisor); "auto"
    # in the file means one per CPU core this process may run on.  1: no supervisor.
    workers: int = 1


@dataclass(frozen=True)
class MetricsSection:
    """``[metrics]``: Prometheus /metrics, /healthz and /readyz on their own listener."""

    endpoint: str | None = None  # e.g. "tcp:9125:interface=127.0.0.1"; None: no listener


MAX_WORKERS = 64  # gateway.ownership.SLOTS: every worker owns at least one queue slot


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity mask, as systemd's CPUAffinity=
    and containers set it), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers(value: Any, path: str, ctx: Context) -> int:
    if value == "auto":
        return max(1, min(MAX_WORKERS, cpu_count()))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(path, f'must be 1..{MAX_WORKERS} or "auto" (one per CPU core)')
    return value


_SERVICE_KEYS: dict[str, v.Convert] = {
    "stop_timeout": v.duration, "certificate_check_interval": v.duration, "workers": workers}
_METRICS_KEYS: dict[str, v.Convert] = {"endpoint": v.endpoint}

Table = Callable[[Any, str, Any, Context], dict[str, Any]]


def parse_service(raw: Any, ctx: Context, table: Table) -> ServiceSection:
    return ServiceSection(**table(raw, "service", _SERVICE_KEYS, ctx))


def parse_metrics(raw: Any, ctx: Context, table: Table) -> MetricsSection:
    values = table(raw, "metrics", _METRICS_KEYS, ctx)
    endpoint = values.get("endpoint")
    if endpoint is not None and not endpoint.startswith(("tcp", "unix", "systemd")):
        raise ConfigError("metrics.endpoint", 'serve metrics over plain HTTP, e.g.'
                                              ' "tcp:9125:interface=127.0.0.1"')
    return MetricsSection(**values)


def worker_share(config: Any) -> Any:
    """The configuration one of ``config.service.workers`` processes runs with: the caps
    that each process enforces alone (connections, deliveries in flight, pooled smarthost
    connections, the local outbound message rate) are split between the workers, so the
    node as a whole keeps the configured numbers.  Rate limits and the cross-node outbound
    caps are shared through Redis and need no split (see ``check_workers``)."""
    n = config.service.workers
    if n == 1:
        return config

    def share(value: int) -> int:
        return max(1, math.ceil(value / n))

    limits = config.limits
    max_connections = share(limits.max_connections)
    limits = replace(limits, max_connections=max_connections,
                     max_connections_per_ip=min(limits.max_connections_per_ip, max_connections))
    relay = replace(config.relay, max_connections_per_host=share(
        config.relay.max_connections_per_host),
        messages_per_second=config.relay.messages_per_second / n)
    queue = replace(config.queue, concurrency=share(config.queue.concurrency))
    ratelimit = config.ratelimit
    if ratelimit.redis is None:  # the outbound caps then count per process too
        ratelimit = replace(
            ratelimit,
            outbound_messages_per_second=(None if ratelimit.outbound_messages_per_second is None
                                          else ratelimit.outbound_messages_per_second / n),
            outbound_connections=(None if ratelimit.outbound_connections is None
                                  else share(ratelimit.outbound_connections)))
    return replace(config, limits=limits, relay=relay, queue=queue, ratelimit=ratelimit)


def check_workers(service: ServiceSection, ratelimit: Any) -> None:
    """Rate-limit rules must be counted in one place: with several workers, Redis."""
    if service.workers > 1 and ratelimit.rules and ratelimit.redis is None:
        raise ConfigError("service.workers", f"{service.workers} workers would each count the"
                          " [ratelimit] rules alone and let several times the limits"
                          " through: set ratelimit.redis (a local redis-server will do),"
                          " or workers = 1")
