"""The local users file: TOML with argon2id (or bcrypt) hashes, and its cred checker.

Format::

    # itpison-gateway users file: managed with `itpison-gateway passwd`
    [users."alice"]
    password = "$argon2id$v=19$m=65536,t=3,p=4$..."   # argon2id (default) or bcrypt ($2b$...)
    senders = ["alice@example.com", "@sales.example.com"]
    groups = ["marketing"]       # optional: [options.groups.*] that apply to the user
    class = "bulk"               # optional: the rate-limit class ([[ratelimit.overrides]])

``set_user`` rewrites the whole file (atomically), so comments in it are not preserved.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import argon2
import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway.auth import BackendUnavailable, Identity, SenderPolicy, credential_text

log = Logger(namespace="gateway.auth.file")

HEADER = "# itpison-gateway users file: managed with `itpison-gateway passwd`\n"
NEW_FILE_MODE = 0o640
_USER_KEYS = {"password", "senders", "groups", "class"}
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_SCHEME_RE = re.compile(r"\$([A-Za-z0-9-]{1,20})\$")
_hasher = argon2.PasswordHasher()
_warned_schemes: set[str] = set()


class UsersFileError(Exception):
    """The users file can't be read or is invalid; ``str(e)`` is ``"<path>: <message>"``."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


@dataclass(frozen=True)
class UserRecord:
    name: str
    password_hash: str = field(repr=False)
    senders: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    user_class: str | None = None


def check_username(name: object) -> str:
    """A user name is 1..256 characters, no control characters or surrounding blanks."""
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise ValueError("user name must be 1 to 256 characters")
    if name != name.strip() or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ValueError(f"bad user name {name!r}: control characters or surrounding blanks")
    return name


def load_users(path: str | Path) -> dict[str, UserRecord]:
    """Read and validate the users file; raises UsersFileError naming user and key."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UsersFileError(path, f"cannot read: {e.strerror or e}") from e
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsersFileError(path, f"not valid TOML: {e}") from e
    for key in doc:
        if key != "users":
            raise UsersFileError(path, f"{key}: unknown key (expected [users.\"name\"] tables)")
    users = doc.get("users", {})
    if not isinstance(users, dict):
        raise UsersFileError(path, "users: must be a table of users")
    return {name: _user_record(path, name, entry) for name, entry in users.items()}


def _user_record(path: str | Path, name: str, entry: Any) -> UserRecord:
    where = f"users.{_toml_string(name)}"
    try:
        check_username(name)
    except ValueError as e:
        raise UsersFileError(path, f"{where}: {e}") from None
    if not isinstance(entry, dict):
        raise UsersFileError(path, f"{where}: must be a table")
    for key in entry:
        if key not in _USER_KEYS:
            raise UsersFileError(path, f"{where}.{key}: unknown key")
    password = entry.get("password")
    if not isinstance(password, str) or not password:
        raise UsersFileError(path, f"{where}.password: missing or not a password hash string")
    senders = entry.get("senders", [])
    if not isinstance(senders, list):
        raise UsersFileError(path, f"{where}.senders: must be a list of patterns")
    try:
        policy = SenderPolicy.parse(senders)
    except ValueError as e:
        raise UsersFileError(path, f"{where}.senders: {e}") from None
    groups = entry.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise UsersFileError(path, f"{where}.groups: must be a list of group names")
    user_class = entry.get("class")
    if user_class is not None and (not isinstance(user_class, str) or not user_class.strip()):
        raise UsersFileError(path, f"{where}.class: must be a non-empty string")
    return UserRecord(name, password, policy.patterns, tuple(groups), user_class)


def hash_password(password: str) -> str:
    """An argon2id hash with argon2-cffi's default parameters."""
    return _hasher.hash(password)


def verify_password(hashed: str, password: str | bytes) -> bool:
    """Check a password against an argon2 or bcrypt hash; other formats never verify.

    bcrypt only looks at the first 72 bytes of a password (the bcrypt library now refuses
    longer ones rather than truncating): they are truncated here, as the tools that made
    such hashes did.
    """
    secret = password.encode("utf-8") if isinstance(password, str) else password
    if hashed.startswith("$argon2"):
        try:
            return _hasher.verify(hashed, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if hashed.startswith(_BCRYPT_PREFIXES):
        try:
            return bcrypt.checkpw(secret[:72], hashed.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
    _warn_unknown_scheme(hashed)
    return False


def _warn_unknown_scheme(hashed: str) -> None:
    # Never log the value itself: it may be a plaintext password pasted into the file.
    match = _SCHEME_RE.match(hashed)
    scheme = f"${match.group(1)}$" if match else "(not a password hash)"
    if scheme not in _warned_schemes:
        _warned_schemes.add(scheme)
        log.warn("users file: password hash format {scheme} is not supported; "
                 "such users can never log in (use argon2id or bcrypt)", scheme=scheme)


@implementer(ICredentialsChecker)
class FileChecker:
    """Checks ``IUsernamePassword`` credentials (SMTP PLAIN and LOGIN) against the users file.

    The file is stat'ed on every attempt and reloaded when it changed.  When it can't be
    read or is invalid, every attempt fails with ``BackendUnavailable`` (454) and an error
    is logged: the last good copy is deliberately not used, since the edit that broke the
    file may have been the removal of a user or of a compromised password.

    Hashes are verified in ``threadpool``, never on the reactor thread.  An unknown user is
    verified against a dummy argon2id hash, so the answer takes as long as for a real user
    (with argon2id default parameters, which ``set_user`` writes).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str | Path, reactor: Any, threadpool: ThreadPool, *,
                 verify: Callable[[str, str | bytes], bool] = verify_password) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._threadpool = threadpool
        self._verify = verify
        self._signature: tuple[int, ...] | None = None
        self._users: dict[str, UserRecord] | None = None
        self._error: str | None = None
        self.dummy_hash = hash_password(secrets.token_urlsafe(24))

    def users(self) -> Mapping[str, UserRecord]:
        """The current users, reloaded if the file changed; raises BackendUnavailable."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise self._unusable(f"{self.path}: cannot read: {e.strerror or e}") from None
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if signature != self._signature or self._users is None:
            self._signature = signature
            try:
                users = load_users(self.path)
            except UsersFileError as e:
                raise self._unusable(str(e)) from None
            self._users, self._error = users, None
            log.info("users file {path}: {count} users loaded", path=str(self.path),
                     count=len(users))
        return self._users

    def _unusable(self, error: str) -> BackendUnavailable:
        self._users = None
        if error != self._error:  # log each new problem once, not once per attempt
            self._error = error
            log.error("users file unusable, file logins fail until it is fixed: {error}",
                      error=error)
        return BackendUnavailable(error)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Identity]:
        try:
            users = self.users()
        except BackendUnavailable:
            return defer.fail()
        name = credential_text(credentials.username)
        record = users.get(name) if name is not None else None
        hashed = record.password_hash if record is not None else self.dummy_hash
        d = threads.deferToThreadPool(self._reactor, self._threadpool, self._verify,
                                      hashed, credentials.password)
        d.addCallback(self._decide, record)
        return d

    @staticmethod
    def _decide(ok: bool, record: UserRecord | None) -> Identity:
        if record is None:
            raise UnauthorizedLogin("unknown user")
        if not ok:
            raise UnauthorizedLogin("bad password")
        attributes: dict[str, object] = {}
        if record.groups:
            attributes["groups"] = record.groups
        if record.user_class:
            attributes["class"] = record.user_class
        return Identity(record.name, "file", record.senders, attributes)



def set_user(path: str | Path, user: str, password: str,
             senders: Iterable[str] | None = None,
             groups: Iterable[str] | None = None) -> None:
    """Add a user or change one, keeping the others (and their order).

    ``senders=None`` keeps an existing user's senders (none for a new user); the same for
    ``groups``.  The file is
    written atomically: a temporary file in the same directory, fsync, rename, fsync of the
    directory; a new file gets mode 0640, an existing one keeps its mode and, where
    permitted, its owner and group.  Concurrent ``set_user`` calls are serialised by a lock
    on the directory.  Raises ValueError for a bad user, password or sender pattern,
    UsersFileError if the existing file is invalid (it is left alone), OSError otherwise.
    """
    check_username(user)
    if not password:
        raise ValueError("empty password")
    policy = SenderPolicy.parse(senders) if senders is not None else None
    path = Path(os.path.realpath(path))
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            existing: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            existing = None
        users = load_users(path) if existing is not None else {}
        old = users.get(user)
        patterns = policy.patterns if policy is not None else (old.senders if old else ())
        kept = tuple(groups) if groups is not None else (old.groups if old else ())
        users[user] = UserRecord(user, hash_password(password), patterns, kept,
                                 old.user_class if old else None)
        _replace_file(path, format_users(users.values()), existing)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def format_users(records: Iterable[UserRecord]) -> str:
    """The users file text for ``records``."""
    blocks = [HEADER]
    for record in records:
        senders = ", ".join(_toml_string(s) for s in record.senders)
        blocks.append(f"\n[users.{_toml_string(record.name)}]\n"
                      f"password = {_toml_string(record.password_hash)}\n"
                      f"senders = [{senders}]\n")
        if record.groups:
            blocks.append(f"groups = [{', '.join(_toml_string(g) for g in record.groups)}]\n")
        if record.user_class:
            blocks.append(f"class = {_toml_string(record.user_class)}\n")
    return "".join(blocks)


def _toml_string(value: str) -> str:
    # JSON string escaping is valid in a TOML basic string, except that TOML also wants DEL
    # escaped and has no surrogate pairs (ensure_ascii=False writes other characters as is).
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _replace_file(path: Path, text: str, existing: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode) if existing else NEW_FILE_MODE)
            if existing is not None:
                _keep_owner(f.fileno(), existing)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _keep_owner(fd: int, existing: os.stat_result) -> None:
    """Give the new file the old owner and group, as far as this user may."""
    for uid in (existing.st_uid, -1):
        try:
            os.fchown(fd, uid, existing.st_gid)
            return
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
