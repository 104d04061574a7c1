"""The ``[options]`` configuration section: X-Header defaults, precedence and permissions.

Header keys are the snake_case names of the eleven headers (``link_option`` for
X-LinkOption; see ``xheaders.HEADERS``).  Option values take the guide's integers or
names, friendly or not, in any case: ``link_option = ["NotTrackOpen", "NotTrackAllLink"]``,
``link_option = 192`` and ``link_option = "cLKNotTrackOpenMask|128"`` are the same.
Errors name the key path (``options.groups.marketing.allow.list_option``).
"""

from __future__ import annotations

import string
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from types import MappingProxyType
from typing import Any

from gateway import config_values as v
from gateway import xheaders as X
from gateway.config_values import ConfigError, Context

EMPTY: Mapping[str, Any] = MappingProxyType({})
TEMPLATE_FIELDS = ("user", "date", "time", "queue_id")

# A permission grant or denial per header: True (the whole header) or a frozenset of
# bits (flag headers) or of values (launch_type, launch_class, send_option).
Grant = bool | frozenset[int]


@dataclass(frozen=True)
class OptionProfile:
    """Defaults and extra permissions for a group, a user, or the trusted networks."""

    defaults: Mapping[str, Any] = field(default_factory=lambda: EMPTY)  # header key -> typed value
    allow: Mapping[str, Grant] = field(default_factory=lambda: EMPTY)  # lifts [options.deny] for these
    groups: tuple[str, ...] = ()  # users and trusted: groups they belong to besides


@dataclass(frozen=True)
class OptionsSection:
    """``[options]``: how the gateway checks, fills in and restricts the control headers."""

    forbidden: str = "refuse"  # "refuse" | "strip": a header or bit the sender may not set
    local_time_zone: str | None = None  # IANA zone for times without one; None: refused
    time_format: str = "iso8601"  # "iso8601" | "rfc5322": how times are sent
    max_schedule_ahead: float = 31536000.0  # X-NextLaunchTime at most this far ahead
    job_name_max_length: int = 128
    ref_number_max_length: int = 64
    job_name_template: str | None = None  # e.g. "{user}-{date}": X-JobName when absent
    ref_number_template: str | None = None  # e.g. "{queue_id}": X-RefNumber when absent
    unknown_bits: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # header -> "reject" (default) | "strip"
    precedence: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # header -> "message" (default) | "default"
    force_on: Mapping[str, int] = field(default_factory=lambda: EMPTY)  # flag header -> bits always set
    force_off: Mapping[str, int] = field(default_factory=lambda: EMPTY)  # flag header -> bits always cleared
    defaults: Mapping[str, Any] = field(default_factory=lambda: EMPTY)  # global defaults, header -> value
    deny: Mapping[str, Grant] = field(default_factory=lambda: EMPTY)  # what senders may not set, unless allowed
    groups: Mapping[str, OptionProfile] = field(default_factory=lambda: EMPTY)  # ordered: earlier groups win
    users: Mapping[str, OptionProfile] = field(default_factory=lambda: EMPTY)
    trusted: OptionProfile = field(default_factory=OptionProfile)

    @property
    def zone(self) -> tzinfo | None:
        return zoneinfo.ZoneInfo(self.local_time_zone) if self.local_time_zone else None

    @property
    def limits(self) -> X.Limits:
        return X.Limits(self.job_name_max_length, self.ref_number_max_length, self.zone,
                        self.time_format)


def _header(key: str, path: str) -> X.HeaderSpec:
    try:
        return X.BY_KEY[key]
    except KeyError:
        raise ConfigError(path, "not a control header; use one of "
                                + ", ".join(X.BY_KEY)) from None


def _table_of(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a table, not {v.kind(raw)}")
    return raw


def _bits(header: X.HeaderSpec, raw: Any, path: str) -> int:
    """Flag bits from an integer, a name string, or a list of names and integers."""
    if header.family is None or not header.bitwise:
        raise ConfigError(path, f"{header.name} is not a bitmask header")
    items = raw if isinstance(raw, list) else [raw]
    try:
        if any(isinstance(i, bool) or not isinstance(i, int | str) for i in items):
            raise ValueError("use integers or option names")
        return header.family.encode([i for i in items])  # type: ignore[union-attr]
    except ValueError as e:
        raise ConfigError(path, str(e)) from None


def default_value(header: X.HeaderSpec, raw: Any, path: str, limits: X.Limits) -> Any:
    """A typed default for ``header`` (the same checks as a message's value)."""
    if header.kind == "time":
        raise ConfigError(path, "a fixed time cannot be a default")
    if header.bitwise:
        value = _bits(header, raw, path)
        _, unknown = header.family.decode(value)  # type: ignore[union-attr]
        if unknown:
            raise ConfigError(path, f"bits {unknown} are not in the guide's {header.family.name}")  # type: ignore[union-attr]
        return value
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(text, str):
        raise ConfigError(path, f"must be a string or an integer, not {v.kind(raw)}")
    try:
        return X.parse_value(header, text, limits)
    except X.BadValue as e:
        raise ConfigError(path, str(e)) from None


def _grants(raw: Any, path: str) -> Mapping[str, Grant]:
    out: dict[str, Grant] = {}
    for key, value in _table_of(raw, path).items():
        header = _header(key, f"{path}.{key}")
        if isinstance(value, bool):
            out[key] = value
        elif header.bitwise:
            bits = _bits(header, value, f"{path}.{key}")
            out[key] = frozenset(1 << i for i in range(32) if bits >> i & 1)
        elif header.kind in ("integer", "value"):
            items = value if isinstance(value, list) else [value]
            try:
                out[key] = frozenset(X.parse_value(header, str(i), X.Limits()) for i in items)  # type: ignore[misc]
            except X.BadValue as e:
                raise ConfigError(f"{path}.{key}", str(e)) from None
        else:
            raise ConfigError(f"{path}.{key}", f"{header.name} takes true or false")
    return MappingProxyType(out)


def _defaults(raw: Any, path: str, limits: X.Limits) -> Mapping[str, Any]:
    return MappingProxyType({key: default_value(_header(key, f"{path}.{key}"), value,
                                                f"{path}.{key}", limits)
                             for key, value in _table_of(raw, path).items()})


def _names(raw: Any, path: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(path, "must be a list of group names")
    return tuple(raw)


def _profile(raw: Any, path: str, limits: X.Limits, with_groups: bool) -> OptionProfile:
    keys = ("defaults", "allow") + (("groups",) if with_groups else ())
    values: dict[str, Any] = {}
    for key, value in _table_of(raw, path).items():
        if key not in keys:
            raise ConfigError(f"{path}.{key}", "unknown key; valid: " + ", ".join(keys))
        sub = f"{path}.{key}"
        values[key] = (_defaults(value, sub, limits) if key == "defaults" else
                       _grants(value, sub) if key == "allow" else _names(value, sub))
    return OptionProfile(**values)


def _choices(raw: Any, path: str, options: tuple[str, ...], flags_only: bool = False
             ) -> Mapping[str, str]:
    out = {}
    for key, value in _table_of(raw, path).items():
        header = _header(key, f"{path}.{key}")
        if flags_only and header.kind not in ("flags", "value"):
            raise ConfigError(f"{path}.{key}", f"{header.name} has no bits")
        out[key] = v.choice(*options)(value, f"{path}.{key}", None)
    return MappingProxyType(out)


def _template(value: Any, path: str, ctx: Context) -> str:
    text = v.string(value, path)
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ConfigError(path, f"bad template: {e}") from None
    bad = names - set(TEMPLATE_FIELDS)
    if bad:
        raise ConfigError(path, f"unknown field {{{sorted(bad)[0]}}}; valid: "
                                + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS))
    return text


def _zone(value: Any, path: str, ctx: Context) -> str:
    name = v.string(value, path)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, f"unknown time zone {name!r}: use an IANA name such as"
                                ' "Asia/Taipei" or "UTC"') from None
    return name


_SCALARS: dict[str, v.Convert] = {
    "forbidden": v.choice("refuse", "strip"), "local_time_zone": _zone,
    "time_format": v.choice("iso8601", "rfc5322"), "max_schedule_ahead": v.duration,
    "job_name_max_length": v.int_range(1, 900), "ref_number_max_length": v.int_range(1, 900),
    "job_name_template": _template, "ref_number_template": _template}
_TABLES = ("unknown_bits", "precedence", "force_on", "force_off", "defaults", "deny",
           "groups", "users", "trusted")


def parse_options(raw: Any, ctx: Context) -> OptionsSection:
    values: dict[str, Any] = {}
    table = _table_of(raw, "options")
    for key, value in table.items():
        if key in _SCALARS:
            values[key] = _SCALARS[key](value, f"options.{key}", ctx)
        elif key not in _TABLES:
            raise ConfigError(f"options.{key}", "unknown key; valid: "
                                                + ", ".join([*_SCALARS, *_TABLES]))
    limits = OptionsSection(**values).limits
    for key in _TABLES:
        if key not in table:
            continue
        path, value = f"options.{key}", table[key]
        if key == "unknown_bits":
            values[key] = _choices(value, path, ("reject", "strip"), flags_only=True)
        elif key == "precedence":
            values[key] = _choices(value, path, ("message", "default"))
        elif key in ("force_on", "force_off"):
            values[key] = MappingProxyType({k: _bits(_header(k, f"{path}.{k}"), b, f"{path}.{k}")
                                            for k, b in _table_of(value, path).items()})
        elif key == "defaults":
            values[key] = _defaults(value, path, limits)
        elif key == "deny":
            values[key] = _grants(value, path)
        elif key in ("groups", "users"):
            values[key] = MappingProxyType({
                name: _profile(p, f"{path}.{name}", limits, with_groups=key == "users")
                for name, p in _table_of(value, path).items()})
        else:
            values[key] = _profile(value, path, limits, with_groups=True)
    section = OptionsSection(**values)
    for key in set(section.force_on) & set(section.force_off):
        if section.force_on[key] & section.force_off[key]:
            raise ConfigError(f"options.force_off.{key}", "sets bits that force_on also sets")
    for where, names in [("trusted", section.trusted.groups)] + [
            (f"users.{u}", p.groups) for u, p in section.users.items()]:
        for name in names:
            if name not in section.groups:
                raise ConfigError(f"options.{where}.groups", f"no [options.groups.{name}]")
    return section
