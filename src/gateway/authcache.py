"""A positive-result cache for password checks against remote backends (LDAP, OMICard).

Entries are keyed by ``HMAC-SHA256(secret, user NUL password)`` with a secret made fresh in
each process: the password is never stored, and the key is useless outside this process.
Only successes are cached (a failure is always asked again), for ``ttl`` seconds, which
also rides out a short outage of the backend.  A password changed in the directory keeps
working here until its entry expires: keep ``ttl`` short.  ``ttl = 0`` turns it off.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class PositiveCache(Generic[T]):
    def __init__(self, ttl: float, clock: IReactorTime, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._secret = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[float, T]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _key(self, user: str | bytes, password: str | bytes) -> bytes:
        u = user.encode("utf-8", "surrogatepass") if isinstance(user, str) else user
        p = password.encode("utf-8", "surrogatepass") if isinstance(password, str) else password
        return hmac.new(self._secret, u + b"\0" + p, hashlib.sha256).digest()

    def get(self, user: str | bytes, password: str | bytes) -> T | None:
        if self.ttl <= 0:
            return None
        key = self._key(user, password)
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self.clock.seconds():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, user: str | bytes, password: str | bytes, value: T) -> None:
        if self.ttl <= 0:
            return
        key = self._key(user, password)
        self._entries[key] = (self.clock.seconds() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
