"""The listener: a hardened twisted.mail ESMTP server, one instance per client connection.

twisted.mail's ``ESMTP`` supplies the class shape (portal, challengers, TLS context,
timeouts); this subclass replaces its input handling, because the stock one executes
plaintext pipelined after STARTTLS, answers out of order when checks are asynchronous,
falls back into command mode on a long DATA line and offers AUTH without TLS
(twisted-notes §1.6).  Here:

* input is framed by the session itself; while any answer is pending (auth, Redis,
  spool) further input is held, not parsed, so pipelined replies stay in order (and the
  transport is paused once too much is held);
* AUTH lives in ``smtpd_auth`` (a mixin of this class);
* STARTTLS discards whatever followed it in the plaintext and resets the session;
* DATA is read in bulk by ``data.BodyReader`` up to ``CRLF.CRLF`` before any reply;
* every reply is a ``Reply`` value from ``gateway.reply``, with an enhanced status code;
* the 250 after DATA is sent only when the sink (the spool) has the message on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from gateway import maillog, policy
from gateway import reply as R
from gateway.auth import Principal
from gateway.data import Body, BodyReader
from gateway.envelope import Address, Envelope, parse_path_and_params
from gateway.listener import ListenerContext
from gateway.message import header_block, parse_headers, received_header
from gateway.optionpolicy import Submitter
from gateway.ratelimit import Lease, Refusal, Subject
from gateway.reply import Reply, ReplyError
from gateway.smtpauth import Exchange
from gateway.smtpd_auth import SessionAuth
from gateway.tls import describe_tls

log = Logger()

COMMAND_LINE_LIMIT = 2048  # Postfix's line_length_limit; RFC 5321 minimum is 512
AUTH_LINE_LIMIT = 12288  # RFC 4954 §4
# While an answer is pending (spool, auth, Redis) pipelined input is held, not parsed;
# past this much the transport is paused, so a client cannot make the session buffer
# without bound.  Below it no pause/resume (two epoll calls per message) is needed.
PAUSE_BUFFER = 256 * 1024
CLOSE_GRACE = 10.0  # seconds a closed session waits for the client's side before an abort


class GatewaySMTP(SessionAuth, smtp.ESMTP):
    """One SMTP session.  ``self.ctx`` is the STARTTLS server creator (None on smtps)."""

    factory: GatewaySMTPFactory

    def __init__(self, context: ListenerContext) -> None:
        super().__init__(chal={}, contextFactory=context.starttls_creator)
        self.context = context
        self.settings = context.settings
        self.clock = context.clock
        self.session = os.urandom(4).hex()
        self.client_ip = ""
        self._buffer = bytearray()
        self._busy = False
        self._paused = False  # reading stopped: too much input held while busy
        self._closed = False
        self._draining = False  # the service is stopping: 421 once no transaction is open
        self._discarding = False  # skipping the rest of an over-long command line
        self._reader: BodyReader | None = None
        self._exchange: Exchange | None = None
        self._deadline: Any = None
        self._counted = False
        self._logout: Callable[[], None] | None = None
        self._lease: Lease | None = None
        self.errors = 0
        self.messages = 0
        self.helo: str | None = None
        self.esmtp = False
        self.principal: Principal | None = None
        self.trusted = False
        self._reset_transaction()

    # -- plumbing -------------------------------------------------------------------------
    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # TimeoutMixin's clock
        return self.clock.callLater(period, func)

    @property
    def tls_active(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def _facts(self) -> policy.SessionFacts:
        return policy.SessionFacts(
            mode=self.settings.mode, tls=self.tls_active, trusted=self.trusted,
            auth_required=self.settings.auth_required, principal=self.principal)

    def _reset_transaction(self) -> None:
        self.sender: Address | None = None
        self.mail_params: dict[str, str | None] = {}
        self.recipients: list[Address] = []

    def connectionMade(self) -> None:
        self.client_ip = policy.peer_address(self.transport.getPeer())
        self.trusted = policy.is_trusted(self.client_ip, self.settings.trusted_networks)
        self.canStartTLS = (self.settings.mode != "smtps" and self.ctx is not None
                            and ITLSTransport.providedBy(self.transport))
        refusal = self.context.connections.open(self.client_ip)
        if refusal is not None:
            maillog.rejected(self.session, self.client_ip, "connect", str(refusal), "connection limit")
            self._send(refusal)
            return
        self._counted = True
        self.context.sessions.add(self)
        maillog.connected(self.session, self.client_ip, self.settings.name)
        self.setTimeout(self.settings.limits.idle_timeout)
        self._deadline = self.clock.callLater(self.settings.limits.session_timeout,
                                              self._session_expired)
        greeting = Reply(220, "", f"{self.settings.hostname} ESMTP itpison-gateway")
        if self.context.limiter is None:
            self._send(greeting)
            return
        subject = self.context.limiter.subject(self.client_ip)
        self._run(self.context.limiter.connect(subject).addCallback(self._admitted, greeting))

    def _admitted(self, outcome: Lease | Refusal, greeting: Reply) -> Reply | None:
        if isinstance(outcome, Refusal):
            maillog.rejected(self.session, self.client_ip, "connect", str(outcome.reply),
                             outcome.reason)
            return outcome.reply
        if self._closed:
            outcome.release()
            return None
        self._lease = outcome
        return greeting

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        self.setTimeout(None)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._counted:
            self._counted = False
            self.context.connections.close(self.client_ip)
            self.context.sessions.discard(self)
            if self.context.on_close is not None:
                self.context.on_close()
            why = "during DATA" if self._reader is not None else "closed"
            maillog.disconnected(self.session, self.client_ip, why, self.messages)
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()

    def timeoutConnection(self) -> None:
        self._send(R.IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        self._deadline = None
        if self._busy:  # a commit is in flight: answer it first, then close
            self._deadline = self.clock.callLater(1.0, self._session_expired)
            return
        self._send(R.SESSION_TIMEOUT)

    def shutdown(self, drain: bool = False) -> None:
        """Service is stopping: 421 4.3.2 and close.  A commit in flight is answered
        first (then the 421 follows it); with ``drain`` a transaction in progress (after
        MAIL, while DATA is read) may also finish first."""
        self._draining = True
        if drain and (self.sender is not None or self._reader is not None):
            return
        if not self._busy and not self._closed:
            self._send(R.SHUTTING_DOWN)

    def _send(self, reply: Reply) -> None:
        if self._closed:
            return
        self.transport.write(reply.encode())
        if reply.disconnect:
            self._close()
            return
        if self._draining and self.sender is None and self._reader is None:
            self._send(R.SHUTTING_DOWN)  # the transaction is over: now stop
            return
        if reply.code >= 400:
            self.errors += 1
            if self.errors >= self.settings.limits.max_errors:
                maillog.rejected(self.session, self.client_ip, "session", "421 4.7.0",
                                 f"{self.errors} errors")
                self.transport.write(R.TOO_MANY_ERRORS.encode())
                self._close()

    def _refuse(self, stage: str, error: ReplyError) -> None:
        maillog.rejected(self.session, self.client_ip, stage, str(error.reply), error.reason)
        self._send(error.reply)

    def _close(self) -> None:
        self._closed = True
        self._buffer.clear()
        self.setTimeout(None)
        # Input may be paused (an answer was pending): read again, or a TLS close would
        # wait forever for the client's close_notify or FIN, holding a connection slot.
        self._paused = False
        self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- input framing ----------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.resetTimeout()
        self._buffer += data
        if self._busy and not self._paused and len(self._buffer) > PAUSE_BUFFER:
            self._paused = True  # an answer is pending and the client keeps sending
            self.transport.pauseProducing()
        self._process()

    def _process(self) -> None:
        while self._buffer and not self._busy and not self._closed:
            if self._reader is not None:
                rest = self._reader.feed(bytes(self._buffer))
                self._buffer = bytearray(rest or b"")
                if rest is None:
                    return
                self._run(self._end_of_data())
                continue
            limit = AUTH_LINE_LIMIT if self._exchange is not None else COMMAND_LINE_LIMIT
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > limit and not self._discarding:
                    self._discarding = True
                    self._buffer.clear()
                    self._refuse("command", ReplyError(R.LINE_TOO_LONG, "command line too long"))
                elif self._discarding:
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._refuse("command", ReplyError(R.LINE_TOO_LONG, "command line too long"))
                continue
            self._run(self._line(line))

    def _run(self, result: Reply | Deferred[Reply | None] | None) -> None:
        """Send a reply now, or hold all input until the deferred one is ready."""
        if isinstance(result, Deferred):
            result.addErrback(self._unexpected)
            early: list[Reply | None] = []
            result.addCallback(_keep, early)
            if not early:
                self._set_busy(True)
                result.addCallback(self._async_done)
                return
            # Already decided (the in-process limiter): answer inline, so a long
            # pipelined batch never recurses through _async_done → _process.
            result = early[0]
        if result is not None:
            self._send(result)

    def _async_done(self, reply: Reply | None) -> None:
        if reply is not None:
            self._send(reply)
        self._set_busy(False)
        self._process()

    def _unexpected(self, failure: Failure) -> Reply:
        if failure.check(ReplyError):
            return failure.value.reply
        log.failure("{session} unexpected error", failure, session=self.session)
        return R.LOCAL_ERROR  # unknown errors are temporary, never a 5xx

    def _set_busy(self, busy: bool) -> None:
        if busy == self._busy or self._closed:
            self._busy = busy
            return
        self._busy = busy
        if busy:
            self.setTimeout(None)
        else:
            self.setTimeout(self.settings.limits.idle_timeout)
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()

    # -- commands ---------------------------------------------------------------------------
    def _line(self, line: bytes) -> Reply | Deferred[Reply | None] | None:
        if self._exchange is not None:
            try:
                return self._auth_step(line)
            except ReplyError as e:
                self._refuse("AUTH", e)
                return None
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"cmd_{verb.upper()}", None) if verb.isalpha() else None
        try:
            if handler is None:
                raise ReplyError(R.UNKNOWN_COMMAND, f"unknown command {verb[:20]!r}")
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in arg):
                raise ReplyError(R.SYNTAX_ERROR, "control character in command")
            return handler(arg)
        except ReplyError as e:
            self._refuse(verb.upper()[:10] or "command", e)
            return None

    def extensions(self) -> dict[bytes, list[bytes]]:
        ext: dict[bytes, list[bytes]] = {
            b"PIPELINING": [],
            b"SIZE": [str(self.settings.limits.max_message_size).encode()],
            b"8BITMIME": [],
            b"ENHANCEDSTATUSCODES": [],
        }
        if self.canStartTLS and not self.tls_active:
            ext[b"STARTTLS"] = []
        if self.tls_active and self.context.portal is not None and self.settings.mechanisms:
            ext[b"AUTH"] = [m.encode() for m in self.settings.mechanisms]
        return ext

    def _greet(self, arg: str, esmtp: bool) -> Reply:
        name = arg.strip()
        if not name or " " in name:
            raise ReplyError(R.BAD_HELO, f"HELO argument {arg[:60]!r}")
        self.helo, self.esmtp = name[:255], esmtp
        self._reset_transaction()
        return R.OK

    def cmd_HELO(self, arg: str) -> Reply:
        self._greet(arg, esmtp=False)
        return Reply(250, "", self.settings.hostname)

    def cmd_EHLO(self, arg: str) -> Reply:
        self._greet(arg, esmtp=True)
        lines = [f"{self.settings.hostname} Hello {self.helo} [{self.client_ip}]"]
        for key, values in self.extensions().items():
            lines.append(b" ".join([key, *values]).decode())
        return Reply(250, "", "\n".join(lines))

    def cmd_NOOP(self, arg: str) -> Reply:
        return R.NOOP_OK

    def cmd_RSET(self, arg: str) -> Reply:
        self._reset_transaction()
        return R.RESET_OK

    def cmd_QUIT(self, arg: str) -> Reply:
        return R.BYE

    def cmd_HELP(self, arg: str) -> Reply:
        return R.HELP

    def cmd_VRFY(self, arg: str) -> Reply:
        if not arg.strip():
            raise ReplyError(R.SYNTAX_ERROR, "VRFY without argument")
        return R.VRFY_CANNOT

    def cmd_EXPN(self, arg: str) -> Reply:
        raise ReplyError(R.NOT_IMPLEMENTED, "EXPN")

    cmd_ETRN = cmd_TURN = cmd_BDAT = cmd_EXPN

    def cmd_STARTTLS(self, arg: str) -> Reply | None:
        if self.tls_active:
            raise ReplyError(R.TLS_ALREADY, "STARTTLS under TLS")
        if not self.canStartTLS:
            raise ReplyError(R.NOT_IMPLEMENTED if self.settings.mode == "smtps" else R.TLS_UNAVAILABLE,
                             "STARTTLS not offered")
        if arg.strip():
            raise ReplyError(R.SYNTAX_ERROR, "STARTTLS takes no argument")
        self._send(R.STARTTLS_GO)
        # RFC 3207 §4.2: forget everything, and drop plaintext pipelined after STARTTLS
        # (the CVE-2011-0411 class of command injection).
        self._buffer.clear()
        self.helo, self.esmtp = None, False
        self._reset_transaction()
        self.transport.startTLS(self.ctx)
        return None

    def _expect_colon(self, arg: str, keyword: str, bad: Reply) -> str:
        head, colon, rest = arg.partition(":")
        if not colon or head.strip().upper() != keyword:
            raise ReplyError(bad, f"expected {keyword}:")
        return rest

    def cmd_MAIL(self, arg: str) -> Reply | Deferred[Reply | None]:
        if self.helo is None:
            raise ReplyError(R.NEED_HELO, "MAIL before HELO")
        if self.sender is not None:
            raise ReplyError(R.NESTED_MAIL, "nested MAIL")
        path = self._expect_colon(arg, "FROM", R.BAD_SENDER_SYNTAX)
        sender, params = parse_path_and_params(path, is_sender=True)
        self._check_mail_params(params)
        refusal = policy.check_mail(self._facts(), sender)
        if refusal is not None:
            raise ReplyError(refusal, f"sender <{sender}> refused")

        def accept() -> Reply:
            self.sender, self.mail_params = sender, params
            return R.SENDER_OK

        if self.context.limiter is None:
            return accept()
        size = params.get("SIZE")
        check = self.context.limiter.mail(self._subject(sender), int(size) if size else None)
        return self._limited("MAIL", check, accept)

    def _subject(self, sender: Address | None, recipient: Address | None = None) -> Subject:
        assert self.context.limiter is not None
        return self.context.limiter.subject(self.client_ip, self.principal, sender, recipient)

    def _limited(self, stage: str, check: Deferred[Refusal | None],
                 accept: Callable[[], Reply | Deferred[Reply | None]]) -> Deferred[Reply | None]:
        """The limiter's verdict: its 4xx (logged), or go on with ``accept``."""
        def decided(refusal: Refusal | None) -> Reply | Deferred[Reply | None]:
            if refusal is None:
                return accept()
            maillog.rejected(self.session, self.client_ip, stage, str(refusal.reply),
                             f"rate limit: {refusal.reason}")
            return refusal.reply
        return check.addCallback(decided)

    def _check_mail_params(self, params: dict[str, str | None]) -> None:
        if not self.esmtp and params:
            raise ReplyError(R.SYNTAX_ERROR, "MAIL parameters after HELO")
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise ReplyError(R.SIZE_SYNTAX, f"SIZE={value}")
                if int(value) > self.settings.limits.max_message_size:
                    raise ReplyError(R.MESSAGE_TOO_BIG, f"declared SIZE={value}")
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise ReplyError(R.UNSUPPORTED_BODY, f"BODY={value}")
            elif key == "SMTPUTF8":
                raise ReplyError(R.SMTPUTF8_UNSUPPORTED, "SMTPUTF8 requested")
            elif key != "AUTH":  # RFC 4954 AUTH= is allowed and ignored
                raise ReplyError(R.UNKNOWN_PARAMETER, f"MAIL parameter {key}")

    def cmd_RCPT(self, arg: str) -> Reply | Deferred[Reply | None]:
        if self.sender is None:
            raise ReplyError(R.NEED_MAIL, "RCPT before MAIL")
        path = self._expect_colon(arg, "TO", R.BAD_RCPT_SYNTAX)
        recipient, params = parse_path_and_params(path, is_sender=False)
        if params:
            raise ReplyError(R.UNKNOWN_PARAMETER, f"RCPT parameters {sorted(params)}")
        refusal = policy.check_rcpt(self._facts(), recipient)
        if refusal is not None:
            raise ReplyError(refusal, f"recipient <{recipient}> refused")
        if recipient in self.recipients:
            return R.RCPT_OK
        if len(self.recipients) >= self.settings.limits.max_recipients:
            raise ReplyError(R.TOO_MANY_RECIPIENTS, f"over {self.settings.limits.max_recipients}")
        sender = self.sender

        def accept() -> Reply:
            if self.sender is sender and recipient not in self.recipients:
                self.recipients.append(recipient)
            return R.RCPT_OK

        if self.context.limiter is None:
            return accept()
        return self._limited("RCPT", self.context.limiter.rcpt(self._subject(sender, recipient)),
                             accept)

    def cmd_DATA(self, arg: str) -> Reply:
        if self.sender is None:
            raise ReplyError(R.NEED_MAIL, "DATA before MAIL")
        if not self.recipients:
            raise ReplyError(R.NO_VALID_RECIPIENTS, "DATA without recipients")
        if arg.strip():
            raise ReplyError(R.SYNTAX_ERROR, "DATA takes no argument")
        limits = self.settings.limits
        self._reader = BodyReader(limits.max_message_size, limits.max_line_length,
                                  limits.bare_line_ending)
        return R.START_DATA

    # -- end of DATA: check, spool, answer ---------------------------------------------------
    def _end_of_data(self) -> Reply | Deferred[Reply | None]:
        reader, self._reader = self._reader, None
        assert reader is not None and self.sender is not None
        sender, recipients = self.sender, [str(r) for r in self.recipients]
        declared_size = self.mail_params.get("SIZE")
        self._reset_transaction()
        result = reader.result()
        if isinstance(result, Reply):
            maillog.rejected(self.session, self.client_ip, "DATA", str(result),
                             f"{reader.raw_size} bytes from <{sender}>")
            return result
        try:
            headers = parse_headers(header_block(result.data))
        except Exception:  # the email package is lenient; be safe anyway
            return R.BAD_MESSAGE_HEADER
        refusal = policy.check_headers(self._facts(), headers)
        if refusal is not None:
            maillog.rejected(self.session, self.client_ip, "DATA", str(refusal),
                             f"From: not owned by {self.principal.name if self.principal else '-'}")
            return refusal
        now = self.clock.seconds()
        qid = self.context.new_id(now)
        body = self._control_headers(result, now, qid)
        if isinstance(body, Reply):
            return body

        def commit() -> Deferred[Reply | None]:
            return self._commit(sender, recipients, body, now, qid)

        if self.context.limiter is None or declared_size is not None:
            return commit()
        # Bytes not declared with SIZE= at MAIL are charged now.
        check = self.context.limiter.data(self._subject(sender), len(body.data))
        return self._limited("DATA", check, commit)

    def _control_headers(self, body: Body, now: float, qid: str) -> Body | Reply:
        """The ITPison X-Headers checked and rewritten (optionpolicy), or the refusal."""
        if self.context.options is None:
            return body
        who = Submitter.from_session(self.principal, self.client_ip)
        try:
            outcome = self.context.options.apply(who, body.data, now, qid)
        except ReplyError as e:
            maillog.rejected(self.session, self.client_ip, "DATA", str(e.reply), e.reason)
            return e.reply
        except Exception:
            log.failure("{session} option headers", session=self.session)
            return R.LOCAL_ERROR  # unknown errors are temporary
        if outcome.notes:
            maillog.options_applied(qid, self.session, who.name, outcome.notes)
        return replace(body, data=outcome.message)

    def _commit(self, sender: Address, recipients: list[str], body: Body, now: float,
                qid: str) -> Deferred[Reply | None]:
        protocol = ("ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls_active else "")
        if self.principal is not None and self.principal.authenticated:
            protocol += "A"
        header = received_header(helo=self.helo, client_ip=self.client_ip,
                                 hostname=self.settings.hostname, protocol=protocol, queue_id=qid,
                                 tls=describe_tls(self.transport), recipients=recipients, when=now)
        message = header + body.data
        auth_user = self.principal.name if self.principal and self.principal.authenticated else None
        try:  # the upstream account the message goes out under (gateway.upstream)
            extra = (self.context.upstream.record(self.principal, qid)
                     if self.context.upstream is not None else {})
        except Exception:
            log.failure("{session} recording the upstream account", session=self.session)
            return succeed(R.LOCAL_ERROR)
        envelope = Envelope(queue_id=qid, sender=str(sender), recipients=tuple(recipients),
                            received_at=now, client_ip=self.client_ip, client_helo=self.helo or "",
                            auth_user=auth_user, listener=self.settings.name,
                            body_8bit=body.is_8bit, size=len(message), extra=extra)
        d = maybeDeferred(self.context.sink.submit, envelope, message)

        def queued(_: object) -> Reply:
            self.messages += 1
            maillog.queued(qid, self.session, envelope.sender, len(recipients), len(message),
                           auth_user, latency=self.clock.seconds() - now)
            return Reply(250, "2.0.0", f"Ok: queued as {qid}")

        def failed(failure: Failure) -> Reply:
            reply = self._unexpected(failure)
            maillog.rejected(self.session, self.client_ip, "DATA", str(reply),
                             f"spool: {failure.getErrorMessage()}")
            return reply

        return d.addCallbacks(queued, failed)


def _keep(value: Any, into: list[Any]) -> Any:
    into.append(value)
    return value


class GatewaySMTPFactory(smtp.SMTPFactory):
    """Builds sessions for one listener; everything a session needs is in the context."""

    protocol = GatewaySMTP

    def __init__(self, context: ListenerContext) -> None:
        super().__init__(portal=context.portal)
        self.context = context
        self.domain = context.settings.hostname
        self.timeout = context.settings.limits.idle_timeout

    def buildProtocol(self, addr: Any) -> GatewaySMTP:
        p = GatewaySMTP(self.context)
        p.factory = self
        p.portal = self.context.portal
        p.host = self.domain
        return p
