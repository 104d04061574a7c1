"""The way out: deliver one message to the smarthosts, in order, and say what happened.

``SmarthostRelay.deliver`` never errbacks (except when cancelled): refused connections,
TLS failures, timeouts and 4xx/5xx replies all become per-recipient results.  Every
failure is classified in ONE place, ``classify_reply``/``classify_error`` (Postfix's
smtp_trouble.c in miniature):

- session-level trouble (connect, TLS, timeouts, lost connection, 421, 4xx before RCPT,
  a 5xx greeting/EHLO/AUTH, 530 "authentication required") → try the next smarthost;
  on the last one the undecided recipients TEMPFAIL.  A 5xx that means *our* setup is
  wrong is logged as an error and never bounces mail.
- 5xx to MAIL FROM, to DATA or after the message → PERMFAIL (bounce); 4xx after the
  message → TEMPFAIL; RCPT replies decide per recipient.

One connection per delivery for now; ``_session(host)`` is the seam where a pool goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from gateway import maillog
from gateway.config import RelaySection, SmarthostSection
from gateway.delivery import AttemptResult, Outcome, RecipientResult
from gateway.envelope import Envelope
from gateway.smtpclient import (
    ClientReply,
    ClientTimeout,
    ClientTimeouts,
    CommandInjectionError,
    ConnectionLostError,
    InsecureAuthError,
    SMTPClientError,
    SMTPClientFactory,
    SMTPClientProtocol,
    is_canonical,
)
from gateway.tls import client_creator

log = Logger(namespace="gateway.relay")


# --- classification: the one place ----------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    failover: bool = False  # session-level: try the next smarthost, TEMPFAIL after the last
    misconfigured: bool = False  # our credentials/TLS/host setup is wrong: log as an error


_SOFT_NEXT = Verdict(Outcome.TEMPFAIL, failover=True)
_CONFIG_NEXT = Verdict(Outcome.TEMPFAIL, failover=True, misconfigured=True)
_TEMP = Verdict(Outcome.TEMPFAIL)
_PERM = Verdict(Outcome.PERMFAIL)

# (stage, first digit of the reply code) -> verdict.  Stages: greeting, ehlo, starttls,
# auth, mail, rcpt, data (the reply to DATA), data_end (the reply after the message).
REPLY_VERDICTS: dict[tuple[str, int], Verdict] = {
    ("greeting", 4): _SOFT_NEXT, ("greeting", 5): _CONFIG_NEXT,
    ("ehlo", 4): _SOFT_NEXT, ("ehlo", 5): _CONFIG_NEXT,
    ("starttls", 4): _SOFT_NEXT, ("starttls", 5): _CONFIG_NEXT,
    ("auth", 4): _SOFT_NEXT, ("auth", 5): _CONFIG_NEXT,
    ("mail", 4): _SOFT_NEXT, ("mail", 5): _PERM,
    ("rcpt", 4): _TEMP, ("rcpt", 5): _PERM,
    ("data", 4): _SOFT_NEXT, ("data", 5): _PERM,
    ("data_end", 4): _TEMP, ("data_end", 5): _PERM,
}


def classify_reply(stage: str, reply: ClientReply) -> Verdict:
    """What an unexpected reply at ``stage`` means for the recipients and the host."""
    if reply.code == 421:  # the server is closing the session, whatever the stage
        return _SOFT_NEXT
    if reply.code == 530:  # "authentication required": our configuration, not the mail
        return _CONFIG_NEXT
    if reply.code < 400:  # a success code where another was due: a confused server
        return _SOFT_NEXT
    return REPLY_VERDICTS.get((stage, reply.code // 100), _SOFT_NEXT)


# Exceptions (no reply at all), first match wins; anything else is temporary too.
ERROR_VERDICTS: tuple[tuple[type[BaseException], Verdict], ...] = (
    (InsecureAuthError, _CONFIG_NEXT),  # credentials configured for a plaintext host
    (CommandInjectionError, Verdict(Outcome.TEMPFAIL, misconfigured=True)),  # bad envelope
    (error.ConnectError, _SOFT_NEXT),  # refused, unreachable, DNS, connect timeout
    (defer.TimeoutError, _SOFT_NEXT),
    (ClientTimeout, _SOFT_NEXT),
    (ConnectionLostError, _SOFT_NEXT),
    (SMTPClientError, _SOFT_NEXT),  # malformed or oversized replies
)


def classify_error(stage: str, failure: BaseException) -> Verdict:
    """What an exception at ``stage`` means.  Unknown errors are temporary."""
    if isinstance(failure, ConnectionLostError) and failure.is_tls_failure:
        return _CONFIG_NEXT  # name mismatch, unknown CA, SAN-less certificate...
    for kind, verdict in ERROR_VERDICTS:
        if isinstance(failure, kind):
            return verdict
    return _SOFT_NEXT


class _Failed(Exception):
    """A stage ended the session: the verdict and what to tell about it."""

    def __init__(self, stage: str, verdict: Verdict, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{stage}: {code or ''} {text}".replace("  ", " "))
        self.stage, self.verdict = stage, verdict
        self.code, self.enhanced, self.text = code, enhanced, text


def _reply_failure(stage: str, reply: ClientReply) -> _Failed:
    return _Failed(stage, classify_reply(stage, reply), reply.code, reply.enhanced,
                   " ".join(reply.lines))


@dataclass
class _HostAttempt:
    results: dict[str, RecipientResult]  # recipients this host decided
    failure: _Failed | None = None  # set when the rest should go to the next host
    reached: bool = False  # a TCP connection was made
    stage: str = "connect"  # where the session is (for errors without a reply)


# --- the relay -----------------------------------------------------------------------

class SmarthostRelay:
    """Implements ``gateway.delivery.Relay``: one connection per delivery, failover in order."""

    def __init__(self, smarthosts: Sequence[SmarthostSection], relay_cfg: RelaySection,
                 hostname: str, reactor: Any) -> None:
        if not smarthosts:
            raise ValueError("at least one smarthost is needed")
        self.smarthosts = tuple(smarthosts)
        self.cfg = relay_cfg
        self.hostname = hostname
        self.reactor = reactor
        self.timeouts = ClientTimeouts(greeting=relay_cfg.greeting_timeout,
                                       command=relay_cfg.command_timeout,
                                       data=relay_cfg.data_timeout)
        self._closing: set[defer.Deferred[None]] = set()
        # Built once: a missing CA file is a startup error, not a delivery failure.
        self._creators: dict[int, IOpenSSLClientConnectionCreator] = {
            i: client_creator(h.verify_name, h.ca_file)
            for i, h in enumerate(self.smarthosts) if h.security != "none"}

    def deliver(self, envelope: Envelope, message: bytes) -> defer.Deferred[AttemptResult]:
        return defer.Deferred.fromCoroutine(self._deliver(envelope, message))

    async def _deliver(self, envelope: Envelope, message: bytes) -> AttemptResult:
        recipients = list(dict.fromkeys(envelope.recipients))
        final: dict[str, RecipientResult] = {}
        decided_by = ""
        if not is_canonical(message):
            log.error("{queue_id} message is not in canonical CRLF form; not sending it",
                      queue_id=envelope.queue_id)
            failure = _Failed("data", _TEMP, 0, "", "message not in canonical form (local error)")
            final = self._fail_all(envelope, "", recipients, failure)
            recipients = []
        for index, host in enumerate(self.smarthosts):
            if not recipients:
                break
            attempt = await self._attempt(index, host, envelope, message, recipients)
            final.update(attempt.results)
            if attempt.reached:
                decided_by = host.address
            recipients = [r for r in recipients if r not in attempt.results]
            if attempt.failure is None or not recipients:
                continue
            failure, last = attempt.failure, index == len(self.smarthosts) - 1
            emit = log.error if failure.verdict.misconfigured else log.warn
            emit("{queue_id} smarthost {host} failed at {stage}: {reason}{then}",
                 queue_id=envelope.queue_id, host=host.address, stage=failure.stage,
                 reason=str(failure.code or "") + " " + failure.text,
                 then="" if last else "; trying the next smarthost")
            final.update(self._fail_all(envelope, host.address if attempt.reached else "",
                                        recipients, failure))
        return AttemptResult(decided_by, tuple(final[r] for r in envelope.recipients))

    async def _attempt(self, index: int, host: SmarthostSection, envelope: Envelope,
                       message: bytes, recipients: list[str]) -> _HostAttempt:
        attempt = _HostAttempt({})
        client: SMTPClientProtocol | None = None
        try:
            client = await self._session(index, host)
            attempt.reached = True
            await self._handshake(index, host, client, attempt)
            attempt.stage = "mail"
            self._expect("mail", await client.mail(envelope.sender, self._mail_params(
                client, envelope, message)), 250)
            accepted = []
            for rcpt in recipients:
                attempt.stage = "rcpt"
                reply = await client.rcpt(rcpt)
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                    continue
                verdict = classify_reply("rcpt", reply)
                if verdict.failover:
                    raise _reply_failure("rcpt", reply)
                attempt.results[rcpt] = self._result(envelope, host, rcpt, verdict.outcome, reply)
            if accepted:
                attempt.stage = "data"
                reply = await client.command(b"DATA", stage="DATA")
                if reply.code == 354:
                    attempt.stage = "data_end"
                    reply = await client.send_message(message)
                ended = attempt.stage == "data_end"
                outcome = Outcome.DELIVERED if ended and reply.is_success else None
                if outcome is None:
                    verdict = classify_reply(attempt.stage, reply)
                    if verdict.failover:
                        raise _reply_failure(attempt.stage, reply)
                    outcome = verdict.outcome
                for rcpt in accepted:
                    attempt.results[rcpt] = self._result(envelope, host, rcpt, outcome, reply)
        except defer.CancelledError:
            if client is not None:
                client.abort()
            raise
        except _Failed as failed:
            self._settle(attempt, envelope, host, recipients, failed)
        except Exception as exc:  # no reply at all: connect, TLS, timeout, lost, local
            self._settle(attempt, envelope, host, recipients,
                         self._error_failure(attempt.stage, host, exc))
        if client is not None:
            self._close(client)
        return attempt

    def _settle(self, attempt: _HostAttempt, envelope: Envelope, host: SmarthostSection,
                recipients: list[str], failed: _Failed) -> None:
        """A session-level failure goes to the next host; a message-level one (5xx to
        MAIL, a local envelope problem) decides every recipient not yet decided."""
        if failed.verdict.failover:
            attempt.failure = failed
            return
        if failed.verdict.misconfigured:
            log.error("{queue_id} cannot send via {host}: {reason}", queue_id=envelope.queue_id,
                      host=host.address, reason=failed.text)
        for rcpt in recipients:
            if rcpt not in attempt.results:
                reply = ClientReply(failed.code, failed.enhanced, (failed.text,))
                attempt.results[rcpt] = self._result(envelope, host, rcpt,
                                                     failed.verdict.outcome, reply)

    async def _handshake(self, index: int, host: SmarthostSection,
                         client: SMTPClientProtocol, attempt: _HostAttempt) -> None:
        """Greeting, EHLO, STARTTLS + EHLO, AUTH: ready for MAIL, or raises _Failed."""
        attempt.stage = "greeting"
        self._expect("greeting", await client.greeting(), 220)
        attempt.stage = "ehlo"
        self._expect("ehlo", await client.ehlo(self.hostname), 250)
        if host.security == "starttls":
            attempt.stage = "starttls"
            if "STARTTLS" not in client.extensions:
                raise _Failed("starttls", _CONFIG_NEXT, 0, "",
                              "STARTTLS not offered (refusing to continue in plaintext)")
            self._expect("starttls", await client.starttls(self._creators[index]), 220)
            attempt.stage = "ehlo"
            self._expect("ehlo", await client.ehlo(self.hostname), 250)
        if host.username:
            attempt.stage = "auth"
            await self._authenticate(host, client)

    async def _authenticate(self, host: SmarthostSection, client: SMTPClientProtocol) -> None:
        mechanisms = client.extensions.get("AUTH", "").upper().split()
        user, password = host.username or "", host.password or ""
        insecure = host.allow_insecure_auth
        if "PLAIN" in mechanisms:
            reply = await client.auth_plain(user, password, allow_insecure=insecure)
        elif "LOGIN" in mechanisms:
            reply = await client.auth_login(user, password, allow_insecure=insecure)
        else:
            raise _Failed("auth", _CONFIG_NEXT, 0, "",
                          f"no usable AUTH mechanism offered ({' '.join(mechanisms) or 'none'})")
        self._expect("auth", reply, 235)

    # --- seams and helpers -----------------------------------------------------------
    async def _session(self, index: int, host: SmarthostSection) -> SMTPClientProtocol:
        """A connected client (TLS already started for smtps).  The pool's seam."""
        implicit = self._creators[index] if host.security == "smtps" else None
        factory = SMTPClientFactory(self.reactor, self.timeouts, tls_on_connect=implicit)
        endpoint = HostnameEndpoint(self.reactor, host.host, host.port,
                                    timeout=self.cfg.connect_timeout)
        connecting = endpoint.connect(factory)
        connecting.addTimeout(self.cfg.connect_timeout, self.reactor)  # DNS has no deadline
        return await connecting

    @staticmethod
    def _expect(stage: str, reply: ClientReply, code: int) -> None:
        if reply.code != code:
            raise _reply_failure(stage, reply)

    @staticmethod
    def _mail_params(client: SMTPClientProtocol, envelope: Envelope, message: bytes) -> list[str]:
        params = []
        if "SIZE" in client.extensions:
            params.append(f"SIZE={len(message)}")
        if "8BITMIME" in client.extensions and (envelope.body_8bit or not message.isascii()):
            params.append("BODY=8BITMIME")
        return params

    def _error_failure(self, stage: str, host: SmarthostSection, exc: BaseException) -> _Failed:
        verdict = classify_error(stage, exc)
        if isinstance(exc, ConnectionLostError) and exc.is_tls_failure:
            text = f"TLS failure with {host.verify_name}: {exc.reason.getErrorMessage()}"
        elif isinstance(exc, defer.TimeoutError | error.TimeoutError) and stage == "connect":
            text = f"connect to {host.address} timed out"
        elif stage == "connect":
            text = f"connect to {host.address} failed: {exc}"
        elif isinstance(exc, SMTPClientError):
            text = str(exc)
        else:
            log.failure("unexpected error talking to {host} at {stage}", host=host.address,
                        stage=stage)
            text = f"local error ({type(exc).__name__})"
        return _Failed(stage, verdict, 0, "", text)

    def _result(self, envelope: Envelope, host: SmarthostSection, rcpt: str, outcome: Outcome,
                reply: ClientReply) -> RecipientResult:
        result = RecipientResult(rcpt, outcome, reply.code, reply.enhanced,
                                 " ".join(reply.lines), host.address)
        maillog.attempt(envelope.queue_id, host.address, rcpt, result.describe(), outcome.value)
        return result

    @staticmethod
    def _fail_all(envelope: Envelope, address: str, recipients: list[str],
                  failure: _Failed) -> dict[str, RecipientResult]:
        results = {}
        for rcpt in recipients:
            result = RecipientResult(rcpt, Outcome.TEMPFAIL, failure.code, failure.enhanced,
                                     failure.text, address)
            maillog.attempt(envelope.queue_id, address, rcpt, result.describe(),
                            Outcome.TEMPFAIL.value)
            results[rcpt] = result
        return results

    def _close(self, client: SMTPClientProtocol) -> None:
        """QUIT in the background (bounded by the command deadline), or drop the line."""
        if client.usable:
            defer.Deferred.fromCoroutine(client.quit()).addErrback(lambda _f: None)
        else:
            client.abort()
        closed = client.when_closed()
        if not closed.called:
            self._closing.add(closed)
            closed.addBoth(lambda _: self._closing.discard(closed))

    def wait_closed(self) -> defer.Deferred[Any]:
        """Fires when every connection this relay opened has closed (QUITs included)."""
        return defer.gatherResults(list(self._closing))
