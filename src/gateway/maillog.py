"""The mail log: one call per lifecycle event, with stable keys.

Each event is a twisted.logger event with ``event=<name>`` and its fields as keys, so a
JSON observer gets structured records and the text observer a readable line.  Never pass
a password or a credential here.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger(namespace="gateway.mail")


def connected(session: str, client_ip: str, listener: str) -> None:
    log.info("{session} connect from {client_ip} on {listener}", event="connect",
             session=session, client_ip=client_ip, listener=listener)


def disconnected(session: str, client_ip: str, reason: str, messages: int) -> None:
    log.info("{session} disconnect from {client_ip}: {reason} ({messages} messages)",
             event="disconnect", session=session, client_ip=client_ip, reason=reason,
             messages=messages)


def auth_ok(session: str, client_ip: str, user: str, mechanism: str, backend: str = "") -> None:
    log.info("{session} auth ok user={user} mechanism={mechanism} backend={backend} from {client_ip}",
             event="auth_ok", session=session, client_ip=client_ip, user=user,
             mechanism=mechanism, backend=backend or "-")


def auth_failed(session: str, client_ip: str, user: str, mechanism: str, reason: str) -> None:
    log.warn("{session} auth failed user={user!r} mechanism={mechanism} from {client_ip}: {reason}",
             event="auth_failed", session=session, client_ip=client_ip, user=user,
             mechanism=mechanism, reason=reason)


def rejected(session: str, client_ip: str, stage: str, reply: str, reason: str) -> None:
    log.info("{session} reject {stage} from {client_ip}: {reply} ({reason})", event="rejected",
             session=session, client_ip=client_ip, stage=stage, reply=reply, reason=reason)


def options_applied(queue_id: str, session: str, user: str, notes: tuple[str, ...]) -> None:
    """What the X-Header policy did to a message (defaults, forcing, stripping)."""
    log.info("{queue_id} options user={user}: {summary}", event="options", queue_id=queue_id,
             session=session, user=user, notes=list(notes), summary="; ".join(notes))


def queued(queue_id: str, session: str, sender: str, recipients: int, size: int,
           user: str | None, latency: float | None = None) -> None:
    """``latency``: end of DATA to the 250 (checks, spool write, fsync), in seconds."""
    log.info("{queue_id} queued from=<{sender}> nrcpt={recipients} size={size} user={user}",
             event="queued", queue_id=queue_id, session=session, sender=sender,
             recipients=recipients, size=size, user=user or "-", latency=latency)


def attempt(queue_id: str, host: str, recipient: str, reply: str, outcome: str) -> None:
    log.info("{queue_id} attempt to=<{recipient}> relay={host} status={outcome} reply={reply!r}",
             event="attempt", queue_id=queue_id, host=host, recipient=recipient, reply=reply,
             outcome=outcome)


def delivered(queue_id: str, recipient: str, host: str, reply: str, delay: float) -> None:
    log.info("{queue_id} delivered to=<{recipient}> relay={host} delay={delay:.2f}s reply={reply!r}",
             event="delivered", queue_id=queue_id, recipient=recipient, host=host, reply=reply,
             delay=delay)


def deferred(queue_id: str, recipient: str, host: str, reply: str, next_attempt_in: float) -> None:
    log.info("{queue_id} deferred to=<{recipient}> relay={host} retry_in={next_attempt_in:.0f}s reply={reply!r}",
             event="deferred", queue_id=queue_id, recipient=recipient, host=host, reply=reply,
             next_attempt_in=next_attempt_in)


def bounced(queue_id: str, recipient: str, host: str, reply: str, dsn_id: str | None) -> None:
    log.warn("{queue_id} bounced to=<{recipient}> relay={host} reply={reply!r} dsn={dsn_id}",
             event="bounced", queue_id=queue_id, recipient=recipient, host=host, reply=reply,
             dsn_id=dsn_id or "-")


def removed(queue_id: str, reason: str) -> None:
    log.info("{queue_id} removed: {reason}", event="removed", queue_id=queue_id, reason=reason)
