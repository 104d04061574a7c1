"""A circuit breaker per smarthost, and the order in which the hosts are tried.

A host is *closed* (in use) until ``failures`` session failures happen in a row; then it
is *open* (skipped) for ``cooldown`` seconds; then *half-open*: the next delivery may
probe it, one at a time.  A probe that succeeds closes it again (failback: the primary
takes the traffic back by itself); one that fails opens it for another cool-down.

``route`` puts the hosts in the order to try for one delivery: the configured order,
minus the open ones.  When every host is open, all of them in order: mail is never held
back only because the breakers say so.  Only session-level failures (connect, TLS,
greeting, 421, 4xx before RCPT...) count; a host that answers about the *mail* works.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="gateway.breaker")
T = TypeVar("T")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(self, name: str, failures: int, cooldown: float, clock: IReactorTime) -> None:
        self.name = name
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self._state = State.CLOSED
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False
        self.trips = 0  # times it opened (for the metrics issue)

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self.clock.seconds() - self._opened_at >= self.cooldown:
            self._state = State.HALF_OPEN
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """May a delivery use this host now?  In half-open, True once (the probe)."""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and not self._probing:
            self._probing = True
            log.info("smarthost {host} half-open: probing it", host=self.name)
            return True
        return False

    def success(self) -> None:
        if self._state is not State.CLOSED:
            log.info("smarthost {host} is back: using it again", host=self.name)
        self._state, self._failures, self._probing = State.CLOSED, 0, False

    def failure(self) -> None:
        self._failures += 1
        state = self.state
        if state is State.HALF_OPEN or (state is State.CLOSED and self._failures >= self.threshold):
            self._state, self._opened_at, self._probing = State.OPEN, self.clock.seconds(), False
            self.trips += 1
            log.warn("smarthost {host} marked down after {failures} failures in a row; "
                     "skipped for {cooldown:g}s", host=self.name, failures=self._failures,
                     cooldown=self.cooldown)

    def release_probe(self) -> None:
        """A probe that neither succeeded nor failed (e.g. cancelled): let another try."""
        self._probing = False


def route(items: Sequence[T], breakers: Sequence[CircuitBreaker]) -> tuple[list[T], bool]:
    """The items whose breaker is not open, in order, and False; or, when every one is
    open, all the items and True ("forced": try them even though they are down).

    Without ``forced``, check ``allow()`` right before using an item: a half-open host
    admits one probe at a time, and the deliveries meanwhile go on to the next host."""
    candidates = [item for item, breaker in zip(items, breakers, strict=True)
                  if breaker.state is not State.OPEN]
    return (candidates, False) if candidates else (list(items), True)
