"""What one delivery attempt to the smarthost produced: values shared by relay and scheduler.

The relay never errbacks: a refused connection, a TLS failure or a 421 are results too,
expressed per recipient so the scheduler can persist them and decide retry or bounce.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from gateway.envelope import Envelope


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx from the smarthost for this recipient
    TEMPFAIL = "tempfail"  # 4xx, or no answer at all: retry later
    PERMFAIL = "permfail"  # 5xx for this recipient: bounce


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    code: int  # the SMTP code, or 0 when the failure was not an SMTP reply
    enhanced: str  # "5.1.1", or "" when the smarthost gave none
    text: str  # the smarthost's reply text or the local reason (for the log and the DSN)
    host: str = ""  # "smtp.itpison.com:465", or "" when no host was reached

    def describe(self) -> str:
        if self.code:
            return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")
        return self.text


@dataclass(frozen=True)
class AttemptResult:
    host: str  # the smarthost that decided the attempt, or "" when none was reached
    results: tuple[RecipientResult, ...]


class Relay(Protocol):
    """The seam between the scheduler and the way out (issue 3 puts a pool behind it)."""

    def deliver(self, envelope: Envelope, message: bytes) -> Deferred[AttemptResult]:
        """Send ``message`` (canonical CRLF form, not dot-stuffed) to ``envelope.recipients``
        that the caller passes in the envelope.  Never errbacks; cancellable."""
        ...
