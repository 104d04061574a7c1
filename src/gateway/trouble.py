"""Every outbound failure classified in ONE place (Postfix's smtp_trouble.c in miniature).

By scope:

- connection / session (connect, TLS, timeouts, lost connection, 421, 4xx before RCPT,
  a 5xx greeting/EHLO/AUTH, 530 "authentication required") → ``failover``: the next
  smarthost for this message, without spending one of its retries; after the last
  host the undecided recipients TEMPFAIL (deferred with backoff).  Such a failure also
  counts against the host's circuit breaker.  A 5xx that means *our* setup is wrong
  (greeting, AUTH, TLS verification) is ``misconfigured``: logged loudly and counted,
  never a bounce;
- message (5xx to MAIL FROM, to DATA or after the message → PERMFAIL, bounce; 4xx after
  the message → TEMPFAIL);
- recipient (the RCPT reply: 4xx TEMPFAIL, 5xx PERMFAIL for that recipient only).

The relay and the connector never decide anything themselves: they ask here.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.logger import Logger

from gateway.delivery import Outcome
from gateway.smtpclient import (
    ClientReply,
    ClientTimeout,
    CommandInjectionError,
    ConnectionLostError,
    InsecureAuthError,
    SMTPClientError,
)

log = Logger(namespace="gateway.relay")


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    failover: bool = False  # session-level: try the next smarthost, TEMPFAIL after the last
    misconfigured: bool = False  # our credentials/TLS/host setup is wrong: log as an error


SOFT_NEXT = Verdict(Outcome.TEMPFAIL, failover=True)
CONFIG_NEXT = Verdict(Outcome.TEMPFAIL, failover=True, misconfigured=True)
TEMP = Verdict(Outcome.TEMPFAIL)
PERM = Verdict(Outcome.PERMFAIL)

# (stage, first digit of the reply code) -> verdict.  Stages: greeting, ehlo, starttls,
# auth, rset (reusing a pooled connection), mail, rcpt, data (the reply to DATA),
# data_end (the reply after the message).
REPLY_VERDICTS: dict[tuple[str, int], Verdict] = {
    ("greeting", 4): SOFT_NEXT, ("greeting", 5): CONFIG_NEXT,
    ("ehlo", 4): SOFT_NEXT, ("ehlo", 5): CONFIG_NEXT,
    ("starttls", 4): SOFT_NEXT, ("starttls", 5): CONFIG_NEXT,
    ("auth", 4): SOFT_NEXT, ("auth", 5): CONFIG_NEXT,
    ("rset", 4): SOFT_NEXT, ("rset", 5): SOFT_NEXT,
    ("mail", 4): SOFT_NEXT, ("mail", 5): PERM,
    ("rcpt", 4): TEMP, ("rcpt", 5): PERM,
    ("data", 4): SOFT_NEXT, ("data", 5): PERM,
    ("data_end", 4): TEMP, ("data_end", 5): PERM,
}


def classify_reply(stage: str, reply: ClientReply) -> Verdict:
    """What an unexpected reply at ``stage`` means for the recipients and the host."""
    if reply.code == 421:  # the server is closing the session, whatever the stage
        return SOFT_NEXT
    if reply.code == 530:  # "authentication required": our configuration, not the mail
        return CONFIG_NEXT
    if reply.code < 400:  # a success code where another was due: a confused server
        return SOFT_NEXT
    return REPLY_VERDICTS.get((stage, reply.code // 100), SOFT_NEXT)


# Exceptions (no reply at all), first match wins; anything else is temporary too.
ERROR_VERDICTS: tuple[tuple[type[BaseException], Verdict], ...] = (
    (InsecureAuthError, CONFIG_NEXT),  # credentials configured for a plaintext host
    (CommandInjectionError, Verdict(Outcome.TEMPFAIL, misconfigured=True)),  # bad envelope
    (error.ConnectError, SOFT_NEXT),  # refused, unreachable, DNS, connect timeout
    (defer.TimeoutError, SOFT_NEXT),
    (ClientTimeout, SOFT_NEXT),
    (ConnectionLostError, SOFT_NEXT),
    (SMTPClientError, SOFT_NEXT),  # malformed or oversized replies
)


def classify_error(stage: str, failure: BaseException) -> Verdict:
    """What an exception at ``stage`` means.  Unknown errors are temporary."""
    if isinstance(failure, ConnectionLostError) and failure.is_tls_failure:
        return CONFIG_NEXT  # name mismatch, unknown CA, SAN-less certificate...
    for kind, verdict in ERROR_VERDICTS:
        if isinstance(failure, kind):
            return verdict
    return SOFT_NEXT


def is_unreachable(failure: BaseException) -> bool:
    """The port could not be reached at all (try the host's next port, if it has one)."""
    return isinstance(failure, error.ConnectError | defer.TimeoutError)


class Failed(Exception):
    """A stage ended the session: the verdict and what to tell about it.  ``address`` is
    the smarthost address reached (``host:port``), or "" when none was."""

    def __init__(self, stage: str, verdict: Verdict, code: int, enhanced: str, text: str,
                 address: str = "") -> None:
        super().__init__(f"{stage}: {code or ''} {text}".replace("  ", " "))
        self.stage, self.verdict = stage, verdict
        self.code, self.enhanced, self.text = code, enhanced, text
        self.address = address

    @property
    def reply(self) -> ClientReply:
        return ClientReply(self.code, self.enhanced, (self.text,))


def reply_failure(stage: str, reply: ClientReply, address: str = "") -> Failed:
    return Failed(stage, classify_reply(stage, reply), reply.code, reply.enhanced,
                  " ".join(reply.lines), address)


def error_failure(stage: str, address: str, verify_name: str, exc: BaseException,
                  reached: bool) -> Failed:
    """A Failed for an exception (no reply) at ``stage`` while talking to ``address``."""
    verdict = classify_error(stage, exc)
    if isinstance(exc, ConnectionLostError) and exc.is_tls_failure:
        text = f"TLS failure with {verify_name}: {exc.reason.getErrorMessage()}"
    elif isinstance(exc, defer.TimeoutError | error.TimeoutError) and stage == "connect":
        text = f"connect to {address} timed out"
    elif stage == "connect":
        text = f"connect to {address} failed: {exc}"
    elif isinstance(exc, SMTPClientError):
        text = str(exc)
    else:
        log.failure("unexpected error talking to {host} at {stage}", host=address, stage=stage)
        text = f"local error ({type(exc).__name__})"
    return Failed(stage, verdict, 0, "", text, address if reached else "")
