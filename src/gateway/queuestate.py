"""Per-message delivery state: what the scheduler persists after every attempt.

Stored by the spool as ``state/<qid>.json``.  A message without a state file has never
been attempted.  The scheduler decides the transitions; this module only records them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.delivery import Outcome, RecipientResult
from gateway.envelope import Envelope

PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"
STATUSES = (PENDING, DELIVERED, BOUNCED)
HISTORY_LIMIT = 50  # attempt records kept per message (the newest)
VERSION = 1


@dataclass
class RecipientState:
    recipient: str
    status: str = PENDING
    code: int = 0  # the last SMTP code seen for this recipient (0: none)
    enhanced: str = ""
    text: str = ""  # the last reply text or local reason
    host: str = ""
    attempts: int = 0
    expired: bool = False  # bounced because the message outlived queue.max_lifetime

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"bad recipient status {self.status!r}")

    def result(self) -> RecipientResult:
        """The last result as a value (an expiry is a TEMPFAIL, other bounces PERMFAIL)."""
        outcome = {DELIVERED: Outcome.DELIVERED, PENDING: Outcome.TEMPFAIL}.get(
            self.status, Outcome.TEMPFAIL if self.expired else Outcome.PERMFAIL)
        return RecipientResult(self.recipient, outcome, self.code, self.enhanced, self.text,
                               self.host)


@dataclass(frozen=True)
class AttemptRecord:
    time: float
    host: str
    recipient: str
    reply: str


@dataclass
class QueueState:
    queue_id: str
    recipients: list[RecipientState]
    attempts: int = 0  # delivery attempts of the message
    first_attempt: float | None = None
    last_attempt: float | None = None
    next_attempt: float = 0.0
    history: list[AttemptRecord] = field(default_factory=list)

    @classmethod
    def new(cls, envelope: Envelope) -> QueueState:
        """The state of a message never attempted: every recipient pending, due now."""
        unique = dict.fromkeys(envelope.recipients)
        return cls(envelope.queue_id, [RecipientState(r) for r in unique])

    def get(self, recipient: str) -> RecipientState | None:
        for r in self.recipients:
            if r.recipient == recipient:
                return r
        return None

    def pending(self) -> list[str]:
        return [r.recipient for r in self.recipients if r.status == PENDING]

    def bounced(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == BOUNCED]

    def begin_attempt(self, now: float) -> None:
        self.attempts += 1
        if self.first_attempt is None:
            self.first_attempt = now
        self.last_attempt = now

    def record(self, result: RecipientResult, status: str, now: float, *,
               expired: bool = False) -> RecipientState:
        """Store one recipient's result of the current attempt under ``status``."""
        r = self.get(result.recipient)
        if r is None:
            raise KeyError(result.recipient)
        r.status = status
        r.code, r.enhanced, r.text, r.host = result.code, result.enhanced, result.text, result.host
        r.attempts += 1
        r.expired = expired
        self.history.append(AttemptRecord(now, result.host, result.recipient, result.describe()))
        del self.history[:-HISTORY_LIMIT]
        return r

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueState:
        if data.get("version") != VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        return cls(
            queue_id=str(data["queue_id"]),
            recipients=[RecipientState(**r) for r in data["recipients"]],
            attempts=int(data["attempts"]),
            first_attempt=data.get("first_attempt"),
            last_attempt=data.get("last_attempt"),
            next_attempt=float(data["next_attempt"]),
            history=[AttemptRecord(**h) for h in data.get("history", [])],
        )
