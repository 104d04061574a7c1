"""gateway.tls: real handshakes on 127.0.0.1 with the test CA."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.tls import (
    CertificateNameError,
    TLSConfigError,
    client_creator,
    describe_tls,
    ensure_self_signed,
    is_tls_failure,
    server_creator,
)
from pki import TestCA


class _Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.open.append(self)
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.open.remove(self)
        self.closed.callback(None)


class _Probe(protocol.Protocol):
    """Writes a ping; ends with its own Deferred (endpoints swallow TLS failures)."""

    def __init__(self) -> None:
        self.done: defer.Deferred[Any] = defer.Deferred()
        self.tls: str | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.tls = describe_tls(self.transport)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback((self.tls, reason))


async def handshake(server: Any, client: Any) -> str | Failure:
    """Run one TLS connection; the client's describe_tls on success, else the Failure."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory

    factory = protocol.Factory.forProtocol(_Echo)
    factory.open = []
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(server, False, factory),
                             interface="127.0.0.1")
    try:
        probe = _Probe()
        endpoint = wrapClientTLS(client, TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, timeout=5))
        await endpoint.connect(protocol.Factory.forProtocol(lambda: probe))
        tls, reason = await probe.done.addTimeout(10, reactor)
        return tls if tls is not None else reason
    finally:
        await port.stopListening()
        for conn in list(factory.open):
            conn.transport.abortConnection()
        await defer.gatherResults([c.closed for c in factory.open])


@pytest.fixture(scope="module")
def wildcard_cert(test_ca: TestCA):
    return test_ca.issue("wildcard", "*.example.test")


@pytest_twisted.ensureDeferred
async def test_good_name_handshake_and_describe(test_ca, server_cert):
    result = await handshake(server_creator(server_cert.cert, server_cert.key),
                             client_creator("localhost", test_ca.ca_pem))
    assert isinstance(result, str), result
    assert result.startswith("TLSv1.3 with cipher TLS_")


@pytest_twisted.ensureDeferred
async def test_wrong_name_fails(test_ca, server_cert):
    result = await handshake(server_creator(server_cert.cert, server_cert.key),
                             client_creator("smtp.other.test", test_ca.ca_pem))
    assert isinstance(result, Failure)
    assert result.check(CertificateNameError)
    assert is_tls_failure(result)


@pytest.mark.parametrize("name, ok", [
    ("smtp.example.test", True),
    ("SMTP.Example.Test", True),
    ("a.b.example.test", False),
    ("example.test", False),
    ("smtp.example.testx", False),
])
@pytest_twisted.ensureDeferred
async def test_wildcard_rfc6125(test_ca, wildcard_cert, name, ok):
    result = await handshake(server_creator(wildcard_cert.cert, wildcard_cert.key),
                             client_creator(name, test_ca.ca_pem))
    assert isinstance(result, str) is ok, result


@pytest.mark.parametrize("names, verify, ok", [
    (("127.0.0.1",), "127.0.0.1", True),
    (("localhost",), "127.0.0.1", False),  # an IP is checked as an IP, not a DNS name
    (("127.0.0.1",), "localhost", False),
    (("::1", "127.0.0.2"), "127.0.0.2", True),
])
@pytest_twisted.ensureDeferred
async def test_ip_literals(test_ca, names, verify, ok):
    cert = test_ca.issue("ip-" + "-".join(names).replace(":", "_"), *names)
    result = await handshake(server_creator(cert.cert, cert.key),
                             client_creator(verify, test_ca.ca_pem))
    assert isinstance(result, str) is ok, result


@pytest_twisted.ensureDeferred
async def test_wrong_ca_fails(tmp_path, server_cert):
    other = TestCA(tmp_path / "other")
    result = await handshake(server_creator(server_cert.cert, server_cert.key),
                             client_creator("localhost", other.ca_pem))
    assert isinstance(result, Failure)
    assert is_tls_failure(result)
    assert "certificate verify failed" in result.getErrorMessage()


@pytest_twisted.ensureDeferred
async def test_san_less_certificate_fails_for_its_own_cn(test_ca):
    # The fail-open of twisted-notes §3: Twisted alone accepts this for any name.
    cert = test_ca.issue("nosan", san=False, common_name="localhost")
    result = await handshake(server_creator(cert.cert, cert.key),
                             client_creator("localhost", test_ca.ca_pem))
    assert isinstance(result, Failure)
    assert result.check(CertificateNameError)
    assert "subjectAltName" in result.getErrorMessage()


def _tls12_only_client(ca: Path) -> Any:
    from OpenSSL import crypto
    from twisted.internet import ssl

    from gateway.tls import load_certificates
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in load_certificates(ca)])
    return ssl.optionsForClientTLS(
        "localhost", trust,
        extraCertificateOptions={"lowerMaximumSecurityTo": ssl.TLSVersion.TLSv1_2})


@pytest_twisted.ensureDeferred
async def test_min_version_13_refuses_tls12_client(test_ca, server_cert):
    client = _tls12_only_client(test_ca.ca_pem)
    ok = await handshake(server_creator(server_cert.cert, server_cert.key, "1.2"), client)
    assert isinstance(ok, str) and ok.startswith("TLSv1.2 "), ok
    refused = await handshake(server_creator(server_cert.cert, server_cert.key, "1.3"), client)
    assert isinstance(refused, Failure) and is_tls_failure(refused)


def _tls10_only_client() -> Any:
    from twisted.internet import ssl
    options = ssl.CertificateOptions(insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
                                     lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_0)
    options.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return options


@pytest_twisted.ensureDeferred
async def test_min_version_10_admits_legacy_client(server_cert):
    legacy = await handshake(server_creator(server_cert.cert, server_cert.key, "1.0"),
                             _tls10_only_client())
    assert isinstance(legacy, str) and legacy.startswith("TLSv1 "), legacy
    refused = await handshake(server_creator(server_cert.cert, server_cert.key),
                              _tls10_only_client())
    assert isinstance(refused, Failure)


def test_server_creator_errors_name_the_file(tmp_path, test_ca, server_cert):
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=str(missing)):
        server_creator(missing, server_cert.key)
    with pytest.raises(TLSConfigError, match=str(missing)):
        server_creator(server_cert.cert, missing)
    other = test_ca.issue("other-key", "localhost")
    with pytest.raises(TLSConfigError, match=f"{other.key}.*does not match"):
        server_creator(server_cert.cert, other.key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=str(garbage)):
        server_creator(garbage, server_cert.key)
    with pytest.raises(TLSConfigError, match=str(garbage)):
        server_creator(server_cert.cert, garbage)
    with pytest.raises(TLSConfigError, match="1.4"):
        server_creator(server_cert.cert, server_cert.key, "1.4")
    with pytest.raises(TLSConfigError, match=str(missing)):
        client_creator("localhost", missing)


def test_describe_tls_plain_transport():
    assert describe_tls(StringTransport()) is None
    assert describe_tls(None) is None


def test_self_signed_generated_then_reused(tmp_path):
    directory = tmp_path / "tls"
    cert_path, key_path = ensure_self_signed(directory, "gw.example.test")
    assert (cert_path, key_path) == (directory / "cert.pem", directory / "key.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("::1")]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=700) < lifetime < datetime.timedelta(days=740)
    assert sorted(directory.iterdir()) == sorted([cert_path, key_path])  # no temp files left

    before = (cert_path.read_bytes(), key_path.read_bytes())
    assert ensure_self_signed(directory, "gw.example.test") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    server_creator(cert_path, key_path)  # usable as-is


def test_self_signed_renewed_near_expiry_or_for_a_new_name(tmp_path):
    directory = tmp_path / "tls"
    cert_path, _ = ensure_self_signed(directory, "gw.example.test")
    first = cert_path.read_bytes()
    expiry = x509.load_pem_x509_certificate(first).not_valid_after_utc
    ensure_self_signed(directory, "gw.example.test", now=expiry - datetime.timedelta(days=8))
    assert cert_path.read_bytes() == first
    ensure_self_signed(directory, "gw.example.test", now=expiry - datetime.timedelta(days=6))
    second = cert_path.read_bytes()
    assert second != first
    ensure_self_signed(directory, "other.example.test")
    assert cert_path.read_bytes() != second


def test_self_signed_replaces_corrupt_files(tmp_path):
    directory = tmp_path / "tls"
    cert_path, key_path = ensure_self_signed(directory, "gw.example.test")
    key_path.write_text("garbage")
    ensure_self_signed(directory, "gw.example.test")
    server_creator(cert_path, key_path)


@pytest_twisted.ensureDeferred
async def test_self_signed_verifies_with_itself_as_ca(tmp_path):
    cert_path, key_path = ensure_self_signed(tmp_path / "tls", "gw.example.test")
    result = await handshake(server_creator(cert_path, key_path),
                             client_creator("gw.example.test", cert_path))
    assert isinstance(result, str), result
