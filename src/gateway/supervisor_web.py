"""``/metrics``, ``/healthz`` and ``/readyz`` of a node run by a supervisor.

Prometheus scrapes one address per node, whatever the worker count.  The supervisor asks
every worker for its own exposition text over its control socket, labels each sample
``worker="<index>"`` and serves them as one set of families, with its own:

- the spool census (``queue_messages``, ``queue_oldest_age_seconds``): the spool is
  shared, so it is counted once, here (workers do not count it);
- ``workers`` (configured), ``workers_running``, ``worker_restarts_total``.

``/readyz`` is 200 only when every worker is running and ready by its own checks
(listeners, spool writable, a smarthost not circuit-open); else 503 with one line per
problem, prefixed by the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet import defer, threads
from twisted.web import server

from gateway import webops
from gateway.fanout import ask_all
from gateway.metrics import PREFIX, census_families
from gateway.webops import CONTENT_TYPE, Answer, health

SCRAPE_TIMEOUT = 5.0


def merge(texts: dict[int, str]) -> list[Metric]:
    """One family per name from the workers' exposition texts, each sample labelled with
    its worker.  (Workers leave out the spool census: the supervisor counts it once.)"""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(index)}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp,
                                  sample.exemplar)
    return list(families.values())


class NodeCollector(Collector):
    """What ``collect`` yields is set by ``update`` just before each scrape."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self._families: list[Metric] = []

    def update(self, texts: dict[int, str]) -> None:
        sup = self.supervisor
        own: list[Metric] = [
            GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes configured",
                              value=sup.count),
            GaugeMetricFamily(f"{PREFIX}_workers_running", "Worker processes running",
                              value=sup.running_count()),
            CounterMetricFamily(f"{PREFIX}_worker_restarts", "Workers restarted after they"
                                " died", value=sup.restarts)]
        self._families = own + merge(texts)

    def collect(self) -> Iterator[Metric]:
        yield from census_families(self.supervisor.spool_root)
        yield from self._families


class NodeMetrics:
    def __init__(self, supervisor: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(supervisor)
        self.registry.register(self.collector)


def metrics(sup: Any) -> defer.Deferred[Answer]:
    async def scrape() -> Answer:
        answers = await ask_all(sup.reactor, sup.state_dir, sup.count, {"command": "metrics"},
                                timeout=SCRAPE_TIMEOUT)
        sup.node_metrics.collector.update(
            {i: text for i, text in answers.items() if isinstance(text, str)})
        body = await threads.deferToThreadPool(sup.reactor, sup.pool, generate_latest,
                                               sup.node_metrics.registry)
        return 200, CONTENT_TYPE, body

    return defer.Deferred.fromCoroutine(scrape())


def ready(sup: Any) -> defer.Deferred[Answer]:
    async def check() -> Answer:
        problems = []
        if sup.stopping:
            problems.append("stopping")
        answers = await ask_all(sup.reactor, sup.state_dir, sup.count, {"command": "ready"},
                                timeout=SCRAPE_TIMEOUT)
        for index, answer in sorted(answers.items()):
            if isinstance(answer, Exception):
                problems.append(f"worker {index}: not running or not answering")
            elif not answer.get("ready"):
                problems += [f"worker {index}: {p}" for p in answer.get("problems", [])]
        if problems:
            return 503, b"text/plain", ("\n".join(problems) + "\n").encode()
        return 200, b"text/plain", b"ready\n"

    return defer.Deferred.fromCoroutine(check())


def site(supervisor: Any) -> server.Site:
    return webops.site(supervisor, {"metrics": metrics, "healthz": health, "readyz": ready})
