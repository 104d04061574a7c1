"""The operations HTTP listener: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

Served by twisted.web on ``[metrics] endpoint``, apart from the SMTP listeners, plain HTTP
and meant for localhost or a monitoring network (there is no authentication).

- ``/healthz``: 200 while the process and its reactor answer (liveness).
- ``/readyz``: 200 when the gateway should get traffic, else 503 with the reasons, one a
  line: every listener is listening and the gateway is not stopping; the spool accepts a
  file (created, fsync'd and removed in the spool's thread pool); at least one smarthost's
  circuit breaker is not open.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET

from gateway.breaker import State

log = Logger(namespace="gateway.metrics")
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def spool_writable(tmp_dir: str) -> str | None:
    """None when a file can be created and synced in ``tmp_dir``, else the error."""
    path = os.path.join(tmp_dir, f".readyz.{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as e:
        return f"spool not writable: {e.strerror or e}"
    return None


Answer = tuple[int, bytes, bytes]  # status, content type, body


class Page(resource.Resource):
    """A GET page whose answer comes from ``respond(gateway)`` (a Deferred)."""

    isLeaf = True

    def __init__(self, gateway: Any, respond: Callable[[Any], Deferred[Answer]]) -> None:
        super().__init__()
        self.gateway = gateway
        self.respond = respond

    def render_GET(self, request: Any) -> Any:
        d = self.respond(self.gateway)

        def send(result: Answer) -> None:
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("{path}", failure, path=request.path.decode())
            send((500, b"text/plain", b"internal error\n"))

        d.addCallback(send).addErrback(failed)
        return NOT_DONE_YET



def metrics(gw: Any) -> Deferred[Answer]:
    gw.metrics.collector.snapshot()
    d = threads.deferToThreadPool(gw.reactor, gw.spool_pool, gw.metrics.render)
    return d.addCallback(lambda body: (200, CONTENT_TYPE, body))


def health(gw: Any) -> Deferred[Answer]:
    return succeed((200, b"text/plain", b"ok\n"))


@inlineCallbacks
def ready(gw: Any) -> Any:
    problems = []
    if gw.stopping:
        problems.append("stopping")
    elif len(gw.ports) < len(gw.config.listeners):
        problems.append(f"{len(gw.ports)} of {len(gw.config.listeners)} listeners up")
    spool = yield threads.deferToThreadPool(gw.reactor, gw.spool_pool, spool_writable,
                                            str(gw.spool.root / "tmp"))
    if spool is not None:
        problems.append(spool)
    relay = gw.relay
    if all(b.state is State.OPEN for b in relay.breakers):
        problems.append("every smarthost's circuit is open: "
                        + ", ".join(h.address for h in relay.smarthosts))
    if problems:
        return 503, b"text/plain", ("\n".join(problems) + "\n").encode()
    return 200, b"text/plain", b"ready\n"


def worker_commands(gw: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """What a worker's control socket adds for its supervisor, which serves the node's
    /metrics and /readyz and the queue commands from all workers' answers."""

    async def in_flight(request: dict[str, Any]) -> list[str]:
        return sorted(gw.scheduler.in_flight)

    async def metrics_text(request: dict[str, Any]) -> str:
        _, _, body = await metrics(gw)
        return body.decode()

    async def readiness(request: dict[str, Any]) -> dict[str, Any]:
        code, _, body = await ready(gw)
        return {"ready": code == 200, "problems": [] if code == 200
                else body.decode().splitlines()}

    return {"in_flight": in_flight, "metrics": metrics_text, "ready": readiness}


def site(gateway: Any, pages: dict[str, Callable[[Any], Deferred[Answer]]] | None = None
         ) -> server.Site:
    """The operations site: ``pages`` (path -> answer), by default a gateway's own."""
    root = resource.Resource()
    for path, respond in (pages or {"metrics": metrics, "healthz": health,
                                    "readyz": ready}).items():
        root.putChild(path.encode(), Page(gateway, respond))
    web = server.Site(root)
    web.displayTracebacks = False
    web.noisy = False
    return web


class OperationsWebService(service.Service):
    """Listens on ``endpoint`` with the operations site; the port is in ``port``."""

    def __init__(self, gateway: Any, endpoint: str,
                 make_site: Callable[[Any], server.Site] | None = None) -> None:
        self.gateway = gateway
        self.endpoint = endpoint
        self.make_site = make_site or site
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.gateway.reactor, self.endpoint).listen(
            self.make_site(self.gateway))
        result: list[Any] = []
        d.addBoth(result.append)
        if result and isinstance(result[0], Failure):
            result[0].raiseException()
        self.port = result[0] if result else None
        log.info("metrics and health checks on {address}", address=str(self.port.getHost()))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
