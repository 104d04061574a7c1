"""A read-only view of the spool for the queue commands: list, show, summary.

Blocking file reads (run it in a thread inside the gateway).  Safe next to a running
scheduler: message and state files only ever appear by rename, so a file is read whole
or not at all, and one that vanishes between listing and reading is just skipped.

States, as the commands show them:

- ``incoming``: in queue/, never attempted;
- ``active``: an attempt is running right now (only the running gateway knows);
- ``deferred``: in queue/, attempted, recipients still pending;
- ``hold``: in hold/, waiting for ``queue release``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.envelope import Envelope
from gateway.queuestate import QueueState
from gateway.spool import MAX_ENVELOPE, MAX_FIRST_LINE, _parse_envelope, _parse_first_line

STATES = ("incoming", "active", "deferred", "hold")
# qshape's age buckets, in minutes: "T" (total), then up to 5, 10, 20, ... minutes.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True)
class QueueEntry:
    envelope: Envelope
    state: str
    queue_state: QueueState | None

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    def pending(self) -> list[str]:
        if self.queue_state is None:
            return list(dict.fromkeys(self.envelope.recipients))
        return self.queue_state.pending()

    def matches(self, *, state: str | None = None, user: str | None = None,
                sender: str | None = None, recipient: str | None = None) -> bool:
        env = self.envelope
        return ((state is None or self.state == state)
                and (user is None or (env.auth_user or "") == user)
                and (sender is None or _address_matches(env.sender, sender))
                and (recipient is None
                     or any(_address_matches(r, recipient) for r in env.recipients)))

    def to_json(self, now: float, *, detail: bool = False) -> dict[str, Any]:
        env = self.envelope
        data: dict[str, Any] = {
            "id": env.queue_id, "state": self.state, "size": env.size,
            "received_at": env.received_at, "age": max(0.0, now - env.received_at),
            "sender": env.sender, "user": env.auth_user, "recipients": list(env.recipients),
            "pending": self.pending(),
            "attempts": self.queue_state.attempts if self.queue_state else 0,
            "next_attempt": self.queue_state.next_attempt if self.queue_state else None,
        }
        if detail:
            data["envelope"] = env.to_json()
            upstream = data["envelope"].get("extra", {}).get("upstream")
            if isinstance(upstream, dict) and "sealed" in upstream:  # never shown, even sealed
                data["envelope"]["extra"]["upstream"] = {**upstream, "sealed": "<hidden>"}
            qs = self.queue_state
            data["recipient_status"] = (
                [{"recipient": r.recipient, "status": r.status, "code": r.code,
                  "enhanced": r.enhanced, "text": r.text, "host": r.host,
                  "attempts": r.attempts} for r in qs.recipients] if qs else
                [{"recipient": r, "status": "pending", "code": 0, "enhanced": "", "text": "",
                  "host": "", "attempts": 0} for r in self.pending()])
            data["history"] = ([{"time": h.time, "host": h.host, "recipient": h.recipient,
                                 "reply": h.reply} for h in qs.history] if qs else [])
        return data


def _address_matches(address: str, wanted: str) -> bool:
    """Exact address (case-insensitive), or ``@domain`` for a whole domain."""
    address, wanted = address.lower(), wanted.lower()
    if wanted.startswith("@"):
        return address.endswith(wanted)
    return address == wanted


def read_envelope(path: Path) -> Envelope:
    """The envelope of a message file, without reading the message."""
    with open(path, "rb") as f:
        hlen, _ = _parse_first_line(f.readline(MAX_FIRST_LINE))
        if hlen > MAX_ENVELOPE:
            raise ValueError("envelope too large")
        return _parse_envelope(f.read(hlen), path.name)


def read_state(root: Path, qid: str) -> QueueState | None:
    try:
        return QueueState.from_json(json.loads((root / "state" / f"{qid}.json").read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # being replaced, or corrupt (the scheduler moves it aside)


def load_entry(root: Path, qid: str, in_flight: frozenset[str] = frozenset()
               ) -> QueueEntry | None:
    for directory in ("queue", "hold"):
        try:
            envelope = read_envelope(root / directory / qid)
        except (FileNotFoundError, ValueError, OSError):
            continue
        qs = read_state(root, qid)
        if directory == "hold":
            state = "hold"
        elif qid in in_flight:
            state = "active"
        else:
            state = "deferred" if qs is not None and qs.attempts else "incoming"
        return QueueEntry(envelope, state, qs)
    return None


def entries(root: Path, in_flight: frozenset[str] = frozenset()) -> list[QueueEntry]:
    """Every readable message in queue/ and hold/, oldest first."""
    out = []
    for directory in ("queue", "hold"):
        try:
            names = sorted(p.name for p in (root / directory).iterdir())
        except FileNotFoundError:
            continue
        for qid in names:
            entry = load_entry(root, qid, in_flight)
            if entry is not None:
                out.append(entry)
    return sorted(out, key=lambda e: (e.envelope.received_at, e.queue_id))


def summary(items: list[QueueEntry], now: float) -> dict[str, Any]:
    """Counts per state and age bucket (qshape style), and per recipient domain."""
    labels = ["T", *(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+"]
    by_state = {s: dict.fromkeys(labels, 0) for s in STATES}
    domains: dict[str, int] = {}
    for entry in items:
        row = by_state[entry.state]
        row["T"] += 1
        minutes = max(0.0, now - entry.envelope.received_at) / 60
        bucket = next((str(b) for b in AGE_BUCKETS if minutes <= b), labels[-1])
        row[bucket] += 1
        for rcpt in entry.pending():
            domain = rcpt.rpartition("@")[2].lower()
            domains[domain] = domains.get(domain, 0) + 1
    return {"total": len(items), "columns": labels, "states": by_state,
            "pending_by_domain": dict(sorted(domains.items(), key=lambda kv: (-kv[1], kv[0])))}
