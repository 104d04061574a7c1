"""The operational sections, ``[service]`` and ``[metrics]``: frozen dataclasses and validation.

Part of :mod:`gateway.config` (which re-exports the classes); kept apart so how the
gateway runs (stop, reload, metrics) reads as one piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import config_values as v
from gateway.config_values import ConfigError, Context


@dataclass(frozen=True)
class ServiceSection:
    """``[service]``: how the process runs, stops and reloads."""

    stop_timeout: float = 30.0  # SIGTERM: sessions in progress get this long, then 421 4.3.2
    certificate_check_interval: float = 60.0  # poll certificate files for renewal; 0: off


@dataclass(frozen=True)
class MetricsSection:
    """``[metrics]``: Prometheus /metrics, /healthz and /readyz on their own listener."""

    endpoint: str | None = None  # e.g. "tcp:9125:interface=127.0.0.1"; None: no listener


_SERVICE_KEYS: dict[str, v.Convert] = {
    "stop_timeout": v.duration, "certificate_check_interval": v.duration}
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
