"""OMICard logins checked by an AUTH on fake ITPison smarthosts (real ports, real TLS), and
upstream identity: each message relayed under the right account, also after a restart,
with the personal credential sealed at rest and gone with the message."""

from __future__ import annotations

import base64
import os
import smtplib
import stat

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor, task, threads

from fakesmarthost import FakeSmarthost
from gateway.auth import BackendUnavailable, Principal, SenderPolicy
from gateway.auth_omicard import OmicardChecker
from gateway.config import RelaySection
from gateway.config_auth import OmicardSection, UpstreamAccountSection
from gateway.upstream import (
    KEY_FILE,
    KEY_NAME,
    CredentialSealer,
    UpstreamAccount,
    UpstreamError,
    UpstreamPolicy,
    load_key,
)
from gatewayrig import smarthost_entry, start_gateway
from pki import TestCA
from procrig import free_port
from slapdrig import SERVICE_DN, SERVICE_PASSWORD, SUFFIX
from test_auth_e2e import session

CUSTOMER, CUSTOMER_PW = "customer@omi.example", "omicard-pw-1"
ITPISON_USERS = {"relay-account": "relay-secret", "sales-account": "sales-secret",
                 CUSTOMER: CUSTOMER_PW, "other@omi.example": "other-pw"}


async def itpison(test_ca, name="smarthost", **kwargs) -> FakeSmarthost:
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue(name, "localhost"),
                       users=dict(ITPISON_USERS), **kwargs)
    await fs.start()
    return fs


@pytest_twisted.async_yield_fixture()
async def primary(test_ca):
    fs = await itpison(test_ca)
    yield fs
    await fs.stop()


@pytest_twisted.async_yield_fixture()
async def backup(test_ca):
    fs = await itpison(test_ca, "backup")
    yield fs
    await fs.stop()


def checker_for(hosts, ca_pem, **section):
    from gateway.config import SmarthostSection
    smarthosts = [SmarthostSection(host="127.0.0.1", port=h.port if hasattr(h, "port") else h,
                                   security="smtps", tls_name="localhost", ca_file=ca_pem)
                  for h in hosts]
    return OmicardChecker(OmicardSection(**section), smarthosts,
                          RelaySection(connect_timeout=2, greeting_timeout=5,
                                       command_timeout=5), "gw.example.test", reactor)


async def outcome(checker, user, password):
    try:
        return await checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))
    except UnauthorizedLogin:
        return "535"
    except BackendUnavailable:
        return "454"


# --- the checker ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_good_login_carries_its_own_upstream_account(primary, backup, test_ca):
    checker = checker_for([primary, backup], test_ca.ca_pem, cache_ttl=0)
    identity = await outcome(checker, CUSTOMER, CUSTOMER_PW)
    assert identity.backend == "omicard" and identity.senders == (CUSTOMER,)
    upstream = identity.attributes["upstream"]
    assert upstream == UpstreamAccount(CUSTOMER, CUSTOMER_PW, personal=True)
    assert CUSTOMER_PW not in repr(identity) and CUSTOMER_PW not in repr(upstream)
    assert primary.connections == 1 and backup.connections == 0


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_535_without_asking_the_backup(primary, backup, test_ca):
    checker = checker_for([primary, backup], test_ca.ca_pem, cache_ttl=0)
    assert await outcome(checker, CUSTOMER, "wrong") == "535"
    assert await outcome(checker, "nobody@omi.example", "x") == "535"
    assert await outcome(checker, "bad\0name", "x") == "535"  # never sent upstream
    assert backup.connections == 0 and primary.connections == 2


@pytest_twisted.ensureDeferred
async def test_primary_down_backup_answers_both_down_454(backup, test_ca):
    checker = checker_for([free_port(), backup], test_ca.ca_pem, cache_ttl=0)
    assert (await outcome(checker, CUSTOMER, CUSTOMER_PW)).account == CUSTOMER
    assert await outcome(checker, CUSTOMER, "wrong") == "535"
    dead = checker_for([free_port(), free_port()], test_ca.ca_pem, cache_ttl=0)
    assert await outcome(dead, CUSTOMER, CUSTOMER_PW) == "454"


@pytest_twisted.ensureDeferred
async def test_unverified_smarthost_is_never_sent_the_password(primary, test_ca, tmp_path):
    other = TestCA(tmp_path / "other", name="another CA")
    checker = checker_for([primary], other.ca_pem, cache_ttl=0)
    assert await outcome(checker, CUSTOMER, CUSTOMER_PW) == "454"
    assert primary.connections == 1  # connected, but TLS failed before any AUTH


@pytest_twisted.ensureDeferred
async def test_domains_cache_and_senders(primary, test_ca):
    checker = checker_for([primary], test_ca.ca_pem, cache_ttl=30, domains=("omi.example",),
                          senders=("@customer.example",))
    assert await outcome(checker, "relay-account", "relay-secret") == "535"  # not @omi.example
    first = await outcome(checker, CUSTOMER, CUSTOMER_PW)
    assert first.senders == ("@customer.example", CUSTOMER)
    assert await outcome(checker, CUSTOMER, CUSTOMER_PW) == first
    assert checker.cache.hits == 1 and primary.connections == 1


# --- sealing and the key -------------------------------------------------------------------

def test_sealed_credentials_are_bound_to_key_and_queue_id():
    sealer = CredentialSealer(os.urandom(32))
    token = sealer.seal("s3cret", "QID1")
    assert "s3cret" not in token and sealer.open(token, "QID1") == "s3cret"
    with pytest.raises(UpstreamError):
        sealer.open(token, "QID2")  # moved to another message
    with pytest.raises(UpstreamError):
        CredentialSealer(os.urandom(32)).open(token, "QID1")  # another key
    flipped = base64.b64encode(bytes([base64.b64decode(token)[0] ^ 1])
                               + base64.b64decode(token)[1:]).decode()
    with pytest.raises(UpstreamError):
        sealer.open(flipped, "QID1")


def test_key_from_file_credentials_directory_or_state_dir(tmp_path):
    raw = os.urandom(32)
    (tmp_path / "k.bin").write_bytes(raw)
    assert load_key(tmp_path / "k.bin", tmp_path / "state", {}) == raw
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / KEY_NAME).write_text(base64.b64encode(raw).decode() + "\n")
    assert load_key(None, tmp_path / "state", {"CREDENTIALS_DIRECTORY": str(creds)}) == raw
    made = load_key(None, tmp_path / "state", {})
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(made) == 32
    assert load_key(None, tmp_path / "state", {}) == made  # the same key after a restart
    (tmp_path / "short").write_bytes(b"x" * 10)
    with pytest.raises(ValueError):
        load_key(tmp_path / "short", tmp_path, {})


def test_policy_records_and_restores_accounts(tmp_path):
    secret = tmp_path / "sales.pass"
    secret.write_text("sales-secret\n")
    sales = UpstreamAccountSection("sales", ("Sales",), "sales-account", secret, "sales-secret")
    policy = UpstreamPolicy(CredentialSealer(os.urandom(32)), [sales])
    personal = Principal(CUSTOMER, "omicard", True, SenderPolicy(),
                         {"upstream": UpstreamAccount(CUSTOMER, CUSTOMER_PW, personal=True)})
    member = Principal("alice", "ldap", True, SenderPolicy(), {"groups": ("sales",)})
    other = Principal("bob", "ldap", True, SenderPolicy(), {"groups": ("staff",)})
    extra = policy.record(personal, "Q1")
    assert CUSTOMER_PW not in repr(extra) and extra["upstream"]["user"] == CUSTOMER
    assert policy.restore(extra, "Q1") == UpstreamAccount(CUSTOMER, CUSTOMER_PW, personal=True)
    assert policy.record(member, "Q2") == {"upstream": {"account": "sales"}}  # by name only
    assert policy.restore(policy.record(member, "Q2"), "Q2").username == "sales-account"
    assert policy.record(other, "Q3") == {} and policy.restore({}, "Q3") is None
    assert policy.record(Principal.for_network("10.0.0.1"), "Q4") == {}
    with pytest.raises(UpstreamError):
        UpstreamPolicy(None, []).restore({"upstream": {"account": "sales"}}, "Q2")


# --- end to end ------------------------------------------------------------------------------

def gateway_sections(tmp_path, slapd, smarthost_port, ca_pem):
    (tmp_path / "relay.pass").write_text("relay-secret\n")
    (tmp_path / "sales.pass").write_text("sales-secret\n")
    (tmp_path / "ldap.pass").write_text(SERVICE_PASSWORD + "\n")
    return dict(
        smarthosts=[smarthost_entry(smarthost_port, ca_pem,
                                    password_file=tmp_path / "relay.pass")],
        auth={"omicard": {"cache_ttl": 0, "domains": ["omi.example"]},
              "ldap": {"urls": [slapd.ldaps_url], "ca_file": str(slapd.ca_pem),
                       "bind_dn": SERVICE_DN, "bind_password_file": str(tmp_path / "ldap.pass"),
                       "base_dn": SUFFIX, "cache_ttl": 0},
              "upstream_accounts": [{"name": "sales", "groups": ["staff"],
                                     "username": "sales-account",
                                     "password_file": str(tmp_path / "sales.pass")}],
              "failure_floor": 0},
        listeners=[{"mode": "submission"}])


async def start(tmp_path, test_ca, server_cert, slapd, port):
    sections = gateway_sections(tmp_path, slapd, port, test_ca.ca_pem)
    smarthosts = sections.pop("smarthosts")
    return await start_gateway(tmp_path, test_ca, server_cert, smarthosts, **sections)


def send(gw, user, password, sender):
    code, refused = session(gw, "submission", user, password, sender)
    assert (code, refused) == (235, {}), (user, code, refused)


@pytest_twisted.ensureDeferred
async def test_each_user_relays_under_the_right_account(tmp_path, test_ca, server_cert,
                                                        slapd, primary):
    gw = await start(tmp_path, test_ca, server_cert, slapd, primary.port)
    try:
        await threads.deferToThread(send, gw, CUSTOMER, CUSTOMER_PW, CUSTOMER)
        await threads.deferToThread(send, gw, "other@omi.example", "other-pw",
                                    "other@omi.example")
        await threads.deferToThread(send, gw, "alice", "alice-pw", "alice@example.test")
        await threads.deferToThread(send, gw, "bob", "bob-pw", "bob@example.test")
        await primary.wait_for_messages(4, timeout=20)
        by_sender = {m.mail_from: m.auth_user for m in primary.messages}
        assert by_sender == {CUSTOMER: CUSTOMER, "other@omi.example": "other@omi.example",
                             "alice@example.test": "relay-account",  # the global account
                             "bob@example.test": "sales-account"}  # his group's account
        with pytest.raises(smtplib.SMTPSenderRefused):  # an OMICard user sends as themselves
            await threads.deferToThread(send, gw, CUSTOMER, CUSTOMER_PW, "ceo@omi.example")
    finally:
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_personal_credential_survives_a_restart_sealed_and_is_erased(
        tmp_path, test_ca, server_cert, slapd, primary):
    primary.responses["mail"] = "451 4.3.0 try again later"  # AUTH works, mail waits
    gw = await start(tmp_path, test_ca, server_cert, slapd, primary.port)
    try:
        await threads.deferToThread(send, gw, CUSTOMER, CUSTOMER_PW, CUSTOMER)
        await threads.deferToThread(send, gw, "alice", "alice-pw", "alice@example.test")
    finally:
        await gw.stop()
    spool = tmp_path / "state" / "spool"
    queued = sorted((spool / "queue").iterdir())
    assert len(queued) == 2 and primary.count == 0
    blob = b"".join(p.read_bytes() for p in queued)
    assert CUSTOMER.encode() in blob and b'"sealed"' in blob
    assert CUSTOMER_PW.encode() not in blob  # never in clear at rest
    assert b"relay-secret" not in blob  # configured accounts are not copied into the spool
    key = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    primary.responses.clear()
    gw = await start(tmp_path, test_ca, server_cert, slapd, primary.port)  # same state_dir
    try:
        await primary.wait_for_messages(2, timeout=30)
        by_sender = {m.mail_from: m.auth_user for m in primary.messages}
        assert by_sender == {CUSTOMER: CUSTOMER, "alice@example.test": "relay-account"}
        for _ in range(100):  # the spool entry goes once the delivery is recorded
            if not any((spool / "queue").iterdir()):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
    finally:
        await gw.stop()
    leftovers = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert b'"sealed"' not in leftovers and CUSTOMER_PW.encode() not in leftovers
