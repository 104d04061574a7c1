"""What the gateway sends in the control headers: checks, defaults, permissions, forcing.

For each message, at the end of DATA and before the 250 (``XHeaderPolicy.apply``):

1. each of the eleven headers may appear once; its value must parse (``xheaders``);
2. unknown bits: ``options.unknown_bits.<header>`` = ``reject`` (550 5.6.0, the default)
   or ``strip`` (cleared, logged);
3. permissions: ``options.deny`` names headers, bits or values senders may not set;
   a group's, a user's or the trusted networks' ``allow`` lifts that.  A forbidden one is
   refused (550 5.7.1) or stripped (``options.forbidden``);
4. defaults, lowest first: ``options.defaults`` < groups (the first matching
   ``[options.groups.*]`` in the file wins) < the directory's ``option_defaults``
   attribute < ``[options.users.<name>]`` (or ``[options.trusted]`` for clients that
   relay by network);
5. precedence per header (``options.precedence``): ``message`` (the message's value
   wins; the default fills in when absent) or ``default`` (a default replaces it);
6. flag headers: ``| force_on`` then ``& ~force_off`` (company policy; these apply to what
   the gateway sends: with no header at all, ITPison's account defaults apply);
7. generated X-JobName / X-RefNumber from the templates when still absent;
8. time checks: X-LaunchExpireTime in the future and after X-NextLaunchTime,
   X-NextLaunchTime at most ``max_schedule_ahead`` away.

The principal's ``attributes`` are the seam to the backends: ``groups`` (names) and
``option_defaults`` (header key -> integer, name(s) or text, as in the config).  The
users file fills ``groups``; a directory backend fills both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway import reply as R
from gateway import xheaders as X
from gateway.config_values import ConfigError, duration_text
from gateway.options_config import EMPTY, OptionProfile, OptionsSection, default_value
from gateway.reply import ReplyError

NEXT, EXPIRE = X.spec("X-NextLaunchTime"), X.spec("X-LaunchExpireTime")
JOB_NAME, REF_NUMBER = X.spec("X-JobName"), X.spec("X-RefNumber")
_TEXT_UNSAFE = re.compile(r'[^\x20-\x7e]|[<>"\\;`]')
_REF_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/#+@=-]")


@dataclass(frozen=True)
class Submitter:
    """Who sent the message, as far as the options are concerned."""

    name: str  # the account, or the client IP for a trusted-network client
    authenticated: bool
    groups: tuple[str, ...] = ()  # from the backend (users file, directory)
    directory_defaults: Mapping[str, Any] = field(default_factory=lambda: EMPTY)  # raw

    @classmethod
    def from_session(cls, principal: Any, client_ip: str) -> Submitter:
        if principal is None or not principal.authenticated:
            return cls(client_ip, False)
        attrs = principal.attributes
        return cls(principal.name, True, tuple(attrs.get("groups", ())),
                   attrs.get("option_defaults", EMPTY))


@dataclass(frozen=True)
class Outcome:
    headers: tuple[tuple[X.HeaderSpec, str], ...]  # what is sent, in catalog order
    notes: tuple[str, ...]  # why, one line per decision
    message: bytes  # the message as spooled and relayed


def bad(header: X.HeaderSpec, reason: str) -> ReplyError:
    return ReplyError(R.BAD_CONTROL_HEADER.with_text(f"{header.name}: {reason}"),
                      f"{header.name}: {reason}")


class XHeaderPolicy:
    """The ``[options]`` section applied to messages (pure: no I/O, no clock of its own)."""

    def __init__(self, options: OptionsSection) -> None:
        self.options = options
        self.limits = options.limits

    def apply(self, who: Submitter, message: bytes, now: float, queue_id: str) -> Outcome:
        """The rewritten message and why; raises ReplyError (550/451) to refuse it."""
        fields, _ = X.split_message(message)
        found = X.control_fields(fields)
        notes: list[str] = []
        final = self._decide(who, found, datetime.fromtimestamp(now, UTC), queue_id,
                             notes)
        headers = tuple((h, X.format_value(h, final[h], self.limits)) for h in X.HEADERS
                        if h in final)
        if not found and not headers:
            return Outcome((), (), message)
        return Outcome(headers, tuple(notes), X.rewrite(message, list(headers)))

    # -- the steps ------------------------------------------------------------------------
    def _decide(self, who: Submitter, found: Mapping[X.HeaderSpec, list[X.Field]],
                now: datetime, queue_id: str, notes: list[str]) -> dict[X.HeaderSpec, Any]:
        sent: dict[X.HeaderSpec, Any] = {}
        for header in X.HEADERS:
            occurrences = found.get(header, [])
            if len(occurrences) > 1:
                raise bad(header, f"appears {len(occurrences)} times; send it once")
            if occurrences:
                value = self._message_value(header, occurrences[0], who, notes)
                if value is not None:
                    sent[header] = value
        defaults = self._defaults(who)
        final: dict[X.HeaderSpec, Any] = {}
        for header in X.HEADERS:
            value = self._choose(header, sent.get(header), defaults.get(header.key), notes)
            if header.bitwise:
                value = self._force(header, value, notes)
            if value is not None:
                final[header] = value
        self._generate(final, who, now, queue_id, notes)
        self._check_times(final, now)
        return final

    def _message_value(self, header: X.HeaderSpec, field: X.Field, who: Submitter,
                       notes: list[str]) -> Any:
        text = field.value
        if "\ufffd" in text:
            raise bad(header, "non-ASCII characters")
        try:
            value = X.parse_value(header, text, self.limits)
        except X.BadValue as e:
            raise bad(header, str(e)) from None
        if header.kind in ("flags", "value"):
            value = self._unknown_bits(header, value, notes)
        return self._permitted(header, value, who, notes)

    def _unknown_bits(self, header: X.HeaderSpec, value: int, notes: list[str]) -> int:
        family = header.family
        assert family is not None
        known = getattr(family, "known_mask", None)
        unknown = value & ~(known if known is not None else 15)
        if not unknown:
            return value
        if self.options.unknown_bits.get(header.key, "reject") == "reject":
            raise bad(header, f"unknown bits {unknown} (not in the guide's {family.name})")
        notes.append(f"{header.name}: unknown bits {unknown} stripped")
        return value & ~unknown

    def _permitted(self, header: X.HeaderSpec, value: Any, who: Submitter,
                   notes: list[str]) -> Any:
        denied = self.options.deny.get(header.key, False)
        granted = self._granted(who, header.key)
        if denied is False or granted is True:
            return value
        if denied is True:
            return self._forbidden(header, "setting this header", None, who, notes)
        assert isinstance(denied, frozenset) and isinstance(granted, frozenset)
        if header.bitwise:
            bits = value & sum(denied - granted)
            if bits:
                return self._forbidden(header, f"bits {bits}", value & ~bits, who, notes)
        elif value in denied - granted:
            return self._forbidden(header, f"value {value}", None, who, notes)
        return value

    def _forbidden(self, header: X.HeaderSpec, what: str, rest: Any, who: Submitter,
                   notes: list[str]) -> Any:
        reason = f"{header.name}: {what} not permitted for {who.name}"
        if self.options.forbidden == "refuse":
            raise ReplyError(R.FORBIDDEN_CONTROL_HEADER.with_text(
                f"{header.name}: {what} not permitted"), reason)
        notes.append(f"{reason}: stripped")
        return rest

    def _granted(self, who: Submitter, key: str) -> bool | frozenset[int]:
        total: frozenset[int] = frozenset()
        for profile in self._profiles(who):
            grant = profile.allow.get(key, False)
            if grant is True:
                return True
            if grant:
                total |= grant
        return total

    def _own(self, who: Submitter) -> OptionProfile:
        if who.authenticated:
            return self.options.users.get(who.name, OptionProfile())
        return self.options.trusted

    def _groups(self, who: Submitter) -> list[tuple[str, OptionProfile]]:
        """The configured groups ``who`` belongs to, in file order."""
        member = set(who.groups) | set(self._own(who).groups)
        return [(name, p) for name, p in self.options.groups.items() if name in member]

    def _profiles(self, who: Submitter) -> list[OptionProfile]:
        return [p for _, p in self._groups(who)] + [self._own(who)]

    def _defaults(self, who: Submitter) -> dict[str, tuple[Any, str]]:
        layers: list[tuple[str, Mapping[str, Any]]] = [("global", self.options.defaults)]
        for name, profile in reversed(self._groups(who)):
            layers.append((f"group {name}", profile.defaults))
        if who.authenticated and who.directory_defaults:
            layers.append(("directory", self._directory(who)))
        layers.append((f"user {who.name}" if who.authenticated else "trusted networks",
                       self._own(who).defaults))
        out: dict[str, tuple[Any, str]] = {}
        for origin, values in layers:
            for key, value in values.items():
                out[key] = (value, origin)
        return out

    def _directory(self, who: Submitter) -> dict[str, Any]:
        out = {}
        for key, raw in who.directory_defaults.items():
            try:
                header = X.BY_KEY[key]
                out[key] = default_value(header, list(raw) if isinstance(raw, tuple) else raw,
                                         key, self.limits)
            except (KeyError, ConfigError) as e:
                raise ReplyError(R.OPTION_DEFAULTS_BROKEN,
                                 f"option_defaults of {who.name}: {key}: {e}") from None
        return out

    def _choose(self, header: X.HeaderSpec, sent: Any, default: tuple[Any, str] | None,
                notes: list[str]) -> Any:
        if default is None:
            if sent is not None:
                notes.append(f"{header.name}: {self._show(header, sent)} from the message")
            return sent
        value, origin = default
        shown = self._show(header, value)
        if sent is None:
            notes.append(f"{header.name}: {shown} default from {origin}")
            return value
        if self.options.precedence.get(header.key, "message") == "message":
            notes.append(f"{header.name}: {self._show(header, sent)} from the message"
                         f" (precedence message; {origin} default {shown} not used)")
            return sent
        notes.append(f"{header.name}: {shown} default from {origin} replaces the message's"
                     f" {self._show(header, sent)} (precedence default)")
        return value

    def _force(self, header: X.HeaderSpec, value: int | None, notes: list[str]) -> int | None:
        on = self.options.force_on.get(header.key, 0)
        off = self.options.force_off.get(header.key, 0)
        if value is None and not on:
            return None
        forced = ((value or 0) | on) & ~off
        if forced != value:
            notes.append(f"{header.name}: forced to {self._show(header, forced)}"
                         f" (force_on {on}, force_off {off})")
        return forced

    def _generate(self, final: dict[X.HeaderSpec, Any], who: Submitter, now: datetime,
                  queue_id: str, notes: list[str]) -> None:
        local = now.astimezone(self.limits.local_time_zone or UTC)
        fields = {"user": who.name, "date": local.strftime("%Y%m%d"),
                  "time": local.strftime("%H%M%S"), "queue_id": queue_id}
        for header, template, unsafe, limit in (
                (JOB_NAME, self.options.job_name_template, _TEXT_UNSAFE,
                 self.limits.job_name_max_length),
                (REF_NUMBER, self.options.ref_number_template, _REF_UNSAFE,
                 self.limits.ref_number_max_length)):
            if header in final or template is None:
                continue
            value = unsafe.sub("_", template.format(**fields)).strip()[:limit] or "_"
            final[header] = value
            notes.append(f"{header.name}: {value} generated from {template!r}")

    def _check_times(self, final: Mapping[X.HeaderSpec, Any], now: datetime) -> None:
        launch, expire = final.get(NEXT), final.get(EXPIRE)
        ahead = self.options.max_schedule_ahead
        if launch is not None and launch > now + timedelta(seconds=ahead):
            raise bad(NEXT, f"more than {duration_text(ahead)} ahead")
        if expire is not None and expire <= now:
            raise bad(EXPIRE, "already past")
        if launch is not None and expire is not None and expire <= launch:
            raise bad(EXPIRE, "must be after X-NextLaunchTime")

    def _show(self, header: X.HeaderSpec, value: Any) -> str:
        text = X.format_value(header, value, self.limits)
        if header.bitwise and header.family is not None:
            names = header.family.names(value)  # type: ignore[union-attr]
            return f"{text} ({'|'.join(names)})" if names else text
        return text


def header_names(headers: Iterable[tuple[X.HeaderSpec, str]]) -> list[str]:
    return [f"{h.name}: {text}" for h, text in headers]
