"""What a listener's sessions share: settings, the portal, TLS, the sink, and the counters.

The composition root (``service``) builds one ``ListenerContext`` per configured
listener; ``ConnectionCounter`` and ``AuthThrottle`` are shared by all of them, so the
caps hold for the whole process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway import reply as R
from gateway.auth import AuthThrottle
from gateway.config import Config, LimitsSection, ListenerSection
from gateway.envelope import Envelope, new_queue_id
from gateway.optionpolicy import XHeaderPolicy
from gateway.ratelimit import RateLimiter
from gateway.reply import Reply


class MessageSink(Protocol):
    """Where accepted messages go.  Fires once the message is durable; fails with a
    ``ReplyError`` (452 spool full, 451 local error) when it is not."""

    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]: ...


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    mode: str  # "smtp" | "submission" | "smtps"
    hostname: str
    limits: LimitsSection
    trusted_networks: tuple[Any, ...]
    auth_required: bool = False
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")

    @classmethod
    def from_config(cls, listener: ListenerSection, config: Config) -> ListenerSettings:
        return cls(name=listener.name, mode=listener.mode, hostname=config.gateway.hostname,
                   limits=config.limits, trusted_networks=config.relay.trusted_networks,
                   auth_required=listener.auth_required, mechanisms=config.auth.mechanisms)


class ConnectionCounter:
    """Connections in total and per client IP, across every listener."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def open(self, ip: str) -> Reply | None:
        if self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.per_ip[ip] >= self.max_per_ip:
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def close(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


@dataclass
class ListenerContext:
    settings: ListenerSettings
    clock: IReactorTime
    portal: Portal | None
    starttls_creator: Any  # IOpenSSLServerConnectionCreator, or None on smtps listeners
    sink: MessageSink
    throttle: AuthThrottle
    connections: ConnectionCounter
    limiter: RateLimiter | None = None  # None: no rate limits at all (tests)
    sessions: set[Any] = field(default_factory=set)  # live sessions, for a graceful stop
    options: XHeaderPolicy | None = None  # the X-Header policy; None: headers pass untouched
    upstream: Any = None  # upstream.UpstreamPolicy; None: every message under the global account
    on_close: Callable[[], None] | None = None  # called when a counted session ends
    new_id: Callable[[float], str] = new_queue_id  # queue ids in this process's slots
