"""auth_file.py: users file parsing and writing, hashes, and the FileChecker via the portal."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from gateway import auth_file
from gateway.auth import BackendUnavailable, IPrincipal, SenderPolicy, make_portal
from gateway.auth_file import (
    FileChecker,
    UserRecord,
    UsersFileError,
    format_users,
    hash_password,
    load_users,
    set_user,
    verify_password,
)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.toml"
    set_user(path, "alice", "alice-pw", ["alice@example.com", "@sales.example.com"])
    bob = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(rounds=4)).decode()
    with path.open("a") as f:
        f.write(f'\n[users."bob"]\npassword = "{bob}"\nsenders = ["*"]\n')
    return path


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def login(checker: FileChecker, user: bytes, password: bytes) -> Any:
    portal = make_portal([checker])
    return portal.login(UsernamePassword(user, password), None, IPrincipal)


# --- hashes -------------------------------------------------------------------------

def test_argon2_hash_and_verify() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "s3cret") and verify_password(h, b"s3cret")
    assert not verify_password(h, "s3cret ")
    assert not verify_password(h[:-4] + "AAAA", "s3cret")


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_variants_verify(prefix: str) -> None:
    h = prefix + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()[4:]
    assert verify_password(h, "s3cret")
    assert not verify_password(h, "s3creT")


def test_bcrypt_long_password_is_truncated_like_the_tools_did() -> None:
    long = b"x" * 72
    h = bcrypt.hashpw(long, bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(h, long + b"ignored beyond 72 bytes")
    assert not verify_password(h, b"x" * 71)


def test_unknown_formats_never_verify_and_warn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.logger import Logger

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(auth_file, "log", Logger(observer=events.append))
    monkeypatch.setattr(auth_file, "_warned_schemes", set())
    for _ in range(3):
        assert not verify_password("$1$salt$abcdefgh", "pw")
        assert not verify_password("plaintext-secret", "plaintext-secret")
        assert not verify_password("$2b$garbage", "pw")           # broken bcrypt
        assert not verify_password("$argon2id$garbage", "pw")     # broken argon2
    texts = [formatEvent(e) for e in events]
    assert len(texts) == 2, texts
    assert "$1$" in texts[0] and "not a password hash" in texts[1]
    assert not any("plaintext-secret" in t for t in texts)


# --- the file -----------------------------------------------------------------------

def test_set_user_creates_file_with_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    set_user(path, "alice", "pw", ["Alice@Example.com"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    text = path.read_text()
    assert text.startswith("# itpison-gateway users file")
    assert "pw\"" not in text
    users = load_users(path)
    assert users["alice"].senders == ("alice@example.com",)
    assert verify_password(users["alice"].password_hash, "pw")
    assert [p.name for p in tmp_path.iterdir()] == ["users.toml"]   # no temp files left


def test_set_user_keeps_others_order_mode_and_senders(users_file: Path) -> None:
    os.chmod(users_file, 0o600)
    before = load_users(users_file)
    set_user(users_file, "alice", "new-pw")                       # senders kept
    set_user(users_file, "carol", "carol-pw", ["carol@example.com"])
    users = load_users(users_file)
    assert list(users) == ["alice", "bob", "carol"]
    assert users["alice"].senders == before["alice"].senders
    assert verify_password(users["alice"].password_hash, "new-pw")
    assert users["bob"] == before["bob"]
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    set_user(users_file, "alice", "new-pw", ["*"])                # senders replaced
    assert load_users(users_file)["alice"].senders == ("*",)
    set_user(users_file, "dave", "pw")
    assert load_users(users_file)["dave"].senders == ()


@pytest.mark.parametrize("name", ['we"ird\\name', "ünïcödé", "x:y@z.test", "a b", "😀"])
def test_names_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users.toml"
    set_user(path, name, "pw", ["*"])
    assert list(load_users(path)) == [name]


def test_format_escapes_del_and_quotes() -> None:
    import tomllib

    record = UserRecord('q"\\', "$argon2id$x\x7fy", ("*",))
    doc = tomllib.loads(format_users([record]))
    assert doc["users"]['q"\\']["password"] == "$argon2id$x\x7fy"


@pytest.mark.parametrize("user, password, senders", [
    ("", "pw", None), (" alice", "pw", None), ("al\nice", "pw", None),
    ("alice", "", None), ("alice", "pw", ["alice"]), ("alice", "pw", "alice@example.com"),
])
def test_set_user_rejects_bad_input(tmp_path: Path, user: str, password: str,
                                    senders: Any) -> None:
    with pytest.raises(ValueError):
        set_user(tmp_path / "users.toml", user, password, senders)
    assert not (tmp_path / "users.toml").exists()


def test_set_user_leaves_a_corrupt_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("[users.alice\n")
    with pytest.raises(UsersFileError):
        set_user(path, "bob", "pw")
    assert path.read_text() == "[users.alice\n"


@pytest.mark.parametrize("text, where", [
    ("[users.alice\n", "not valid TOML"),
    ("[other]\n", "other: unknown key"),
    ("users = 3\n", "users: must be a table"),
    ('[users."alice"]\nsenders = ["*"]\n', 'users."alice".password: missing'),
    ('[users."alice"]\npassword = 7\n', 'users."alice".password'),
    ('[users."alice"]\npassword = "$argon2id$x"\nsenders = "*"\n', 'users."alice".senders'),
    ('[users."alice"]\npassword = "$argon2id$x"\nsenders = ["nope"]\n',
     "users.\"alice\".senders: bad sender pattern 'nope'"),
    ('[users."alice"]\npassword = "$argon2id$x"\nsender = ["*"]\n',
     'users."alice".sender: unknown key'),
    ('[users." alice"]\npassword = "$argon2id$x"\n', 'users." alice": bad user name'),
    ('users.alice = "x"\n', 'users."alice": must be a table'),
])
def test_load_users_errors_name_user_and_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as e:
        load_users(path)
    assert str(e.value).startswith(f"{path}: ")
    assert where in e.value.message


def test_load_users_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read"):
        load_users(tmp_path / "nope.toml")


# --- the checker, through the portal ------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_good_passwords_give_principals(users_file: Path, reactor: Any,
                                              threadpool: ThreadPool) -> None:
    checker = FileChecker(users_file, reactor, threadpool)
    iface, alice, logout = await login(checker, b"alice", b"alice-pw")
    assert iface is IPrincipal
    assert (alice.name, alice.backend, alice.authenticated) == ("alice", "file", True)
    assert alice.senders == SenderPolicy(("alice@example.com", "@sales.example.com"))
    assert alice.may_send_as("x@sales.example.com") and not alice.may_send_as("x@example.com")
    logout()
    _, bob, _ = await login(checker, b"bob", b"bob-pw")            # bcrypt user
    assert bob.name == "bob" and bob.may_send_as("")


@pytest_twisted.ensureDeferred
async def test_plain_and_login_credentials(users_file: Path, reactor: Any,
                                           threadpool: ThreadPool) -> None:
    from twisted.mail import smtp
    from twisted.mail._cred import PLAINCredentials

    checker = FileChecker(users_file, reactor, threadpool)
    plain = PLAINCredentials()
    plain.setResponse(b"\0alice\0alice-pw")
    _, principal, _ = await make_portal([checker]).login(plain, None, IPrincipal)
    assert principal.name == "alice"
    creds = smtp.LOGINCredentials()
    creds.setResponse(b"bob")
    creds.setResponse(b"bob-pw")
    _, principal, _ = await make_portal([checker]).login(creds, None, IPrincipal)
    assert principal.name == "bob"


@pytest.mark.parametrize("user, password", [
    (b"alice", b"wrong"), (b"bob", b"alice-pw"), (b"mallory", b"alice-pw"), (b"Alice", b"alice-pw"),
    (b"\xff\xfe", b"alice-pw"), (b"", b""),
])
@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_unauthorized(users_file: Path, reactor: Any,
                                                threadpool: ThreadPool, user: bytes,
                                                password: bytes) -> None:
    checker = FileChecker(users_file, reactor, threadpool)
    with pytest.raises(UnauthorizedLogin):
        await login(checker, user, password)


@pytest_twisted.ensureDeferred
async def test_unknown_user_does_the_hashing_work_off_the_reactor_thread(
        users_file: Path, reactor: Any, threadpool: ThreadPool) -> None:
    calls: list[tuple[str, bytes, threading.Thread]] = []

    def spy(hashed: str, password: str | bytes) -> bool:
        calls.append((hashed, password, threading.current_thread()))  # type: ignore[arg-type]
        return verify_password(hashed, password)

    checker = FileChecker(users_file, reactor, threadpool, verify=spy)
    assert checker.dummy_hash.startswith("$argon2id$")
    with pytest.raises(UnauthorizedLogin):
        await login(checker, b"mallory", b"guess")
    with pytest.raises(UnauthorizedLogin):
        await login(checker, b"\xff", b"guess")
    with pytest.raises(UnauthorizedLogin):
        await login(checker, b"alice", b"guess")
    alice_hash = load_users(users_file)["alice"].password_hash
    assert [(h, p) for h, p, _ in calls] == [
        (checker.dummy_hash, b"guess"), (checker.dummy_hash, b"guess"), (alice_hash, b"guess")]
    assert all(t is not threading.main_thread() for _, _, t in calls)
    assert threading.current_thread() is threading.main_thread()


@pytest_twisted.ensureDeferred
async def test_reloads_after_set_user(users_file: Path, reactor: Any,
                                      threadpool: ThreadPool) -> None:
    checker = FileChecker(users_file, reactor, threadpool)
    await login(checker, b"alice", b"alice-pw")
    set_user(users_file, "alice", "changed-pw")
    with pytest.raises(UnauthorizedLogin):
        await login(checker, b"alice", b"alice-pw")
    _, alice, _ = await login(checker, b"alice", b"changed-pw")
    assert alice.may_send_as("alice@example.com")
    set_user(users_file, "carol", "carol-pw", ["carol@example.com"])
    _, carol, _ = await login(checker, b"carol", b"carol-pw")
    assert carol.may_send_as("carol@example.com") and not carol.may_send_as("a@example.com")


@pytest_twisted.ensureDeferred
async def test_corrupt_file_is_unavailable_not_last_good_copy(
        users_file: Path, reactor: Any, threadpool: ThreadPool,
        log_events: list[dict[str, Any]]) -> None:
    checker = FileChecker(users_file, reactor, threadpool)
    await login(checker, b"alice", b"alice-pw")
    good = users_file.read_text()
    users_file.write_text(good + "\n[users.broken\n")
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await login(checker, b"alice", b"alice-pw")
    errors = [formatEvent(e) for e in log_events if e.get("log_namespace") == "gateway.auth.file"
              and e["log_level"].name == "error"]
    assert len(errors) == 1 and "not valid TOML" in errors[0]
    users_file.write_text(good)                                    # fixed: works again
    _, alice, _ = await login(checker, b"alice", b"alice-pw")
    assert alice.name == "alice"


@pytest_twisted.ensureDeferred
async def test_missing_or_unreadable_file_is_unavailable(tmp_path: Path, reactor: Any,
                                                         threadpool: ThreadPool) -> None:
    checker = FileChecker(tmp_path / "missing.toml", reactor, threadpool)
    with pytest.raises(BackendUnavailable):
        await login(checker, b"alice", b"alice-pw")
    path = tmp_path / "users.toml"
    path.write_text('[users."alice"]\npassword = "$argon2id$x"\nsenders = [\'nope\']\n')
    checker = FileChecker(path, reactor, threadpool)
    with pytest.raises(BackendUnavailable):
        await login(checker, b"alice", b"x")


@pytest_twisted.ensureDeferred
async def test_passwords_are_never_logged(users_file: Path, reactor: Any,
                                          threadpool: ThreadPool,
                                          log_events: list[dict[str, Any]]) -> None:
    checker = FileChecker(users_file, reactor, threadpool)
    await login(checker, b"alice", b"alice-pw")
    for user in (b"alice", b"mallory"):
        with pytest.raises(UnauthorizedLogin):
            await login(checker, user, b"Secret-Guess-123")
    set_user(users_file, "alice", "Secret-New-456")
    users_file.write_text(users_file.read_text() + "\n[broken\n")
    with pytest.raises(BackendUnavailable):
        await login(checker, b"alice", b"Secret-New-456")
    assert log_events, "expected some log events (load, error)"
    for event in log_events:
        text = formatEvent(event) + repr(event)
        for secret in ("alice-pw", "Secret-Guess-123", "Secret-New-456", "$argon2id$"):
            assert secret not in text
