"""The ``[ratelimit]`` section: its frozen dataclasses and their validation.

Part of :mod:`gateway.config` (which re-exports the classes); kept apart so the rate
limiter's configuration reads as one piece.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import config_values as v
from gateway.config_values import ConfigError, Context

DIMENSIONS = ("connections", "messages", "recipients", "bytes")
KEYS = ("user", "ip", "net", "sender", "sender_domain", "rcpt_domain")
CONNECTION_KEYS = ("ip", "net")  # known at connect time


@dataclass(frozen=True)
class RateRuleSection:
    """One ``[[ratelimit.rules]]``: ``limit`` of ``dimension`` per ``key`` per ``window``."""

    dimension: str  # connections | messages | recipients | bytes
    key: str  # user | ip | net | sender | sender_domain | rcpt_domain
    limit: int  # bytes rules take a size ("10M")
    window: float | None = None  # required, except for connections (a count at once)


@dataclass(frozen=True)
class RateOverrideSection:
    """One ``[[ratelimit.overrides]]``: another limit for the ``key = "user"`` rule of
    that dimension and window, for one user or for every user of a class."""

    dimension: str
    window: float
    limit: int
    user: str | None = None  # exactly one of user, user_class
    user_class: str | None = None  # the "class" attribute from the user's directory entry


@dataclass(frozen=True)
class RateLimitSection:
    """``[ratelimit]``: rate limits, shared through Redis when ``redis`` is set."""

    redis: str | None = None  # "redis://127.0.0.1:6379/0"; None: in-process limiter
    redis_password_file: Path | None = None
    redis_password: str | None = field(default=None, repr=False)  # from the file
    prefix: str = "itpison-gateway:rl:"
    fail_mode: str = "fail_open"  # "fail_open" | "fail_closed"
    deadline: float = 0.25  # per Redis call, seconds
    ipv4_prefix: int = 24  # the "net" key: the client's /24 ...
    ipv6_prefix: int = 64  # ... or /64
    outbound_messages_per_second: float | None = None  # to the smarthosts, all nodes together
    outbound_connections: int | None = None  # concurrent deliveries, all nodes together
    rules: tuple[RateRuleSection, ...] = ()
    overrides: tuple[RateOverrideSection, ...] = ()


Table = Callable[[Any, str, Mapping[str, v.Convert], Context], dict[str, Any]]


def redis_url(value: Any, path: str, ctx: Context) -> str:
    url = v.string(value, path)
    parts = urlsplit(url)
    try:
        port, db = parts.port, parts.path.strip("/")
    except ValueError:
        port, db = None, "x"
    if parts.scheme != "redis" or not parts.hostname or (db and not db.isdigit()):
        raise ConfigError(path, 'must look like "redis://127.0.0.1:6379/0" (host, port,'
                                ' database number)')
    if parts.password or parts.username:
        raise ConfigError(path, "never put a password in the URL: write it to a file and"
                                " set redis_password_file")
    if parts.query or parts.fragment or port == 0:
        raise ConfigError(path, "unexpected query, fragment or port 0 in the URL")
    return url


def _rate(value: Any, path: str, ctx: Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(path, "must be a positive number (per second)")
    return float(value)


def _prefix(value: Any, path: str, ctx: Context) -> str:
    text = v.string(value, path)
    if " " in text or len(text) > 100:
        raise ConfigError(path, "must be 1..100 characters without spaces")
    return text


def _limit(value: Any, path: str, ctx: Context) -> Any:
    return value  # checked with the dimension, in _rule


_SECTION_KEYS: dict[str, v.Convert] = {
    "redis": redis_url, "redis_password_file": v.readable_file, "prefix": _prefix,
    "fail_mode": v.choice("fail_open", "fail_closed"), "deadline": v.duration,
    "ipv4_prefix": v.int_range(8, 32), "ipv6_prefix": v.int_range(16, 128),
    "outbound_messages_per_second": _rate, "outbound_connections": v.positive_int,
    "rules": _limit, "overrides": _limit}
_RULE_KEYS: dict[str, v.Convert] = {
    "dimension": v.choice(*DIMENSIONS), "key": v.choice(*KEYS), "limit": _limit,
    "window": v.duration}
_OVERRIDE_KEYS: dict[str, v.Convert] = {
    "dimension": v.choice(*DIMENSIONS[1:]), "window": v.duration, "limit": _limit,
    "user": v.string, "user_class": v.string}


def _checked_limit(value: Any, dimension: str, path: str, ctx: Context) -> int:
    if dimension == "bytes":
        return v.size(value, path, ctx)
    return v.positive_int(value, path, ctx)


def _rule(raw: Any, path: str, ctx: Context, table: Table) -> RateRuleSection:
    values = table(raw, path, _RULE_KEYS, ctx)
    for key in ("dimension", "key", "limit"):
        if key not in values:
            raise ConfigError(f"{path}.{key}", "required, e.g. dimension = \"messages\","
                                               " key = \"user\", limit = 100, window = \"1h\"")
    values["limit"] = _checked_limit(values["limit"], values["dimension"], f"{path}.limit", ctx)
    if values["dimension"] == "connections":
        if "window" in values:
            raise ConfigError(f"{path}.window", "connections are counted at once, not per"
                                                " window: remove window")
        if values["key"] not in CONNECTION_KEYS:
            raise ConfigError(f"{path}.key", "connections are limited per ip or net (the"
                                             " client is not known yet at connect)")
    elif "window" not in values:
        raise ConfigError(f"{path}.window", 'required, e.g. window = "1h"')
    return RateRuleSection(**values)


def _override(raw: Any, path: str, ctx: Context, table: Table,
              rules: tuple[RateRuleSection, ...]) -> RateOverrideSection:
    values = table(raw, path, _OVERRIDE_KEYS, ctx)
    for key in ("dimension", "window", "limit"):
        if key not in values:
            raise ConfigError(f"{path}.{key}", "required")
    if ("user" in values) == ("user_class" in values):
        raise ConfigError(path, "set exactly one of user and user_class")
    values["limit"] = _checked_limit(values["limit"], values["dimension"], f"{path}.limit", ctx)
    if not any(r.key == "user" and r.dimension == values["dimension"]
               and r.window == values["window"] for r in rules):
        raise ConfigError(path, f"no [[ratelimit.rules]] with key = \"user\", dimension ="
                                f" \"{values['dimension']}\" and window ="
                                f" \"{v.duration_text(values['window'])}\" to override")
    return RateOverrideSection(**values)


def parse_ratelimit(raw: Any, ctx: Context, table: Table) -> RateLimitSection:
    values = table(raw, "ratelimit", _SECTION_KEYS, ctx)
    rules = values.get("rules", [])
    overrides = values.get("overrides", [])
    for key, items in (("rules", rules), ("overrides", overrides)):
        if not isinstance(items, list):
            raise ConfigError(f"ratelimit.{key}", f"must be an array of tables: write"
                                                  f" [[ratelimit.{key}]]")
    values["rules"] = tuple(_rule(r, f"ratelimit.rules[{i}]", ctx, table)
                            for i, r in enumerate(rules))
    seen: dict[tuple[str, str, float | None], int] = {}
    for i, rule in enumerate(values["rules"]):
        first = seen.setdefault((rule.dimension, rule.key, rule.window), i)
        if first != i:
            raise ConfigError(f"ratelimit.rules[{i}]", f"same dimension, key and window as"
                                                       f" ratelimit.rules[{first}]")
    values["overrides"] = tuple(_override(o, f"ratelimit.overrides[{i}]", ctx, table,
                                          values["rules"]) for i, o in enumerate(overrides))
    if "redis_password_file" in values:
        if "redis" not in values:
            raise ConfigError("ratelimit.redis_password_file", "set redis as well")
        values["redis_password"] = v.read_password(values["redis_password_file"],
                                                   "ratelimit.redis_password_file")
    if "redis" not in values and values.get("fail_mode") == "fail_closed":
        raise ConfigError("ratelimit.fail_mode", "fail_closed needs redis (without it the"
                                                 " limiter is in-process and cannot fail)")
    return RateLimitSection(**values)
