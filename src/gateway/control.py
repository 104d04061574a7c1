"""The control socket: how ``itpison-gateway queue ...`` talks to a running gateway.

A UNIX socket ``<state_dir>/control.sock``, mode 0600 (only the gateway's user, and
root, may connect), with a pid lock beside it so a second gateway on the same state dir
cannot steal it.  Protocol: one JSON object per line each way::

    > {"command": "hold", "ids": ["0A1B..."]}
    < {"ok": true, "result": {"0A1B...": "held"}}
    < {"ok": false, "error": "unknown command 'x'"}

Why a socket and not spool-level locking: every change to a queued message then goes
through the scheduler that owns it (``Scheduler.hold/release/delete/bounce/flush``),
which suspends the message's scheduling and waits for an attempt in flight before
touching its files, so an admin command never races a delivery.  Read-only commands
(summary, list, show) read the spool here too (in the spool's thread pool), and only
the gateway knows which messages are ``active``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.threadpool import ThreadPool

from gateway import queueview
from gateway.scheduler import Scheduler
from gateway.spool import NoSuchMessage, _checked

log = Logger(namespace="gateway.control")

MAX_REQUEST = 1024 * 1024
MUTATIONS = ("flush", "hold", "release", "delete", "bounce")
READERS = ("summary", "list", "show")


class ControlError(Exception):
    """A request that cannot be served; the text goes back to the client."""


class QueueControl:
    """The commands, as coroutines returning JSON-able results."""

    def __init__(self, scheduler: Scheduler, spool_root: Path, reactor: Any,
                 threadpool: ThreadPool,
                 extra: Mapping[str, Callable[[dict[str, Any]], Awaitable[Any]]] | None = None
                 ) -> None:
        self.scheduler = scheduler
        self.extra = dict(extra or {})  # more commands (a worker's, for its supervisor)
        self.root = spool_root
        self.reactor = reactor
        self.pool = threadpool

    async def run(self, request: Any) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ControlError('a request is a JSON object with a "command"')
        command = request["command"]
        ids = request.get("ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ControlError('"ids" must be a list of queue ids')
        for qid in ids:
            try:
                _checked(qid)
            except ValueError:
                raise ControlError(f"bad queue id {qid!r}") from None
        if command in READERS:
            return await self._read(command, ids, request.get("filters") or {})
        if command in MUTATIONS:
            if command != "flush" and not ids:
                raise ControlError(f"{command} needs at least one queue id")
            return await self._mutate(command, ids)
        if command in self.extra:
            return await self.extra[command](request)
        raise ControlError(f"unknown command {command!r}")

    async def _in_flight(self) -> frozenset[str]:
        """The messages being delivered now (they show as ``active``)."""
        return self.scheduler.in_flight

    async def _read(self, command: str, ids: list[str], filters: dict[str, Any]) -> Any:
        in_flight = await self._in_flight()
        now = self.reactor.seconds()
        if command == "show":
            if len(ids) != 1:
                raise ControlError("show takes exactly one queue id")
            entry = await self._thread(queueview.load_entry, self.root, ids[0], in_flight)
            if entry is None:
                raise ControlError(f"{ids[0]}: no such message")
            return entry.to_json(now, detail=True)
        items = await self._thread(queueview.entries, self.root, in_flight)
        if command == "summary":
            return queueview.summary(items, now)
        wanted = {k: filters.get(k) for k in ("state", "user", "sender", "recipient")}
        return [e.to_json(now) for e in items if e.matches(**wanted)]

    async def _mutate(self, command: str, ids: list[str]) -> dict[str, str]:
        if command == "flush":
            flushed = self.scheduler.flush(ids or None)
            results = {qid: "flushed" for qid in flushed}
            for qid in ids:
                if qid not in results:
                    entry = await self._thread(queueview.load_entry, self.root, qid)
                    results[qid] = ("held: release it first" if entry and entry.state == "hold"
                                    else "in delivery now" if qid in self.scheduler.in_flight
                                    else "no such message")
            return results
        results = {}
        for qid in ids:
            action = getattr(self.scheduler, command)
            try:
                await action(qid)
            except NoSuchMessage:
                results[qid] = "no such message" if command != "release" else "not held"
                continue
            except Exception as e:
                log.failure("queue {command} {queue_id} failed", command=command, queue_id=qid)
                results[qid] = f"failed: {type(e).__name__}"
                continue
            results[qid] = {"hold": "held", "release": "released", "delete": "deleted",
                            "bounce": "bounced"}[command]
            log.info("queue {command} {queue_id} by the administrator", command=command,
                     queue_id=qid, event="admin")
        return results

    def _thread(self, fn: Any, *args: Any) -> Any:
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args)


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, control: QueueControl) -> None:
        self.control = control
        self._busy = False

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        self.transport.pauseProducing()  # one request at a time, answers in order
        try:
            request = json.loads(line)
        except ValueError:
            return self._answer({"ok": False, "error": "not JSON"})
        d = ensureDeferred(self.control.run(request))
        d.addCallbacks(lambda result: self._answer({"ok": True, "result": result}),
                       self._failed)

    def _failed(self, failure: Any) -> None:
        if failure.check(ControlError):
            return self._answer({"ok": False, "error": failure.getErrorMessage()})
        log.failure("control request failed", failure)
        self._answer({"ok": False, "error": "internal error (see the gateway log)"})

    def _answer(self, response: dict[str, Any]) -> None:
        if self.transport is None:
            return
        self.transport.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
        self.transport.resumeProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(b'{"ok":false,"error":"request too long"}\n')
        self.transport.loseConnection()


class ControlService(service.Service):
    """Listens on the control socket while the gateway runs."""

    name = "control"

    def __init__(self, control: QueueControl, path: Path, reactor: Any) -> None:
        self.control = control
        self.path = Path(path)
        self.reactor = reactor
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: ControlProtocol(self.control))
        factory.noisy = False
        self._port = self.reactor.listenUNIX(str(self.path), factory, mode=0o600, wantPID=True)
        log.info("control socket on {path}", path=str(self.path))

    def stopService(self) -> Any:
        super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None
