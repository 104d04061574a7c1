"""The way out: deliver one message through the smarthosts, in order, and say what happened.

``SmarthostRelay.deliver`` never errbacks (except when cancelled): refused connections,
TLS failures, timeouts and 4xx/5xx replies all become per-recipient results.  What each
failure means is decided in ONE place, gateway.trouble (re-exported here).

For each delivery the hosts are taken in the configured order, minus those whose circuit
breaker is open (gateway.breaker; all of them when every one is open).  A session comes
from the connection pool (gateway.pool): a pooled connection is reused after an RSET
(with the command deadline; a stale one is replaced by a fresh connection at no cost
to the message), or a new one is opened by gateway.smarthost (fallback ports, TLS,
EHLO, AUTH).  After the message the connection goes back to the pool, which keeps it for
the next message within its limits.  A session failure on a host moves the undecided
recipients to the next host without spending a retry; after the last host they TEMPFAIL.

Upstream identity (gateway.upstream): a message recorded with an account of its own (an
OMICard user's, or a group's) goes out under that account; the pool is then keyed by
(smarthost, account), so sessions are never shared between accounts.  An AUTH refusal
of a user's own credential says nothing about the smarthost: it does not count against
the breaker.  A message whose account cannot be restored (key lost, account removed)
is deferred, never sent under another account.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from gateway import maillog
from gateway.breaker import CircuitBreaker, route
from gateway.config import RelaySection, SmarthostSection
from gateway.delivery import AttemptResult, Outcome, RecipientResult
from gateway.envelope import Envelope
from gateway.pool import ConnectionPool, Lease, PoolLimits
from gateway.smarthost import Session, SmarthostConnector
from gateway.smtpclient import ClientReply, is_canonical
from gateway.trouble import (  # noqa: F401  (the classification API lives in trouble)
    ERROR_VERDICTS,
    REPLY_VERDICTS,
    TEMP,
    Failed,
    Verdict,
    classify_error,
    classify_reply,
    error_failure,
    reply_failure,
)
from gateway.upstream import UpstreamError, UpstreamPolicy

log = Logger(namespace="gateway.relay")

RSET_TRIES = 3  # reused connections that may fail their RSET before a fresh one is opened


@dataclass
class _HostAttempt:
    results: dict[str, RecipientResult]  # recipients this host decided
    failure: Failed | None = None  # set when the rest should go to the next host
    address: str = ""  # the host:port reached, "" when none was
    stage: str = "connect"  # where the session is (for errors without a reply)


@dataclass
class RelayStats:
    """Counters for the metrics issue to export; keys are smarthost addresses."""

    messages: int = 0
    failovers: Counter[str] = field(default_factory=Counter)
    misconfigured: Counter[str] = field(default_factory=Counter)
    stale_reused: int = 0  # pooled connections that failed their RSET and were replaced


class SmarthostRelay:
    """Implements ``gateway.delivery.Relay`` with a connection pool, breakers and failover."""

    def __init__(self, smarthosts: Sequence[SmarthostSection], relay_cfg: RelaySection,
                 hostname: str, reactor: Any, upstream: UpstreamPolicy | None = None) -> None:
        if not smarthosts:
            raise ValueError("at least one smarthost is needed")
        self.smarthosts = tuple(smarthosts)
        self.cfg = relay_cfg
        self.hostname = hostname
        self.reactor = reactor
        self.connector = SmarthostConnector(self.smarthosts, relay_cfg, hostname, reactor)
        self.pool: ConnectionPool[Session] = ConnectionPool(self.connector, PoolLimits(
            max_connections=relay_cfg.max_connections_per_host,
            max_uses=relay_cfg.max_messages_per_connection,
            idle_timeout=relay_cfg.connection_idle_timeout,
            max_age=relay_cfg.connection_max_age), reactor)
        self.breakers = [CircuitBreaker(h.address, relay_cfg.breaker_failures,
                                        relay_cfg.breaker_cooldown, reactor)
                         for h in self.smarthosts]
        self.stats = RelayStats()
        self.upstream = upstream

    def deliver(self, envelope: Envelope, message: bytes) -> defer.Deferred[AttemptResult]:
        return defer.Deferred.fromCoroutine(self._deliver(envelope, message))

    async def _deliver(self, envelope: Envelope, message: bytes) -> AttemptResult:
        self.stats.messages += 1
        recipients = list(dict.fromkeys(envelope.recipients))
        final: dict[str, RecipientResult] = {}
        decided_by = ""
        if not is_canonical(message):
            log.error("{queue_id} message is not in canonical CRLF form; not sending it",
                      queue_id=envelope.queue_id)
            failure = Failed("data", TEMP, 0, "", "message not in canonical form (local error)")
            final = self._fail_all(envelope, "", recipients, failure)
            recipients = []
        account = None
        if recipients and self.upstream is not None:
            try:
                account = self.upstream.restore(envelope.extra, envelope.queue_id)
            except UpstreamError as e:
                log.error("{queue_id} cannot restore the upstream account: {reason}; "
                          "deferred", queue_id=envelope.queue_id, reason=str(e))
                failure = Failed("auth", TEMP, 0, "", "upstream account unavailable "
                                 "(local error)")
                final = self._fail_all(envelope, "", recipients, failure)
                recipients = []
        candidates, forced = route(list(range(len(self.smarthosts))), self.breakers)
        for n, index in enumerate(candidates):
            if not recipients:
                break
            host, breaker = self.smarthosts[index], self.breakers[index]
            if not forced and not breaker.allow():
                continue  # half-open and another delivery is probing it
            try:
                attempt = await self._attempt(index, envelope, message, recipients, account)
            except defer.CancelledError:
                breaker.release_probe()
                raise
            self._judge(index, attempt, account)
            final.update(attempt.results)
            if attempt.address:
                decided_by = attempt.address
            recipients = [r for r in recipients if r not in attempt.results]
            if attempt.failure is None or not recipients:
                continue
            failure, last = attempt.failure, n == len(candidates) - 1
            emit = log.error if failure.verdict.misconfigured else log.warn
            emit("{queue_id} smarthost {host} failed at {stage}: {reason}{then}",
                 queue_id=envelope.queue_id, host=failure.address or host.address,
                 stage=failure.stage, reason=str(failure.code or "") + " " + failure.text,
                 then="" if last else "; trying the next smarthost")
            final.update(self._fail_all(envelope, attempt.address, recipients, failure))
        return AttemptResult(decided_by, tuple(final[r] for r in envelope.recipients))

    def _judge(self, index: int, attempt: _HostAttempt, account: Any = None) -> None:
        """Tell the breaker (and the counters) how the host did."""
        host, breaker = self.smarthosts[index], self.breakers[index]
        failure = attempt.failure
        if failure is None:
            breaker.success()
            return
        if account is not None and account.personal and failure.stage == "auth" \
                and failure.code >= 500:
            breaker.release_probe()
            log.warn("smarthost {host} refused the personal credential of {user}: {reason}",
                     host=failure.address or host.address, user=account.username,
                     reason=f"{failure.code} {failure.text}")
            return
        breaker.failure()
        self.stats.failovers[host.address] += 1
        if failure.verdict.misconfigured:
            self.stats.misconfigured[host.address] += 1
            log.critical("smarthost {host} looks MISCONFIGURED ({stage}: {reason}): check "
                         "its host name, port, security, tls_name, ca_file and credentials",
                         host=failure.address or host.address, stage=failure.stage,
                         reason=str(failure.code or "") + " " + failure.text,
                         event="smarthost_misconfigured")

    async def _attempt(self, index: int, envelope: Envelope, message: bytes,
                       recipients: list[str], account: Any = None) -> _HostAttempt:
        attempt = _HostAttempt({})
        lease: Lease[Session] | None = None
        reusable = False
        try:
            lease = await self._session(index if account is None else (index, account))
            attempt.address = lease.conn.address
            reusable = await self._transaction(lease.conn, attempt, envelope, message,
                                               recipients)
        except defer.CancelledError:
            if lease is not None:
                lease.conn.client.abort()
                self.pool.discard(lease)
            raise
        except Failed as failed:
            attempt.address = attempt.address or failed.address
            self._settle(attempt, envelope, recipients, failed)
        except Exception as exc:  # no reply at all: timeout, lost connection, local error
            host = self.smarthosts[index]
            self._settle(attempt, envelope, recipients, error_failure(
                attempt.stage, attempt.address or host.address, host.verify_name, exc,
                reached=bool(attempt.address)))
        if lease is not None:
            self.pool.release(lease, reusable=reusable)
        return attempt

    async def _transaction(self, session: Session, attempt: _HostAttempt, envelope: Envelope,
                           message: bytes, recipients: list[str]) -> bool:
        """MAIL, RCPTs, DATA; returns whether the connection is fit for another message."""
        client, address = session.client, session.address
        attempt.stage = "mail"
        reply = await client.mail(envelope.sender, self._mail_params(client, envelope, message))
        if reply.code != 250:
            raise reply_failure("mail", reply, address)
        accepted = []
        for rcpt in recipients:
            attempt.stage = "rcpt"
            reply = await client.rcpt(rcpt)
            if reply.code in (250, 251):
                accepted.append(rcpt)
                continue
            verdict = classify_reply("rcpt", reply)
            if verdict.failover:
                raise reply_failure("rcpt", reply, address)
            attempt.results[rcpt] = self._result(envelope, address, rcpt, verdict.outcome, reply)
        if not accepted:
            return True  # the next user of the connection sends RSET first
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
                raise reply_failure(attempt.stage, reply, address)
            outcome = verdict.outcome
        for rcpt in accepted:
            attempt.results[rcpt] = self._result(envelope, address, rcpt, outcome, reply)
        return True

    async def _session(self, key: Any) -> Lease[Session]:
        """A session ready for MAIL: a pooled one that answers RSET, or a new one.  The
        key is the smarthost index, or (index, upstream account)."""
        for _ in range(RSET_TRIES):
            lease = await self.pool.acquire(key)
            if not lease.reused:
                return lease
            try:
                reply = await lease.conn.client.rset()
            except defer.CancelledError:
                self.pool.discard(lease)
                raise
            except Exception:
                reply = None
            if reply is not None and reply.code == 250:
                return lease
            self.stats.stale_reused += 1
            log.info("pooled connection to {address} failed its RSET ({reply}); replacing it",
                     address=lease.conn.address, reply=reply or "no reply")
            self.pool.discard(lease)
        return await self.pool.acquire(key)  # may still be pooled; then it answered no RSET

    def _settle(self, attempt: _HostAttempt, envelope: Envelope, recipients: list[str],
                failed: Failed) -> None:
        """A session-level failure goes to the next host; a message-level one (5xx to
        MAIL, a local envelope problem) decides every recipient not yet decided."""
        if failed.verdict.failover:
            attempt.failure = failed
            return
        if failed.verdict.misconfigured:
            log.error("{queue_id} cannot send via {host}: {reason}", queue_id=envelope.queue_id,
                      host=attempt.address, reason=failed.text)
        for rcpt in recipients:
            if rcpt not in attempt.results:
                attempt.results[rcpt] = self._result(envelope, attempt.address, rcpt,
                                                     failed.verdict.outcome, failed.reply)

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _mail_params(client: Any, envelope: Envelope, message: bytes) -> list[str]:
        params = []
        if "SIZE" in client.extensions:
            params.append(f"SIZE={len(message)}")
        if "8BITMIME" in client.extensions and (envelope.body_8bit or not message.isascii()):
            params.append("BODY=8BITMIME")
        return params

    @staticmethod
    def _result(envelope: Envelope, address: str, rcpt: str, outcome: Outcome,
                reply: ClientReply) -> RecipientResult:
        result = RecipientResult(rcpt, outcome, reply.code, reply.enhanced,
                                 " ".join(reply.lines), address)
        maillog.attempt(envelope.queue_id, address, rcpt, result.describe(), outcome.value)
        return result

    @staticmethod
    def _fail_all(envelope: Envelope, address: str, recipients: list[str],
                  failure: Failed) -> dict[str, RecipientResult]:
        results = {}
        for rcpt in recipients:
            result = RecipientResult(rcpt, Outcome.TEMPFAIL, failure.code, failure.enhanced,
                                     failure.text, address)
            maillog.attempt(envelope.queue_id, address, rcpt, result.describe(),
                            Outcome.TEMPFAIL.value)
            results[rcpt] = result
        return results

    def close(self) -> defer.Deferred[Any]:
        """Stop pooling: QUIT the idle connections (lent ones on return); fires when every
        connection is closed."""
        self.pool.close()
        return self.connector.wait_closed()

    def wait_closed(self) -> defer.Deferred[Any]:
        """Close the idle pooled connections; fires when every connection this relay opened
        has closed (QUITs included).  The relay stays usable."""
        self.pool.close_idle()
        return self.connector.wait_closed()
