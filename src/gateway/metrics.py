"""Prometheus metrics: counters fed by the typed mail log, gauges read at scrape time.

Two sources, so no stage of the mail flow knows about Prometheus:

- ``MailLogMetrics`` is a twisted.logger observer.  Every ``gateway.maillog`` event
  (``event=connect``, ``queued``, ``attempt``, ``delivered`` …) already carries the facts a
  counter needs; the observer turns them into counters and histograms.
- ``GatewayCollector`` reads the live state when Prometheus scrapes: queue sizes and oldest
  age per state (from the spool directories), circuit breaker state and pooled
  connections per smarthost, rate-limit hits, the Redis store's health, open sessions.

Each gateway has its own ``CollectorRegistry`` (never the process-global one), so tests
and several services in one process do not share numbers.  ``render()`` reads the spool
directories, so the web layer calls it in a thread pool, not on the reactor thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver
from zope.interface import implementer

from gateway.breaker import State

PREFIX = "itpison_gateway"
QUEUE_STATES = ("queue", "hold", "corrupt")
ACCEPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELIVERY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


def _reply_code(reply: str) -> str:
    """``"550 5.7.1 text"`` → ``"550 5.7.1"``: the label, never the free text."""
    parts = str(reply).split()
    code = parts[0] if parts and parts[0].isdigit() else "other"
    if len(parts) > 1 and parts[1][:1].isdigit() and parts[1].count(".") == 2:
        return f"{code} {parts[1]}"
    return code


@implementer(ILogObserver)
class MailLogMetrics:
    """Counters and histograms from mail-log events; ``auth_backend`` labels AUTH results."""

    def __init__(self, registry: CollectorRegistry, auth_backend: str) -> None:
        self.auth_backend = auth_backend
        self.connections = Counter(f"{PREFIX}_connections", "Accepted SMTP connections",
                                   ["listener"], registry=registry)
        self.auth = Counter(f"{PREFIX}_auth", "AUTH attempts by backend and outcome",
                            ["backend", "mechanism", "outcome"], registry=registry)
        self.accepted = Counter(f"{PREFIX}_messages_accepted", "Messages accepted (250 after"
                                " fsync)", registry=registry)
        self.refused = Counter(f"{PREFIX}_refused", "Refusals by stage and reply code",
                               ["stage", "code"], registry=registry)
        self.received_bytes = Counter(f"{PREFIX}_received_bytes", "Bytes of accepted messages",
                                      registry=registry)
        self.accept_latency = Histogram(f"{PREFIX}_accept_latency_seconds", "End of DATA to"
                                        " the 250 reply (checks, spool write, fsync)",
                                        buckets=ACCEPT_BUCKETS, registry=registry)
        self.attempts = Counter(f"{PREFIX}_delivery_attempts", "Delivery attempts per"
                                " recipient by smarthost and outcome",
                                ["smarthost", "outcome"], registry=registry)
        self.deliveries = Counter(f"{PREFIX}_deliveries", "Final or deferred outcomes per"
                                  " recipient by smarthost", ["smarthost", "outcome"],
                                  registry=registry)
        self.delivery_latency = Histogram(f"{PREFIX}_delivery_latency_seconds", "Queued to"
                                          " delivered, per recipient",
                                          buckets=DELIVERY_BUCKETS, registry=registry)
        self.proxy_refused = Counter(f"{PREFIX}_proxy_refused", "Connections refused by the"
                                     " PROXY protocol check", ["reason"], registry=registry)
        self.reloads = Counter(f"{PREFIX}_reloads", "Configuration and certificate reloads",
                               ["what", "result"], registry=registry)

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if not isinstance(name, str):
            return
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            try:
                handler(event)
            except (KeyError, TypeError, ValueError):
                pass  # a malformed event must not break logging

    def _on_connect(self, e: dict[str, Any]) -> None:
        self.connections.labels(e["listener"]).inc()

    def _on_auth_ok(self, e: dict[str, Any]) -> None:
        # Success names the backend that said yes; a failure is the whole chain's answer.
        backend = e.get("backend")
        self.auth.labels(backend if backend and backend != "-" else self.auth_backend,
                         e["mechanism"], "ok").inc()

    def _on_auth_failed(self, e: dict[str, Any]) -> None:
        outcome = "unavailable" if "unavailable" in str(e.get("reason")) else "failed"
        self.auth.labels(self.auth_backend, e["mechanism"], outcome).inc()

    def _on_rejected(self, e: dict[str, Any]) -> None:
        self.refused.labels(str(e["stage"]), _reply_code(e["reply"])).inc()

    def _on_queued(self, e: dict[str, Any]) -> None:
        if e.get("session") == "-":
            return  # a DSN the gateway generated itself, not a client's message
        self.accepted.inc()
        self.received_bytes.inc(int(e["size"]))
        if e.get("latency") is not None:
            self.accept_latency.observe(float(e["latency"]))

    def _on_attempt(self, e: dict[str, Any]) -> None:
        self.attempts.labels(e["host"], e["outcome"]).inc()

    def _on_delivered(self, e: dict[str, Any]) -> None:
        self.deliveries.labels(e["host"], "delivered").inc()
        self.delivery_latency.observe(float(e["delay"]))

    def _on_deferred(self, e: dict[str, Any]) -> None:
        self.deliveries.labels(e["host"], "deferred").inc()

    def _on_bounced(self, e: dict[str, Any]) -> None:
        self.deliveries.labels(e["host"], "bounced").inc()

    def _on_proxy_refused(self, e: dict[str, Any]) -> None:
        self.proxy_refused.labels("untrusted_peer").inc()

    def _on_proxy_invalid(self, e: dict[str, Any]) -> None:
        self.proxy_refused.labels("bad_header").inc()

    def _on_reload(self, e: dict[str, Any]) -> None:
        self.reloads.labels("config", e["result"]).inc()

    def _on_tls_reloaded(self, e: dict[str, Any]) -> None:
        self.reloads.labels("certificate", "ok").inc()

    def _on_tls_reload_failed(self, e: dict[str, Any]) -> None:
        self.reloads.labels("certificate", "failed").inc()


def queue_census(spool_root: Path, now: float | None = None
                 ) -> dict[str, tuple[int, float]]:
    """``{state: (messages, oldest age in seconds)}`` from the spool directories."""
    now = time.time() if now is None else now
    out: dict[str, tuple[int, float]] = {}
    for state in QUEUE_STATES:
        count, oldest = 0, now
        try:
            with os.scandir(spool_root / state) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        mtime = entry.stat().st_mtime
                    except OSError:
                        continue  # delivered and removed while we looked
                    count += 1
                    oldest = min(oldest, mtime)
        except OSError:
            pass
        out[state] = (count, max(0.0, now - oldest) if count else 0.0)
    return out


def census_families(spool_root: Path) -> list[GaugeMetricFamily]:
    """``queue_messages`` and ``queue_oldest_age_seconds`` by state, read from the spool."""
    size = GaugeMetricFamily(f"{PREFIX}_queue_messages", "Messages in the spool by state",
                             labels=["state"])
    age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest"
                            " message by state", labels=["state"])
    for state, (count, oldest) in queue_census(spool_root).items():
        size.add_metric([state], count)
        age.add_metric([state], oldest)
    return [size, age]


class GatewayCollector(Collector):
    """Gauges of a running ``GatewayService``.  ``snapshot()`` copies the live state on the
    reactor thread (it changes there); ``collect()`` adds the spool census and may run in
    a thread."""

    def __init__(self, gateway: Any, census: bool = True) -> None:
        self.gateway = gateway
        # The spool census: off in a worker, whose supervisor counts the shared spool once.
        self.census = census
        self._live: list[Any] = []

    def snapshot(self) -> None:
        gw = self.gateway
        live: list[Any] = [
            GaugeMetricFamily(f"{PREFIX}_deliveries_in_flight", "Deliveries running now",
                              value=len(gw.scheduler.in_flight)),
            GaugeMetricFamily(f"{PREFIX}_sessions_open", "Open SMTP sessions",
                              value=gw.connections.total)]
        relay = gw.relay
        circuit = GaugeMetricFamily(f"{PREFIX}_smarthost_circuit_state", "1 for the state"
                                    " each smarthost's circuit breaker is in",
                                    labels=["smarthost", "state"])
        trips = CounterMetricFamily(f"{PREFIX}_smarthost_circuit_trips", "Times a smarthost's"
                                    " breaker opened", labels=["smarthost"])
        pool = GaugeMetricFamily(f"{PREFIX}_relay_pool_connections", "Connections to the"
                                 " smarthosts by state", labels=["smarthost", "state"])
        for index, (host, breaker) in enumerate(zip(relay.smarthosts, relay.breakers,
                                                    strict=True)):
            current = breaker.state
            for state in State:
                circuit.add_metric([host.address, state.value], 1.0 if current is state else 0.0)
            trips.add_metric([host.address], breaker.trips)
            open_ = relay.pool.open_connections(index)
            idle = relay.pool.idle_connections(index)
            pool.add_metric([host.address, "idle"], idle)
            pool.add_metric([host.address, "busy"], max(0, open_ - idle))
        live += [circuit, trips, pool]
        hits = CounterMetricFamily(f"{PREFIX}_ratelimit_hits", "Rate-limit refusals by"
                                   " dimension and key type", labels=["dimension", "key"])
        for (dimension, key), count in sorted(getattr(gw.limiter, "hits", {}).items()):
            hits.add_metric([dimension, key], count)
        live.append(hits)
        store = gw.limiter.store
        if hasattr(store, "up"):
            live.append(GaugeMetricFamily(f"{PREFIX}_redis_up", "1 while the shared Redis"
                                          " rate-limit store answers",
                                          value=1.0 if store.up else 0.0))
        self._live = live

    def collect(self) -> Iterator[Any]:
        if self.census:
            yield from census_families(self.gateway.spool.root)
        yield from self._live


class GatewayMetrics:
    """The registry of one gateway: the mail-log observer plus the live collector."""

    def __init__(self, gateway: Any, auth_backend: str, census: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.observer = MailLogMetrics(self.registry, auth_backend)
        self.collector = GatewayCollector(gateway, census)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The text exposition format.  Call ``collector.snapshot()`` on the reactor thread
        first; this reads the spool directories, so run it in a thread pool."""
        return generate_latest(self.registry)
