"""The ``[auth.ldap]`` and ``[auth.omicard]`` sections: frozen dataclasses and validation.

Part of :mod:`gateway.config` (the ``[auth]`` table converts these two keys with
``parse_ldap`` / ``parse_omicard``); kept apart so each backend's settings read as one piece.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import config_values as v
from gateway.config_values import ConfigError, Context

BACKENDS = ("ldap", "omicard", "file")  # the default chain order
DEFAULT_USER_FILTER = ("(&(objectClass=person)(|(uid={user})(mail={user})"
                       "(userPrincipalName={user})))")
DEFAULT_GROUP_FILTER = "(|(member={dn})(uniqueMember={dn})(memberUid={user}))"


@dataclass(frozen=True)
class LdapSection:
    """``[auth.ldap]``: an LDAP or Active Directory server to check passwords against."""

    urls: tuple[str, ...]  # "ldaps://dc1.corp.example", "ldap://dc2:389"; tried in order
    starttls: bool = False  # upgrade ldap:// URLs with StartTLS (ldaps:// is TLS already)
    ca_file: Path | None = None  # CA to verify the server against (else the system store)
    tls_verify: bool = True  # false: accept any certificate (never the default)
    tls_name: str | None = None  # name to verify and send as SNI (else the URL's host)
    bind_dn: str | None = None  # service account: search, then bind as the user found
    bind_password_file: Path | None = None
    bind_password: str | None = field(default=None, repr=False)  # from the file
    base_dn: str | None = None  # where users are searched
    user_filter: str = DEFAULT_USER_FILTER  # {user}: the login name, escaped
    bind_template: str | None = None  # direct bind: "{user}@corp.example" or a DN template
    required_groups: tuple[str, ...] = ()  # group DNs or names (cn); empty: no gate
    group_base: str | None = None  # set: find groups by search; unset: memberOf
    group_filter: str = DEFAULT_GROUP_FILTER  # {dn}, {user}: escaped
    group_name_attribute: str = "cn"
    sender_attributes: tuple[str, ...] = ("mail", "proxyAddresses")
    class_attribute: str | None = None  # the rate-limit class ([[ratelimit.overrides]])
    options_attribute: str | None = None  # X-Header defaults, values "X-Header=value"
    connect_timeout: float = 2.0
    receive_timeout: float = 3.0
    pool_size: int = 4  # threads, concurrent checks and pooled service connections
    cache_ttl: float = 60.0  # positive results; 0: no cache
    breaker_failures: int = 3  # directory errors in a row that open the breaker
    breaker_cooldown: float = 10.0  # seconds of quick 454s before the next probe

    @property
    def search(self) -> bool:
        """Search then bind (a service account), as opposed to a direct bind."""
        return self.bind_dn is not None


@dataclass(frozen=True)
class OmicardSection:
    """``[auth.omicard]``: OMICard accounts, checked by an AUTH on the ITPison smarthosts."""

    cache_ttl: float = 60.0  # positive results; 0: no cache
    timeout: float = 15.0  # the whole check, per smarthost
    domains: tuple[str, ...] = ()  # only logins ending in @one of these; empty: any
    senders_from_login: bool = True  # an address login may use itself as the sender
    senders: tuple[str, ...] = ()  # patterns every OMICard user may also send as
    relay_as_user: bool = True  # relay their mail with their own credentials
    key_file: Path | None = None  # key for credentials at rest; else $CREDENTIALS_DIRECTORY
    # /itpison-gateway-key, else state_dir/credential.key (made on first start)


@dataclass(frozen=True)
class UpstreamAccountSection:
    """One ``[[auth.upstream_accounts]]``: the smarthost account for members of groups."""

    name: str  # recorded with queued mail: keep it stable
    groups: tuple[str, ...]  # group names (LDAP cn, users file groups)
    username: str
    password_file: Path
    password: str = field(default="", repr=False)  # from the file


def _urls(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(path, 'must be a list of URLs, e.g. ["ldaps://dc1.corp.example"]')
    out = []
    for i, item in enumerate(value):
        url = v.string(item, f"{path}[{i}]")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ConfigError(f"{path}[{i}]", "bad port")
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path.strip("/"):
            raise ConfigError(f"{path}[{i}]", 'must look like "ldaps://host" or'
                                              ' "ldap://host:389" (no base DN in the URL)')
        out.append(url)
    return tuple(out)


def duration_or_zero(value: Any, path: str, ctx: Context) -> float:
    """A duration, or 0 (off)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return v.duration(value, path, ctx)


def _names(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list of strings")
    return tuple(v.string(item, f"{path}[{i}]") for i, item in enumerate(value))


def _template(*placeholders: str) -> v.Convert:
    def convert(value: Any, path: str, ctx: Context) -> str:
        text = v.string(value, path)
        try:
            text.format(**{p: "x" for p in placeholders})
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(path, f"bad template ({e}): use only"
                                    f" {', '.join('{' + p + '}' for p in placeholders)}") from None
        if "{user}" not in text and "user" in placeholders and "dn" not in placeholders:
            raise ConfigError(path, "must contain {user}")
        return text
    return convert


_LDAP_KEYS: dict[str, v.Convert] = {
    "urls": _urls, "starttls": v.boolean, "ca_file": v.ca_file, "tls_verify": v.boolean,
    "tls_name": v.dns_name, "bind_dn": v.string, "bind_password_file": v.file_path,
    "base_dn": v.string, "user_filter": _template("user"), "bind_template": _template("user"),
    "required_groups": _names, "group_base": v.string,
    "group_filter": _template("dn", "user"), "group_name_attribute": v.string,
    "sender_attributes": _names, "class_attribute": v.string, "options_attribute": v.string,
    "connect_timeout": v.duration, "receive_timeout": v.duration,
    "pool_size": v.int_range(1, 64), "cache_ttl": duration_or_zero,
    "breaker_failures": v.positive_int, "breaker_cooldown": v.duration}


def parse_ldap(raw: Any, path: str, ctx: Context) -> LdapSection:
    from gateway.config import _table  # the shared table walker (config imports us)

    values = _table(raw, path, _LDAP_KEYS, ctx, {"bind_password": "never put the password"
                    " in this file: write it to a file readable only by the gateway and set"
                    " bind_password_file"})
    if "urls" not in values:
        raise ConfigError(f"{path}.urls", 'required, e.g. urls = ["ldaps://dc1.corp.example"]')
    if values.get("bind_dn") is not None:
        if values.get("bind_password_file") is None:
            raise ConfigError(f"{path}.bind_password_file", "required with bind_dn")
        values["bind_password"] = v.read_password(values["bind_password_file"],
                                                  f"{path}.bind_password_file")
        if values.get("base_dn") is None:
            raise ConfigError(f"{path}.base_dn", "required with bind_dn (where to search)")
    elif values.get("bind_template") is None:
        raise ConfigError(f"{path}.bind_dn", "set bind_dn (search, then bind) or"
                                             ' bind_template (direct bind, e.g.'
                                             ' "{user}@corp.example")')
    elif values.get("bind_password_file") is not None:
        raise ConfigError(f"{path}.bind_password_file", "only used with bind_dn")
    plain = [u for u in values["urls"] if u.startswith("ldap://")]
    if plain and not values.get("starttls", False):
        raise ConfigError(f"{path}.starttls", f"{plain[0]} would send passwords in clear:"
                                              " set starttls = true or use ldaps://")
    if values.get("tls_verify", True) is False and "ca_file" in values:
        raise ConfigError(f"{path}.ca_file", "has no effect with tls_verify = false")
    if values.get("receive_timeout", 3.0) <= 0 or values.get("connect_timeout", 2.0) <= 0:
        raise ConfigError(f"{path}.receive_timeout", "timeouts must be above 0")
    return LdapSection(**values)


def _sender_patterns(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
    from gateway.auth import SenderPolicy

    try:
        return SenderPolicy.parse(_names(value, path, ctx)).patterns
    except ValueError as e:
        raise ConfigError(path, str(e)) from None


_OMICARD_KEYS: dict[str, v.Convert] = {
    "cache_ttl": duration_or_zero, "timeout": v.duration, "domains": _names,
    "senders": _sender_patterns,
    "senders_from_login": v.boolean, "relay_as_user": v.boolean, "key_file": v.readable_file}


def parse_omicard(raw: Any, path: str, ctx: Context) -> OmicardSection:
    from gateway.config import _table

    values = _table(raw, path, _OMICARD_KEYS, ctx)
    values["domains"] = tuple(d.lower().lstrip("@") for d in values.get("domains", ()))
    return OmicardSection(**values)


_ACCOUNT_KEYS: dict[str, v.Convert] = {
    "name": v.listener_name, "groups": _names, "username": v.string,
    "password_file": v.file_path}


def parse_upstream_accounts(raw: Any, path: str, ctx: Context
                            ) -> tuple[UpstreamAccountSection, ...]:
    """``[[auth.upstream_accounts]]``: name, groups, username, password_file (all required)."""
    from gateway.config import _table

    if not isinstance(raw, list):
        raise ConfigError(path, "must be an array of tables: write [[auth.upstream_accounts]]")
    out: list[UpstreamAccountSection] = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        values = _table(item, where, _ACCOUNT_KEYS, ctx, {"password": "never put the"
                        " password in this file: write it to a file and set password_file"})
        for key in ("name", "groups", "username", "password_file"):
            if key not in values:
                raise ConfigError(f"{where}.{key}", "required")
        if not values["groups"]:
            raise ConfigError(f"{where}.groups", "name at least one group")
        if any(a.name == values["name"] for a in out):
            raise ConfigError(f"{where}.name", f"{values['name']!r} is used twice")
        values["password"] = v.read_password(values["password_file"], f"{where}.password_file")
        out.append(UpstreamAccountSection(**values))
    return tuple(out)


def backend_list(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
    """A listener's ``auth = ["ldap", "file"]``: backends in the order to try."""
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"must be a non-empty list of {', '.join(BACKENDS)}")
    out: list[str] = []
    for i, item in enumerate(value):
        name = v.choice(*BACKENDS)(item, f"{path}[{i}]", ctx)
        if name in out:
            raise ConfigError(f"{path}[{i}]", f"{name} is listed twice")
        out.append(name)
    return tuple(out)


def configured_backends(auth: Any) -> tuple[str, ...]:
    """The backends ``[auth]`` configures, in the default chain order."""
    present: Mapping[str, bool] = {"ldap": auth.ldap is not None,
                                   "omicard": auth.omicard is not None,
                                   "file": auth.users_file is not None}
    return tuple(name for name in BACKENDS if present[name])
