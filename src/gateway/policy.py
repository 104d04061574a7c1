"""Who may do what: pure checks per SMTP stage, returning a Reply to refuse or None.

No sockets and no Twisted here, so the rules are tested with tables.  The gateway is a
pure relay (it delivers nothing locally), so every accepted recipient is relayed: the
relay decision depends only on who the client is (trusted network or authenticated
principal), never on the address, and no route, ``%`` hack or quoted form can change it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway import reply as R
from gateway.auth import Principal
from gateway.envelope import Address
from gateway.message import from_addresses
from gateway.reply import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(host: str) -> str:
    """The client's IP in canonical form (IPv4-mapped IPv6 shown as IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


LOCAL_PEER = "127.0.0.1"  # a client on a unix-socket listener: on this machine


def peer_address(address: Any) -> str:
    """The client IP of a transport's peer (``getPeer()``).  A unix-socket peer has none:
    it is on this machine, so it counts as 127.0.0.1 for trusted networks, limits and
    logs (Postfix treats local submission the same way)."""
    host = getattr(address, "host", None)
    return LOCAL_PEER if host is None else client_address(host)


def is_trusted(ip: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


@dataclass(frozen=True)
class SessionFacts:
    """What the rules need to know about a session at the moment of a check."""

    mode: str  # "smtp" | "submission" | "smtps"
    tls: bool
    trusted: bool  # the client address is in relay.trusted_networks
    auth_required: bool  # the listener makes even trusted networks authenticate
    principal: Principal | None  # set once AUTH succeeded

    @property
    def authenticated(self) -> bool:
        return self.principal is not None and self.principal.authenticated

    @property
    def relay_allowed(self) -> bool:
        return self.authenticated or (self.trusted and not self.auth_required)


def check_mail(facts: SessionFacts, sender: Address) -> Reply | None:
    if facts.mode == "submission" and not facts.tls:
        return R.ENCRYPTION_REQUIRED
    if facts.authenticated:
        assert facts.principal is not None
        if not facts.principal.may_send_as(str(sender)):
            return R.SENDER_NOT_OWNED
        return None
    if facts.relay_allowed:
        return None
    if facts.mode in ("submission", "smtps") or facts.auth_required:
        return R.AUTH_REQUIRED
    return None  # port-25 style: refused per recipient, as Postfix does


def check_rcpt(facts: SessionFacts, recipient: Address) -> Reply | None:
    if not facts.relay_allowed:
        return R.RELAY_DENIED
    return None


def check_headers(facts: SessionFacts, headers: Any) -> Reply | None:
    """End of DATA: an authenticated user may only put their own addresses in From:."""
    if not facts.authenticated:
        return None
    assert facts.principal is not None
    addresses = from_addresses(headers)
    if addresses is None:
        return None
    for addr in addresses:
        if not addr or not facts.principal.may_send_as(addr):
            return R.FROM_NOT_OWNED
    return None
