"""TLS for both directions: server certificates, the strict client, and a self-signed start.

Server side: ``CertificateOptions`` built from ``cryptography`` objects (pyOpenSSL's
PKey/X509 are deprecated), TLS 1.2 minimum unless a listener lowers it for old printers.

Client side: verification is always on, and strict.  Twisted 26.10 with service-identity
>= 24.1 accepts a certificate without subjectAltName for *any* name (twisted-notes §3,
"fail-open"): its verify callback only treats ``VerificationError`` as a failure.
``StrictClientTLS`` replaces that callback with one that fails the handshake on any
exception, so a SAN-less certificate, a name mismatch or a bug all refuse the connection.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="gateway.tls")

TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
SELF_SIGNED_DAYS = 730
RENEW_BEFORE = datetime.timedelta(days=7)


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


class CertificateNameError(Exception):
    """The peer certificate does not prove the expected name (or has no subjectAltName)."""


# --- server side ---------------------------------------------------------------------

def server_creator(certificate: Path, private_key: Path, min_version: str = "1.2"
                   ) -> ssl.CertificateOptions:
    """An ``IOpenSSLServerConnectionCreator`` for a PEM leaf(+chain) and its key.

    ``min_version`` "1.0"/"1.1" lowers the floor for legacy clients (and OpenSSL's
    security level with it, or those handshakes would still fail); "1.3" raises it.
    """
    if min_version not in TLS_VERSIONS:
        raise TLSConfigError(f"unknown TLS version {min_version!r} (want one of "
                             f"{', '.join(TLS_VERSIONS)})")
    certs = load_certificates(certificate)
    key_data = _read(private_key)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, crypto.Error) as e:
        raise TLSConfigError(f"{private_key}: not an unencrypted PEM private key ({e})") from e
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise TLSConfigError(f"{private_key}: private key does not match the certificate "
                             f"in {certificate}")
    version = TLS_VERSIONS[min_version]
    floor: dict[str, Any]
    if version < ssl.TLSVersion.TLSv1_2:
        floor = {"insecurelyLowerMinimumTo": version}
    else:
        floor = {"raiseMinimumTo": version}
    try:
        options = ssl.CertificateOptions(privateKey=key, certificate=certs[0],
                                         extraCertChain=certs[1:], **floor)
        context = options.getContext()  # built now, so errors show at startup
        if version < ssl.TLSVersion.TLSv1_2:
            # TLS 1.0/1.1 sign the handshake with SHA-1, refused at OpenSSL level >= 1.
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"{certificate}: cannot be used with {private_key} ({e})") from e
    return options


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All PEM certificates in ``path`` (leaf first).  Raises TLSConfigError."""
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{path}: no PEM certificate found ({e})") from e
    if not certs:
        raise TLSConfigError(f"{path}: no PEM certificate found")
    return certs


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read: {e.strerror or e}") from e


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# --- self-signed certificate for a first start ---------------------------------------

def ensure_self_signed(directory: Path, hostname: str,
                       now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` in ``directory``: reused while valid for more than 7 days
    and still naming ``hostname``, else a new EC P-256 certificate valid ~2 years."""
    now = now or datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if _reusable(cert_path, key_path, hostname, now):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    names = _san_names(hostname)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated a self-signed certificate for {hostname} in {directory}",
             hostname=hostname, directory=str(directory))
    return cert_path, key_path


def _san_names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in (hostname, "localhost", "127.0.0.1", "::1"):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in names:
            names.append(entry)
    return names


def _reusable(cert_path: Path, key_path: Path, hostname: str, now: datetime.datetime) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound) as e:
        log.warn("replacing unusable self-signed certificate {path}: {error}",
                 path=str(cert_path), error=str(e))
        return False
    return (cert.not_valid_after_utc - now > RENEW_BEFORE
            and _public_der(key.public_key()) == _public_der(cert.public_key())
            and _san_names(hostname)[0] in list(san))


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- client side ---------------------------------------------------------------------

def client_creator(verify_name: str, ca_file: Path | None) -> IOpenSSLClientConnectionCreator:
    """A verifying, strict client creator: trust = platform or ``ca_file``, SNI and
    identity = ``verify_name`` (an IP literal is checked as an IP address), TLS >= 1.2."""
    if ca_file is None:
        trust = ssl.platformTrust()
    else:
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in load_certificates(ca_file)])
    inner = ssl.optionsForClientTLS(
        verify_name, trust,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})
    return StrictClientTLS(inner, verify_name)


@implementer(IOpenSSLClientConnectionCreator)
class StrictClientTLS:
    """Wraps a client creator and re-installs a fail-closed verify callback."""

    def __init__(self, inner: IOpenSSLClientConnectionCreator, verify_name: str) -> None:
        self._inner = inner
        self.verify_name = verify_name
        if isIPAddress(verify_name) or isIPv6Address(verify_name):
            self._service_id: Any = IPAddress_ID(verify_name)
        else:
            self._service_id = DNS_ID(verify_name)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _strict_callback(tlsProtocol, self._service_id, self.verify_name))
        return connection


def _strict_callback(tls_protocol: Any, service_id: Any, name: str
                     ) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    protocol = tls_protocol

    def verify(conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int) -> bool:
        nonlocal protocol
        if not ok:
            return False  # chain failure: OpenSSL reports "certificate verify failed"
        if depth != 0:
            return True
        try:
            verify_service_identity(extract_patterns(cert), [service_id], [])
            return True
        except BaseException as e:  # VerificationError, CertificateError (no SAN), bugs
            error = CertificateNameError(f"certificate does not match {name!r}: {e}")
            error.__cause__ = e
            if protocol is not None:
                protocol.failVerification(Failure(error))
            return False
        finally:
            protocol = None  # no reference cycle through the connection

    return verify


def is_tls_failure(reason: Failure | BaseException) -> bool:
    """Whether a connection was lost because TLS failed (handshake, chain or name)."""
    kinds = (SSL.Error, CertificateNameError, VerificationError, CertificateError)
    if isinstance(reason, Failure):
        return reason.check(*kinds) is not None
    return isinstance(reason, kinds)


def describe_tls(transport: Any) -> str | None:
    """"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384", or None when not TLS."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if not isinstance(handle, SSL.Connection):
        return None
    version = handle.get_protocol_version_name()
    cipher = handle.get_cipher_name()
    return f"{version} with cipher {cipher}" if cipher else version
