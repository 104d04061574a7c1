"""SMTP replies as values, and the one catalog the listener answers from.

Every reply the gateway sends carries an RFC 3463 enhanced status code.  The text is
for the client and stays generic; the internal reason belongs in the mail log.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class ReplyClass:
    """What the first digit of ``code`` says; shared by the replies the gateway sends
    (``Reply``) and those it receives from a smarthost (``smtpclient.ClientReply``)."""

    code: int

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class Reply(ReplyClass):
    code: int
    enhanced: str
    text: str
    disconnect: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP code {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")

    def with_text(self, text: str) -> Reply:
        return replace(self, text=text)

    def closing(self) -> Reply:
        return replace(self, disconnect=True)

    def encode(self) -> bytes:
        """The reply on the wire: one line per text line, ``code-`` on all but the last."""
        lines = self.text.split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.enhanced:
                prefix += self.enhanced + " "
            out.append((prefix + _printable(line)).rstrip(" ").encode("ascii") + b"\r\n")
        return b"".join(out)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


def _printable(text: str) -> str:
    """Keep a reply on one ASCII line: no CR, LF, control or non-ASCII characters."""
    return "".join(ch if " " <= ch < "\x7f" else "?" for ch in text)


class ReplyError(Exception):
    """Raised by a stage to answer the client with ``reply``; ``reason`` is for the log."""

    def __init__(self, reply: Reply, reason: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.reason = reason or reply.text


# --- the catalog -----------------------------------------------------------------------
# Success
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye", disconnect=True)
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
STARTTLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH")

# Temporary failures
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection", disconnect=True)
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection", disconnect=True)
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit exceeded, closing connection", disconnect=True)
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later", disconnect=True)
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later", disconnect=True)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection", disconnect=True)
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts, try again later", disconnect=True)
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
OPTION_DEFAULTS_BROKEN = Reply(451, "4.3.5", "Option defaults for this account are misconfigured, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

# Permanent failures
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_HELO = Reply(501, "5.5.4", "HELO/EHLO requires a domain or address literal")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_SYNTAX = Reply(501, "5.5.2", "Cannot decode authentication response")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
ENCRYPTION_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by authenticated user")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 998 characters")
BARE_LINEFEED = Reply(550, "5.6.0", "Message contains bare CR or LF; use CRLF line endings")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
BAD_MESSAGE_HEADER = Reply(550, "5.6.0", "Malformed message header")
# ITPison control headers; the text is replaced by "<header>: <reason>"
BAD_CONTROL_HEADER = Reply(550, "5.6.0", "Invalid ITPison control header")
FORBIDDEN_CONTROL_HEADER = Reply(550, "5.7.1", "ITPison control header not permitted")
UNSUPPORTED_BODY = Reply(555, "5.5.4", "Unsupported BODY type")
SMTPUTF8_UNSUPPORTED = Reply(555, "5.6.7", "SMTPUTF8 is not supported by this server")
SIZE_SYNTAX = Reply(501, "5.5.4", "Bad SIZE parameter")
