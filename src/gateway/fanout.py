"""The supervisor's side of the control sockets: one question to one worker, and the
queue commands of ``itpison-gateway queue`` spread over every worker.

The supervisor listens on ``<state_dir>/control.sock`` like a single gateway does, so the
CLI does not know whether workers run.  Each worker answers on
``<state_dir>/workers/<index>.sock`` (gateway.service.worker_socket):

- summary, list, show: read the spool here (it is shared), with ``active`` taken from
  every worker's deliveries in flight;
- hold, release, delete, bounce, flush of given ids: sent to the worker whose queue slots
  hold each id (gateway.ownership.owner_of), which does it through its scheduler;
- flush of everything: sent to every worker, answers merged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.threadpool import ThreadPool

from gateway.control import MAX_REQUEST, ControlError, QueueControl
from gateway.ownership import owner_of
from gateway.service import worker_socket

log = Logger(namespace="gateway.supervisor")
ASK_TIMEOUT = 120.0  # a hold waits for a delivery in flight (bounded by its deadlines)


class WorkerUnavailable(Exception):
    """A worker's control socket did not answer."""


class _Ask(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * MAX_REQUEST  # metrics texts and long lists come back this way

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.answer: defer.Deferred[Any] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(json.dumps(self.request).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(json.loads(line))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self.answer.called:
            self.answer.errback(WorkerUnavailable("answer too long"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.answer.called:
            self.answer.errback(WorkerUnavailable("closed without an answer"))


async def ask(reactor: Any, path: Path, request: dict[str, Any],
              timeout: float = ASK_TIMEOUT) -> Any:
    """``request`` to the control socket at ``path``; its ``result``, or ControlError with
    the worker's error, or WorkerUnavailable."""
    endpoint = UNIXClientEndpoint(reactor, str(path), timeout=min(timeout, 10.0))
    proto = _Ask(request)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: proto))
    except Exception as e:
        raise WorkerUnavailable(f"{path}: {e}") from None
    answer = proto.answer
    answer.addTimeout(timeout, reactor)
    try:
        response = await answer
    except defer.TimeoutError:
        proto.transport.abortConnection()
        raise WorkerUnavailable(f"{path}: no answer within {timeout:g}s") from None
    if not isinstance(response, dict) or not response.get("ok"):
        raise ControlError(str(response.get("error") if isinstance(response, dict)
                               else "bad answer"))
    return response.get("result")


async def ask_all(reactor: Any, state_dir: Path, count: int, request: dict[str, Any],
                  timeout: float = ASK_TIMEOUT) -> dict[int, Any]:
    """``{index: result or the exception}`` from every worker."""
    async def one(index: int) -> Any:
        try:
            return await ask(reactor, worker_socket(state_dir, index), request, timeout)
        except (WorkerUnavailable, ControlError) as e:
            return e

    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(one(i)) for i in range(count)])
    return dict(enumerate(results))


class FanoutControl(QueueControl):
    """QueueControl for a supervisor: reads here, changes by the owning worker."""

    def __init__(self, state_dir: Path, count: int, reactor: Any,
                 threadpool: ThreadPool) -> None:
        super().__init__(None, state_dir / "spool", reactor, threadpool)  # type: ignore[arg-type]
        self.state_dir = state_dir
        self.count = count

    async def _in_flight(self) -> frozenset[str]:
        answers = await ask_all(self.reactor, self.state_dir, self.count,
                                {"command": "in_flight"}, timeout=10.0)
        active: set[str] = set()
        for index, answer in answers.items():
            if isinstance(answer, Exception):
                log.warn("worker {index} did not say what it delivers: {error}",
                         index=index, error=str(answer))
                continue
            active.update(answer)
        return frozenset(active)

    async def _mutate(self, command: str, ids: list[str]) -> dict[str, str]:
        if not ids:  # flush everything: every worker its own
            answers = await ask_all(self.reactor, self.state_dir, self.count,
                                    {"command": command, "ids": []})
            merged: dict[str, str] = {}
            for index, answer in sorted(answers.items()):
                if isinstance(answer, Exception):
                    raise ControlError(f"worker {index}: {answer}")
                merged.update(answer)
            return merged
        groups: dict[int, list[str]] = {}
        for qid in ids:
            groups.setdefault(owner_of(qid, self.count), []).append(qid)

        async def one(index: int, group: list[str]) -> dict[str, str]:
            try:
                return await ask(self.reactor, worker_socket(self.state_dir, index),
                                 {"command": command, "ids": group})
            except (WorkerUnavailable, ControlError) as e:
                return {qid: f"failed: worker {index} is not answering ({e})" for qid in group}

        results = await defer.gatherResults([defer.Deferred.fromCoroutine(one(i, g))
                                             for i, g in sorted(groups.items())])
        merged = {}
        for result in results:
            merged.update(result)
        return {qid: merged[qid] for qid in ids}
