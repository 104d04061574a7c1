"""PROXY protocol v1/v2 (HAProxy) on a listener, only from the configured proxies.

Behind a TCP load balancer every connection comes from the balancer; the PROXY header it
sends first carries the real client address.  ``ProxyProtocolFactory`` wraps a listener's
factory (outermost, so smtps TLS starts after the header):

- a peer outside ``trusted`` is refused at once (closed, logged): nobody else may claim an
  address, or rate limits and trusted networks would be theirs to choose;
- a trusted peer must send a complete v1 or v2 header within ``HEADER_TIMEOUT``; until then
  the SMTP session does not exist, so the greeting, connection limits, ``trusted_networks``
  and the mail log all see the client's address from the header;
- ``PROXY UNKNOWN`` / v2 ``LOCAL`` (the balancer's own health checks) keep the proxy's
  address.

Twisted's own ``HAProxyWrappingFactory`` starts the wrapped protocol before the header has
arrived (the SMTP greeting would go out with the proxy's address) and drops headers split
across reads; hence this wrapper, which reuses its parsers.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from gateway import policy

log = Logger(namespace="gateway.proxy")
HEADER_TIMEOUT = 10.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyProtocolWrapper(policies.ProtocolWrapper):
    factory: ProxyProtocolFactory

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None
        self._source: IAddress | None = None
        self._started = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # The wrapped protocol is connected only once the header has been read.
        directlyProvides(self, providedBy(transport))
        self.transport = transport
        self.connected = 1
        self.factory.registerProtocol(self)
        peer = policy.peer_address(transport.getPeer())
        if not policy.is_trusted(peer, self.factory.trusted):
            log.warn("refused connection from {peer} on {listener}: not a configured PROXY"
                     " protocol source", peer=peer, listener=self.factory.listener,
                     event="proxy_refused", client_ip=peer)
            self.factory.refused += 1
            transport.loseConnection()
            return
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        self._fail("no complete PROXY header within %gs" % HEADER_TIMEOUT)

    def _fail(self, why: str) -> None:
        peer = policy.peer_address(self.transport.getPeer())
        log.warn("PROXY protocol from {peer} on {listener}: {why}", peer=peer,
                 listener=self.factory.listener, why=why, event="proxy_invalid")
        self.factory.refused += 1
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting or self._timer is None:
            return
        if self._parser is None:
            self._buffer += data
            head = self._buffer[:12]
            if self._buffer.startswith(b"PROXY "):
                self._parser = V1Parser()
            elif self._buffer.startswith(V2_SIGNATURE) and len(self._buffer) >= 16:
                self._parser = V2Parser()  # it wants the 16-byte fixed part at once
            elif V2_SIGNATURE.startswith(head) or b"PROXY ".startswith(head[:6]):
                return  # a header's beginning: wait for more
            else:
                self._fail("the connection did not start with a PROXY header")
                return
            data, self._buffer = self._buffer, b""
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._fail("invalid PROXY header")
            return
        if info is None:
            return
        self._timer.cancel()
        self._timer = None
        self._source = info.source
        self._started = True
        self.wrappedProtocol.makeConnection(self)
        if remaining and not self.disconnecting:
            self.wrappedProtocol.dataReceived(remaining)

    def getPeer(self) -> IAddress:
        return self._source if self._source is not None else self.transport.getPeer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class ProxyProtocolFactory(policies.WrappingFactory):
    """Wraps a listener's factory; ``trusted`` are the proxies' networks."""

    protocol = ProxyProtocolWrapper

    def __init__(self, wrapped: Any, trusted: Sequence[IPv4Network | IPv6Network],
                 clock: IReactorTime, listener: str) -> None:
        super().__init__(wrapped)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.listener = listener
        self.refused = 0

    def logPrefix(self) -> str:
        return f"{self.listener} (PROXY)"
