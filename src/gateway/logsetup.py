"""Log observers for ``twistd --logger=...``.

- ``gateway.logsetup.json_stdout``: one JSON object a line on stdout (for journald with a
  log shipper, Loki, Elasticsearch).  Every mail-log event carries ``event`` (connect,
  auth_ok, auth_failed, rejected, queued, attempt, delivered, deferred, bounced, removed,
  reload, ...) and, for message events, ``queue_id``; see README "Logs".
- ``gateway.logsetup.journald_text``: readable lines without twistd's timestamp (journald
  adds its own) and with the syslog priority prefix journald understands (``<3>`` …), so
  ``journalctl -p warning`` works.

Neither ever sees a password: the mail log never passes one (gateway.maillog).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    eventAsJSON,
    formatEvent,
)

_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}
# Keys that make no sense outside the process (objects, format machinery).
_DROP = ("log_logger", "log_source", "log_io", "log_trace", "log_observer")


def json_stdout(stream: IO[str] | None = None) -> ILogObserver:
    """JSON lines (no RFC 7464 record separator) on ``stream`` (stdout)."""
    return FileLogObserver(stream or sys.stdout, lambda event: event_as_json(event) + "\n")


_DELIVERY_EVENTS = {"attempt", "delivered", "deferred", "bounced"}


def event_as_json(event: dict[str, Any]) -> str:
    """One event as the JSON text ``json_stdout`` writes (for tests and tools).

    Delivery events (the ITPison FAQ's delivery log) also get ``recipient_domain``,
    ``status`` (the reply's code and enhanced code, e.g. "550 5.1.1") and ``bounce_class``
    ("hard" for 5xx, "soft" for 4xx, "none" for 2xx)."""
    record = {k: v for k, v in event.items() if k not in _DROP}
    if record.get("event") in _DELIVERY_EVENTS:
        recipient = str(record.get("recipient", ""))
        record.setdefault("recipient_domain", recipient.rpartition("@")[2].lower() or None)
        words = str(record.get("reply", "")).split()
        code = words[0] if words and words[0].isdigit() else None
        enhanced = words[1] if code and len(words) > 1 and words[1].count(".") == 2 else None
        record.setdefault("status", " ".join(filter(None, (code, enhanced))) or None)
        record.setdefault("bounce_class", {"5": "hard", "4": "soft", "2": "none"}.get(
            (code or "?")[0], "unknown"))
    return eventAsJSON(record)


def _journald_line(event: dict[str, Any]) -> str | None:
    text = formatEvent(event)
    if not text:
        return None
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    level = event.get("log_level", LogLevel.info)
    namespace = event.get("log_namespace", "-")
    prefix = f"<{_PRIORITY.get(level, 6)}>"
    if "worker" in event:  # several worker processes (gateway.worker)
        namespace = f"worker {event['worker']} {namespace}"
    return "".join(f"{prefix}[{namespace}] {line}\n" for line in text.splitlines())


def journald_text(stream: IO[str] | None = None) -> ILogObserver:
    """Readable lines with a syslog priority prefix, for journald."""
    return FileLogObserver(stream or sys.stdout, _journald_line)
