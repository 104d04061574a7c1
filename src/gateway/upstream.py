"""Upstream identity: which smarthost account a message is relayed under.

- An OMICard user's mail goes out under their own account (``auth_omicard`` puts an
  ``UpstreamAccount`` in the principal's ``attributes["upstream"]``), so ITPison's
  per-account tracking, reports and limits apply to them.
- LDAP and local users go out under the account configured for the first of their
  groups listed in ``[[auth.upstream_accounts]]``, else under the smarthost's own
  ``username`` (the global account).

The choice travels with the message in the spool (``Envelope.extra["upstream"]``), so it
holds after queueing, retries and restarts:

- a configured account by *name* (``{"account": name}``): its password stays in its
  ``password_file``, and a rotated password applies to mail already queued;
- a user's own credential *sealed* with AES-256-GCM under the gateway's credential key,
  the queue id as associated data (a sealed credential moved to another message does not
  open): ``{"user": login, "sealed": base64(nonce + ciphertext)}``.  The password is
  never logged and never on disk in clear; it goes when the message file goes (delivered,
  bounced or deleted), and without the key the spool does not reveal it.

The key: ``[auth.omicard] key_file`` (32 random bytes, raw or base64), else the systemd
credential ``$CREDENTIALS_DIRECTORY/itpison-gateway-key``, else
``state_dir/credential.key``, created (0600) on first use.  Losing the key leaves queued
OMICard mail undeliverable (deferred, then bounced at ``queue.max_lifetime``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.logger import Logger

log = Logger(namespace="gateway.upstream")

KEY_NAME = "itpison-gateway-key"  # the systemd credential (LoadCredential=)
KEY_FILE = "credential.key"  # in state_dir when no other key is configured


class UpstreamError(Exception):
    """A queued message's upstream identity cannot be restored (key lost, tampered,
    account removed from the configuration)."""


@dataclass(frozen=True)
class UpstreamAccount:
    """Credentials to AUTH to the smarthost with.  ``personal``: a user's own."""

    username: str
    password: str = field(repr=False)
    personal: bool = False
    name: str = ""  # the configured account's name ("" for a personal one)

    def __repr__(self) -> str:
        kind = "personal" if self.personal else f"account {self.name!r}"
        return f"UpstreamAccount({self.username!r}, {kind}, password=<hidden>)"


class CredentialSealer:
    """AES-256-GCM with a 96-bit random nonce per credential."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the credential key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, password: str, queue_id: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, password.encode("utf-8"), queue_id.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, token: str, queue_id: str) -> str:
        try:
            raw = base64.b64decode(token, validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], queue_id.encode()).decode("utf-8")
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise UpstreamError("the sealed credential does not open with this key") from None


def load_key(key_file: Path | None, state_dir: Path,
             environ: Mapping[str, str] = os.environ) -> bytes:
    """The credential key (see the module docstring for where it comes from)."""
    if key_file is None and environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / KEY_NAME
        if candidate.exists():
            key_file = candidate
    if key_file is not None:
        return _parse_key(key_file.read_bytes(), key_file)
    path = state_dir / KEY_FILE
    try:
        return _parse_key(path.read_bytes(), path)
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        os.unlink(tmp)
        return _parse_key(path.read_bytes(), path)
    os.unlink(tmp)
    log.info("created the credential key {path}", path=str(path))
    return key


def _parse_key(data: bytes, path: Path) -> bytes:
    if len(data) == 32:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path}: the credential key must be 32 bytes, raw or base64")
    return key


class UpstreamPolicy:
    """Chooses, records and restores the upstream account of each message."""

    def __init__(self, sealer: CredentialSealer | None,
                 accounts: Sequence[Any] = ()) -> None:
        self.sealer = sealer
        self.accounts = tuple(accounts)  # UpstreamAccountSection, in configuration order
        self._by_name = {a.name: a for a in self.accounts}

    def account_for(self, principal: Any) -> UpstreamAccount | None:
        """The account for a login: its own, its first group's, or None (the global)."""
        if principal is None or not principal.authenticated:
            return None
        own = principal.attributes.get("upstream")
        if isinstance(own, UpstreamAccount):
            return own
        groups = {g.lower() for g in principal.attributes.get("groups", ())}
        for account in self.accounts:
            if groups & {g.lower() for g in account.groups}:
                return UpstreamAccount(account.username, account.password, name=account.name)
        return None

    def record(self, principal: Any, queue_id: str) -> dict[str, Any]:
        """What goes into ``Envelope.extra`` for this login (empty: the global account)."""
        account = self.account_for(principal)
        if account is None:
            return {}
        if not account.personal:
            return {"upstream": {"account": account.name}}
        if self.sealer is None:
            raise UpstreamError("no credential key to keep a personal credential with")
        return {"upstream": {"user": account.username,
                             "sealed": self.sealer.seal(account.password, queue_id)}}

    def restore(self, extra: Mapping[str, Any], queue_id: str) -> UpstreamAccount | None:
        """The account a queued message goes out under; raises UpstreamError."""
        entry = extra.get("upstream")
        if not entry:
            return None
        if not isinstance(entry, Mapping):
            raise UpstreamError("malformed upstream entry")
        if "account" in entry:
            account = self._by_name.get(entry["account"])
            if account is None:
                raise UpstreamError(f"upstream account {entry['account']!r} is no longer"
                                    " configured")
            return UpstreamAccount(account.username, account.password, name=account.name)
        if self.sealer is None:
            raise UpstreamError("no credential key to open the sealed credential with")
        user, token = entry.get("user"), entry.get("sealed")
        if not isinstance(user, str) or not isinstance(token, str):
            raise UpstreamError("malformed upstream entry")
        return UpstreamAccount(user, self.sealer.open(token, queue_id), personal=True)
