"""Shared fixtures.

Never import twisted.internet.reactor (or twisted.mail.smtp, which imports it) at module
level here: pytest-twisted installs the reactor in pytest_configure (twisted-notes §7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted

sys.path.insert(0, str(Path(__file__).parent))

from pki import TestCA  # noqa: E402


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """One CA for the session.  ``test_ca.issue(name, *dns_or_ip)`` makes leaf certs."""
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def server_cert(test_ca: TestCA):
    """A certificate valid for localhost, 127.0.0.1 and ::1 (the gateway's listeners)."""
    return test_ca.issue("gateway", "localhost", "127.0.0.1", "::1", "gw.example.test")


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server on a free port (``.url``, ``.kill()``, ``.start()``,
    ``.freeze()``, ``.thaw()``), stopped after the test."""
    from redisrig import RedisServer
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA):
    """A real slapd for the module (tests/slapdrig.py: ``.url`` with StartTLS,
    ``.ldaps_url``, ``.stop()``/``.start()``, ``.freeze()``/``.thaw()``)."""
    from slapdrig import Slapd
    server = Slapd(tmp_path_factory.mktemp("slapd"), test_ca)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running_slapd(slapd):
    """``slapd``, brought back after a test that stopped or froze it."""
    yield slapd
    if slapd.proc is None:
        slapd.start()
    else:
        slapd.thaw()


@pytest.fixture
def pool():
    """A started thread pool for spool I/O, stopped after the test."""
    from twisted.python.threadpool import ThreadPool

    tp = ThreadPool(minthreads=1, maxthreads=4, name="test-spool")
    tp.start()
    yield tp
    tp.stop()


@pytest.fixture
def spool(tmp_path: Path, pool):
    """An opened Spool under tmp_path."""
    from twisted.internet import reactor

    from gateway.spool import Spool

    s = Spool(tmp_path / "spool", reactor, pool)
    s.open()
    return s


@pytest.fixture
def relay_password(tmp_path):
    """The smarthost account's password file (the account FakeSmarthost accepts)."""
    path = tmp_path / "smarthost.pass"
    path.write_text("relay-secret\n")
    return path


@pytest_twisted.async_yield_fixture()
async def smarthost(test_ca):
    """A FakeSmarthost with implicit TLS from the test CA and the account relay-account."""
    from twisted.internet import reactor

    from fakesmarthost import FakeSmarthost

    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("smarthost", "localhost"),
                       users={"relay-account": "relay-secret"})
    await fs.start()
    yield fs
    await fs.stop()
