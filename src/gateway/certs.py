"""Server certificates that can change while the gateway runs (twisted-notes §3).

``SwappableServerTLS`` is the ``IOpenSSLServerConnectionCreator`` every listener holds
(STARTTLS and smtps alike).  It forwards each new TLS connection to its ``current``
``CertificateOptions``; a reload or a renewed certificate swaps ``current``, so the next
handshake uses the new certificate while sessions already encrypted keep theirs.

``CertificateWatcher`` polls the certificate and key files' (inode, size, mtime) and swaps
in a new creator when they change, so a certbot/ACME renewal needs no reload.  A renewal
caught half-written (key and certificate not matching yet) is logged and retried on the
next poll; the running certificate stays until a good pair is found.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.application import service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gateway import tls

log = Logger(namespace="gateway.tls")


@dataclass(frozen=True)
class CertificateSource:
    """Where one listener's certificate comes from, and the floor it enforces."""

    certificate: Path
    private_key: Path
    min_version: str = "1.2"

    def signature(self) -> tuple[Any, ...]:
        """Changes whenever either file is replaced or rewritten; raises OSError."""
        out: list[Any] = []
        for path in (self.certificate, self.private_key):
            st = os.stat(path)
            out += [st.st_ino, st.st_size, st.st_mtime_ns]
        return tuple(out)

    def build(self) -> Any:
        """A new ``CertificateOptions`` (raises ``tls.TLSConfigError``)."""
        return tls.server_creator(self.certificate, self.private_key, self.min_version)


@implementer(IOpenSSLServerConnectionCreator)
class SwappableServerTLS:
    """Forwards ``serverConnectionForTLS`` to the creator of the moment."""

    def __init__(self, source: CertificateSource) -> None:
        self.source = source
        self.signature = _signature_or_none(source)
        self.current = source.build()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.current.serverConnectionForTLS(tlsProtocol)

    def prepare(self, source: CertificateSource) -> Callable[[], None]:
        """Build the creator for ``source`` now (raising ``TLSConfigError`` if it is
        unusable) and return the function that swaps it in: a reload checks every
        listener first and swaps only when all are good."""
        signature = _signature_or_none(source)
        creator = source.build()

        def swap() -> None:
            self.source, self.signature, self.current = source, signature, creator

        return swap

    def refresh(self) -> bool:
        """Swap in the files' new contents if they changed; True when swapped."""
        signature = _signature_or_none(self.source)
        if signature is None or signature == self.signature:
            return False
        try:
            swap = self.prepare(self.source)
        except tls.TLSConfigError as e:
            # Mid-renewal, or a broken renewal: keep serving the old certificate.
            log.warn("certificate {cert} changed but cannot be used yet: {error}",
                     cert=str(self.source.certificate), error=str(e), event="tls_reload_failed")
            return False
        swap()
        log.info("certificate {cert} changed on disk: new TLS connections use it",
                 cert=str(self.source.certificate), event="tls_reloaded")
        return True


def _signature_or_none(source: CertificateSource) -> tuple[Any, ...] | None:
    try:
        return source.signature()
    except OSError:
        return None


class CertificateWatcher(service.Service):
    """Every ``interval`` seconds, ``refresh()`` each creator in ``creators()``."""

    def __init__(self, creators: Callable[[], list[SwappableServerTLS]], interval: float,
                 clock: Any) -> None:
        self.creators = creators
        self.interval = interval
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def check(self) -> int:
        """Refresh every creator; the number that changed."""
        seen: set[int] = set()
        changed = 0
        for creator in self.creators():
            if id(creator) not in seen:
                seen.add(id(creator))
                changed += creator.refresh()
        return changed

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
