"""Rate limits: which buckets a session stage touches, and the reply when one is full.

The flow is ``RateLimiter`` (this module, policy: rules, keys, overrides, replies) over a
``LimitStore`` (mechanism: ``ratelimit_local.LocalStore`` in this process, or
``ratelimit_redis.RedisStore`` shared by every node).  Three kinds of bucket:

- **rates** (messages, recipients, bytes; the outbound message rate): GCRA, the
  "generic cell rate algorithm".  A rule of ``limit`` per ``window`` lets a client spend
  the whole ``limit`` at once, then one unit per ``window/limit`` seconds; so "100 per
  hour" never allows more than 100 in any hour, and the refusal can say exactly when the
  next unit is free.  Several buckets are checked all-or-nothing: a refused message
  charges none of them.  A cost above the whole allowance (a 20 MB message against
  "10 MB per hour") is charged as the whole allowance, so it passes once the bucket is
  empty instead of never.
- **leases** (concurrent connections; outbound connections): a set of holders per key,
  each with an expiry that the holder refreshes, so a node that dies leaks nothing for
  longer than ``LEASE_TTL``.
- **failure logs** (AUTH failures per client IP): the exact sliding window of
  ``auth.AuthThrottle``.

Stages: connect (connections), MAIL (messages; bytes when ``SIZE=`` is given), RCPT
(recipients), end of DATA (bytes when no ``SIZE=`` was given).  A refusal is a 4xx with
an enhanced code and a sentence a person can act on; never a 5xx.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.config import RateLimitSection, RateRuleSection
from gateway.reply import Reply

log = Logger(namespace="gateway.ratelimit")

LEASE_TTL = 60.0  # a lease not refreshed for this long is gone (a crashed node's)
LEASE_REFRESH = LEASE_TTL / 3


class LimiterUnavailable(Exception):
    """The shared store cannot answer and ``fail_mode = "fail_closed"``."""


@dataclass(frozen=True)
class Bucket:
    """One GCRA bucket: ``limit`` units per ``window`` seconds; ``cost`` units wanted."""

    name: str  # the store key, without the prefix
    limit: float
    window: float
    cost: float


@dataclass(frozen=True)
class Slot:
    """One lease set: at most ``limit`` holders of ``name`` at once."""

    name: str
    limit: int


@dataclass(frozen=True)
class RateAnswer:
    """A store's answer: ``refused`` is the index of the bucket (or slot) that said no."""

    refused: int | None = None
    retry_after: float = 0.0


class LimitStore(Protocol):
    """The mechanism.  Every method answers in bounded time (the Redis store puts a
    deadline on each call) and fails only with ``LimiterUnavailable``."""

    def take(self, buckets: Sequence[Bucket]) -> Deferred[RateAnswer]:
        """Charge every bucket its cost, or none of them."""

    def acquire(self, slots: Sequence[Slot], holder: str) -> Deferred[RateAnswer]:
        """Hold a place in every slot, or in none."""

    def release(self, slots: Sequence[Slot], holder: str) -> Deferred[None]: ...

    def refresh(self, leases: Sequence[tuple[Sequence[Slot], str]]) -> Deferred[None]:
        """Extend the expiry of the leases this process holds."""

    def add_failure(self, name: str, window: float, keep: int) -> Deferred[int]:
        """Record a failure; the failures within ``window`` (at most ``keep``)."""

    def count_failures(self, name: str, window: float) -> Deferred[int]: ...


# --- subjects and rules -------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """The key values of one check; a rule whose key is None here does not apply."""

    ip: str | None = None
    net: str | None = None
    user: str | None = None
    user_class: str | None = None
    sender: str | None = None
    sender_domain: str | None = None
    rcpt_domain: str | None = None

    def value(self, key: str) -> str | None:
        return getattr(self, key)


_KEY_WORDS = {"user": "user", "ip": "address", "net": "network", "sender": "sender",
              "sender_domain": "sender domain", "rcpt_domain": "recipient domain"}
_DIMENSION_VERBS = {"messages": "send {n} messages", "recipients": "send to {n} recipients",
                    "bytes": "send {n} bytes", "connections": "open {n} connections at once"}


def network_of(ip: str, v4_prefix: int, v6_prefix: int) -> str | None:
    """The client's /24 (IPv4) or /64 (IPv6) by default, as ``192.0.2.0/24``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def window_text(seconds: float) -> str:
    named = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}
    if seconds in named:
        return f"per {named[seconds]}"
    for unit, word in ((86400, "days"), (3600, "hours"), (60, "minutes")):
        if seconds % unit == 0:
            return f"per {int(seconds // unit)} {word}"
    return f"per {seconds:g} seconds"


def rate_refusal(rule: RateRuleSection, limit: int, value: str, retry_after: float) -> Reply:
    """``451 4.7.1 rate limit: user alice may send 100 messages per hour; try again in 37 s``."""
    verb = _DIMENSION_VERBS[rule.dimension].format(n=limit)
    wait = max(1, math.ceil(retry_after))
    return Reply(451, "4.7.1", f"rate limit: {_KEY_WORDS[rule.key]} {value} may {verb}"
                               f" {window_text(rule.window or 0)}; try again in {wait} s")


def connection_refusal(rule: RateRuleSection, value: str) -> Reply:
    verb = _DIMENSION_VERBS["connections"].format(n=rule.limit)
    return Reply(421, "4.7.0", f"rate limit: {_KEY_WORDS[rule.key]} {value} may {verb};"
                               " try again later", disconnect=True)


RATE_LIMIT_UNAVAILABLE = Reply(451, "4.7.1", "rate limit service unavailable; try again later")
CONNECT_LIMIT_UNAVAILABLE = Reply(421, "4.7.0", "rate limit service unavailable; try again"
                                             " later", disconnect=True)


@dataclass(frozen=True)
class Refusal:
    reply: Reply
    reason: str  # for the mail log


@dataclass
class Lease:
    """Places held in some slots until ``release()``; released once, whatever happens."""

    slots: tuple[Slot, ...]
    holder: str
    limiter: RateLimiter | None = field(default=None, repr=False)

    def release(self) -> None:
        limiter, self.limiter = self.limiter, None
        if limiter is not None:
            limiter._release(self)


@dataclass(frozen=True)
class Permit:
    """The outbound gate's answer: go (and ``release`` after), or wait ``retry_after``."""

    granted: bool
    retry_after: float = 0.0
    lease: Lease | None = None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


class RateLimiter(service.Service):
    """The policy half: rules and overrides from ``[ratelimit]`` over a ``LimitStore``."""

    name = "ratelimit"

    def __init__(self, section: RateLimitSection, store: LimitStore, clock: IReactorTime,
                 node: str = "") -> None:
        self.store = store
        self.clock = clock
        self.node = node or _node_id()
        self._seq = 0
        self._leases: dict[str, Lease] = {}
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = clock
        self.stats = {"checks": 0, "refused": 0, "unavailable": 0}
        self.hits: Counter[tuple[str, str]] = Counter()  # (dimension, key) -> refusals
        self.reconfigure(section)

    def reconfigure(self, section: RateLimitSection) -> None:
        """New rules and overrides (a reload); the store and the leases held stay."""
        self.section = section
        self._rules = {stage: [r for r in section.rules if r.dimension in dims]
                       for stage, dims in (("connect", {"connections"}),
                                           ("mail", {"messages", "bytes"}),
                                           ("rcpt", {"recipients"}),
                                           ("data", {"bytes"}))}

    def startService(self) -> None:
        super().startService()
        self._refresher.start(LEASE_REFRESH, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._refresher.running:
            self._refresher.stop()
        for lease in list(self._leases.values()):
            lease.release()
        stop = getattr(self.store, "stop", None)
        return defer.maybeDeferred(stop) if stop else defer.succeed(None)

    def subject(self, ip: str, principal: Any = None, sender: Any = None,
                recipient: Any = None) -> Subject:
        """The key values for a session stage (addresses are ``envelope.Address``)."""
        user = user_class = None
        if principal is not None and principal.authenticated:
            user = principal.name
            cls = principal.attributes.get("class")
            user_class = cls if isinstance(cls, str) else None
        s = self.section
        return Subject(
            ip=ip or None, net=network_of(ip, s.ipv4_prefix, s.ipv6_prefix), user=user,
            user_class=user_class,
            sender=str(sender).lower() if sender is not None and not sender.is_null else None,
            sender_domain=sender.domain.lower() if sender is not None and sender.domain else None,
            rcpt_domain=recipient.domain.lower() if recipient is not None else None)

    # --- the stages ---------------------------------------------------------------------
    def connect(self, subject: Subject) -> Deferred[Lease | Refusal]:
        """Connect: a place in each ``connections`` rule; ``Lease.release()`` on close."""
        picked = [(r, subject.value(r.key)) for r in self._rules["connect"]]
        picked = [(r, v) for r, v in picked if v is not None]
        slots = tuple(Slot(f"conn:{r.key}:{v}", r.limit) for r, v in picked)
        if not slots:
            return defer.succeed(Lease((), "", None))
        holder = self._holder()

        def decided(answer: RateAnswer) -> Lease | Refusal:
            if answer.refused is not None:
                self.stats["refused"] += 1
                rule, value = picked[answer.refused]
                self.hits[(rule.dimension, rule.key)] += 1
                return Refusal(connection_refusal(rule, value),
                               f"{rule.limit} connections per {rule.key} {value}")
            lease = Lease(slots, holder, self)
            self._leases[holder] = lease
            return lease

        d = self.store.acquire(slots, holder).addCallback(decided)
        return d.addErrback(self._unavailable, CONNECT_LIMIT_UNAVAILABLE)

    def mail(self, subject: Subject, size: int | None) -> Deferred[Refusal | None]:
        """MAIL: one message; and ``size`` bytes when the client declared ``SIZE=``."""
        costs = {"messages": 1, "bytes": size}
        return self._take("mail", subject, lambda rule: costs.get(rule.dimension))

    def rcpt(self, subject: Subject) -> Deferred[Refusal | None]:
        return self._take("rcpt", subject, lambda rule: 1)

    def data(self, subject: Subject, size: int) -> Deferred[Refusal | None]:
        """End of DATA: the bytes of a message whose MAIL had no ``SIZE=``."""
        return self._take("data", subject, lambda rule: size)

    def outbound(self) -> Deferred[Permit]:
        """May this node open one more smarthost delivery now?  Shared by all nodes."""
        s = self.section
        slots = (Slot("out:connections", s.outbound_connections),) \
            if s.outbound_connections else ()
        holder = self._holder()
        rate = s.outbound_messages_per_second

        def leased(answer: RateAnswer) -> Deferred[Permit] | Permit:
            if answer.refused is not None:
                return Permit(False, 1.0)
            lease = Lease(slots, holder, self)
            self._leases[holder] = lease
            if not rate:
                return Permit(True, lease=lease)
            d = self.store.take([Bucket("out:messages", rate, 1.0, 1)])
            return d.addCallback(rated, lease).addErrback(give_back, lease)

        def rated(answer: RateAnswer, lease: Lease) -> Permit:
            if answer.refused is not None:
                lease.release()  # the connection place goes back; the rate charged nothing
                return Permit(False, answer.retry_after)
            return Permit(True, lease=lease)

        def give_back(failure: Any, lease: Lease) -> Any:
            lease.release()
            return failure

        def unavailable(failure: Any) -> Permit:
            failure.trap(LimiterUnavailable)
            self.stats["unavailable"] += 1
            return Permit(False, 5.0)

        d = self.store.acquire(slots, holder) if slots else defer.succeed(RateAnswer())
        return d.addCallback(leased).addErrback(unavailable)

    # --- internals ----------------------------------------------------------------------
    def limit_for(self, rule: RateRuleSection, subject: Subject) -> int:
        """The rule's limit, or the user's (else their class's) override of it."""
        if rule.key != "user":
            return rule.limit
        best = None
        for o in self.section.overrides:
            if o.dimension != rule.dimension or o.window != rule.window:
                continue
            if o.user is not None and o.user == subject.user:
                return o.limit
            if o.user_class is not None and o.user_class == subject.user_class:
                best = o.limit
        return rule.limit if best is None else best

    def _take(self, stage: str, subject: Subject,
              cost_of: Callable[[RateRuleSection], int | None]) -> Deferred[Refusal | None]:
        picked = []
        for rule in self._rules[stage]:
            value, cost = subject.value(rule.key), cost_of(rule)
            if value is None or cost is None:
                continue
            limit = self.limit_for(rule, subject)
            assert rule.window is not None
            picked.append((rule, value, limit, Bucket(
                f"{rule.dimension}:{rule.key}:{value}:{rule.window:g}", limit, rule.window,
                min(cost, limit))))
        if not picked:
            return defer.succeed(None)
        self.stats["checks"] += 1

        def decided(answer: RateAnswer) -> Refusal | None:
            if answer.refused is None:
                return None
            self.stats["refused"] += 1
            rule, value, limit, _ = picked[answer.refused]
            self.hits[(rule.dimension, rule.key)] += 1
            reply = rate_refusal(rule, limit, value, answer.retry_after)
            return Refusal(reply, f"{rule.dimension} {limit} {window_text(rule.window or 0)}"
                                  f" for {rule.key} {value}")

        d = self.store.take([p[3] for p in picked]).addCallback(decided)
        return d.addErrback(self._unavailable, RATE_LIMIT_UNAVAILABLE)

    def _unavailable(self, failure: Any, reply: Reply) -> Refusal:
        failure.trap(LimiterUnavailable)
        self.stats["unavailable"] += 1
        return Refusal(reply, "rate limit store unavailable (fail_closed)")

    def _holder(self) -> str:
        self._seq += 1
        return f"{self.node}:{self._seq}"

    def _release(self, lease: Lease) -> None:
        self._leases.pop(lease.holder, None)
        if lease.slots:
            self.store.release(lease.slots, lease.holder).addErrback(
                lambda f: log.info("lease release failed (it expires by itself): {e}",
                                   e=f.getErrorMessage()))

    def _refresh(self) -> Deferred[None] | None:
        leases = [(lease.slots, lease.holder) for lease in self._leases.values() if lease.slots]
        if not leases:
            return None
        d = self.store.refresh(leases)
        d.addErrback(lambda f: log.info("lease refresh failed: {e}", e=f.getErrorMessage()))
        return d


def _node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
