"""Configuration: a TOML file becomes frozen, validated dataclasses, one per section.

Everything is checked at load, so a gateway that starts has a usable configuration.  Every
problem is a :class:`ConfigError` whose ``path`` names the key (``smarthosts[1].port``) and
whose message says how to fix it.  Unknown sections and keys are errors: a typo must not
pass silently.  ``etc/itpison-gateway.toml`` documents every key with its default.

Value syntax:

- durations: a number of seconds (``90``, ``0.5``) or a string ``"90s"``, ``"5m"``,
  ``"2h"``, ``"5d"``;
- sizes: a number of bytes (``36700160``) or a string ``"512k"``, ``"35M"``, ``"1G"``;
  k, M and G are powers of 1024 (``"35M"``, ``"35MB"`` and ``"35MiB"`` are all 35 * 1024²);
- booleans are TOML booleans (``true``), never strings;
- relative paths are resolved against the directory of the configuration file, and the
  files a key names (certificates, keys, password and users files) must exist and be
  readable when the configuration is loaded.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from gateway import config_values as v
from gateway.config_auth import (
    LdapSection,
    OmicardSection,
    UpstreamAccountSection,
    backend_list,
    configured_backends,
    duration_or_zero,
    parse_ldap,
    parse_omicard,
    parse_upstream_accounts,
)
from gateway.config_ops import (
    MetricsSection,
    ServiceSection,
    check_workers,
    parse_metrics,
    parse_service,
    worker_share,
)
from gateway.config_ratelimit import (
    RateLimitSection,
    RateOverrideSection,
    RateRuleSection,
    parse_ratelimit,
)
from gateway.config_values import ConfigError, Context
from gateway.options_config import OptionsSection, parse_options

__all__ = [
    "AuthSection", "Config", "ConfigError", "DEFAULT_TOML", "GatewaySection", "LdapSection",
    "LimitsSection", "ListenerSection", "MetricsSection", "OmicardSection", "OptionsSection",
    "QueueSection", "RateLimitSection", "ServiceSection", "UpstreamAccountSection",
    "RateOverrideSection", "RateRuleSection", "RelaySection", "SmarthostFallback",
    "SmarthostSection", "TLSSection",
    "default_config", "describe", "load_config", "parse_config", "worker_share",
]


@dataclass(frozen=True)
class GatewaySection:
    """``[gateway]``: the gateway's own name and where it keeps its state."""

    hostname: str  # EHLO/greeting name; default socket.getfqdn(), else "localhost"
    state_dir: Path  # absolute; default $STATE_DIRECTORY (first entry), else ./var


@dataclass(frozen=True)
class TLSSection:
    """``[tls]``: the server certificate for STARTTLS and smtps (PEM paths)."""

    certificate: Path | None = None  # both None: a self-signed cert is generated into
    private_key: Path | None = None  # state_dir/tls/; otherwise both set, and they match


@dataclass(frozen=True)
class ListenerSection:
    """One ``[[listeners]]`` table: a listening socket and how it speaks."""

    endpoint: str  # Twisted server endpoint string, e.g. "tcp:2525:interface=127.0.0.1"
    mode: str  # "smtp" | "submission" | "smtps"
    name: str  # default: the mode, made unique ("smtp-2") when repeated
    tls_min_version: str = "1.2"  # "1.0" | "1.1" | "1.2" | "1.3"
    certificate: Path | None = None  # per-listener override of [tls]
    private_key: Path | None = None
    auth_required: bool = False  # true: even trusted networks must AUTH on this listener
    auth: tuple[str, ...] | None = None  # backends to try, in order; None: all configured
    # PROXY protocol v1/v2 (HAProxy): connections from these networks must start with a
    # PROXY header giving the real client; any other peer is refused.  (): no PROXY.
    proxy_protocol_from: tuple[IPv4Network | IPv6Network, ...] = ()


_LOCALHOST_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class RelaySection:
    """``[relay]``: who may relay without AUTH, and outbound deadlines (seconds)."""

    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = _LOCALHOST_NETS
    connect_timeout: float = 30.0  # outbound client deadlines, seconds
    greeting_timeout: float = 120.0
    command_timeout: float = 120.0
    data_timeout: float = 600.0  # sending the message + waiting for the final reply
    # The connection pool (gateway.pool) and the circuit breaker (gateway.breaker):
    max_messages_per_connection: int = 100  # then QUIT and open a new connection
    max_connections_per_host: int = 10  # open connections to one smarthost
    connection_idle_timeout: float = 30.0  # close an unused connection (< the relay's 300 s)
    connection_max_age: float = 600.0  # close a connection this old after its message
    messages_per_second: float = 0.0  # node-local cap on messages sent; 0: no cap
    breaker_failures: int = 3  # consecutive session failures that mark a host down
    breaker_cooldown: float = 30.0  # how long a down host is skipped before a probe


@dataclass(frozen=True)
class SmarthostFallback:
    """Another port of the same smarthost, tried when the ones before it are unreachable."""

    port: int
    security: str  # "smtps" | "starttls" ("none" only when the smarthost's own is "none")


@dataclass(frozen=True)
class SmarthostSection:
    """One ``[[smarthosts]]`` table: a relay to deliver to, and how to log in."""

    host: str
    port: int  # default 465 for smtps, 587 for starttls, 25 for none
    security: str = "smtps"  # "smtps" | "starttls" | "none"
    username: str | None = None
    password_file: Path | None = None
    password: str | None = field(default=None, repr=False)  # from password_file; never printed
    ca_file: Path | None = None  # private CA to verify against (else the platform store)
    tls_name: str | None = None  # name to verify in the certificate (else host)
    allow_insecure_auth: bool = False  # allow username with security = "none"
    fallbacks: tuple[SmarthostFallback, ...] = ()  # other ports, tried when one is unreachable

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 literal in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def verify_name(self) -> str:
        return self.tls_name or self.host

    @property
    def routes(self) -> tuple[tuple[int, str], ...]:
        """(port, security) to try in order: the smarthost's own, then its fallbacks."""
        return ((self.port, self.security),
                *((f.port, f.security) for f in self.fallbacks))


@dataclass(frozen=True)
class AuthSection:
    """``[auth]``: client authentication to the gateway."""

    users_file: Path | None = None  # local users (TOML); None: no local users
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    max_failures: int = 5  # failed AUTHs per client IP, and per user name, within failure_window
    failure_window: float = 300.0
    failure_floor: float = 0.3  # a failed AUTH answers no sooner than this (seconds)
    ldap: LdapSection | None = None  # [auth.ldap]
    omicard: OmicardSection | None = None  # [auth.omicard]
    upstream_accounts: tuple[UpstreamAccountSection, ...] = ()  # [[auth.upstream_accounts]]


@dataclass(frozen=True)
class LimitsSection:
    """``[limits]``: per-message and per-connection limits (durations in seconds)."""

    max_message_size: int = 36700160
    max_recipients: int = 1000
    max_line_length: int = 998  # 200..998 (RFC 5321 text line limit)
    bare_line_ending: str = "normalize"  # "normalize" | "reject"
    idle_timeout: float = 300.0
    session_timeout: float = 3600.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 20


@dataclass(frozen=True)
class QueueSection:
    """``[queue]``: retries and lifetime of queued mail (durations in seconds)."""

    max_lifetime: float = 432000.0  # 5 days, then bounce
    retry_min: float = 60.0  # first retry delay; doubles per attempt with jitter
    retry_max: float = 3600.0
    concurrency: int = 20  # deliveries in flight at once


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; build it with load_config/default_config."""

    gateway: GatewaySection
    tls: TLSSection
    listeners: tuple[ListenerSection, ...]
    relay: RelaySection
    smarthosts: tuple[SmarthostSection, ...]  # ordered; the first is the primary
    auth: AuthSection
    limits: LimitsSection
    queue: QueueSection
    options: OptionsSection = field(default_factory=OptionsSection)  # X-Header control
    ratelimit: RateLimitSection = RateLimitSection()
    service: ServiceSection = ServiceSection()  # stop, reload, workers
    metrics: MetricsSection = MetricsSection()  # Prometheus and health checks
    source: Path | None = None  # the file it came from; None for the embedded default


DEFAULT_TOML = """\
# The embedded default: local listeners, the ITPison smarthosts, a self-signed certificate.
[[listeners]]
endpoint = "tcp:2525:interface=127.0.0.1"
mode = "smtp"

[[listeners]]
endpoint = "tcp:2587:interface=127.0.0.1"
mode = "submission"

[[listeners]]
endpoint = "tcp:2465:interface=127.0.0.1"
mode = "smtps"

[[smarthosts]]
host = "smtp.itpison.com"
port = 465
security = "smtps"
fallbacks = [{ port = 587, security = "starttls" }, { port = 25, security = "starttls" }]

[[smarthosts]]
host = "smtp2.itpison.com"
port = 465
security = "smtps"
fallbacks = [{ port = 587, security = "starttls" }, { port = 25, security = "starttls" }]
"""


def load_config(path: str | Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate a TOML file; relative paths in it resolve against its directory."""
    source = Path(os.path.abspath(path))
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "invalid TOML: the file must be UTF-8 text") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the configuration file: {e.strerror}") from None
    return parse_config(data, base_dir=source.parent, environ=environ, source=source)


def default_config(environ: Mapping[str, str] = os.environ) -> Config:
    """The embedded default (:data:`DEFAULT_TOML`), validated like a file."""
    return parse_config(tomllib.loads(DEFAULT_TOML), base_dir=Path.cwd(), environ=environ)


def parse_config(data: Mapping[str, Any], *, base_dir: Path,
                 environ: Mapping[str, str] = os.environ,
                 source: Path | None = None) -> Config:
    """Validate parsed TOML ``data``; relative paths resolve against ``base_dir``."""
    ctx = Context(Path(os.path.abspath(base_dir)), environ)
    for key, value in data.items():
        if key not in _SECTIONS:
            raise ConfigError(key, "unknown section" + _suggest(key, _SECTIONS))
        if _SECTIONS[key] and not isinstance(value, list):
            raise ConfigError(key, f"must be an array of tables: write [[{key}]] (double brackets)")
        if not _SECTIONS[key] and not isinstance(value, dict):
            raise ConfigError(key, f"must be a table: write [{key}] (single brackets)")
    auth = AuthSection(**_table(data.get("auth", {}), "auth", _AUTH_KEYS, ctx))
    listeners = _listeners(data.get("listeners", []), ctx)
    _check_listener_backends(listeners, auth)
    smarthosts = _smarthosts(data.get("smarthosts", []), ctx)
    if auth.omicard is not None:
        for i, host in enumerate(smarthosts):
            if host.security == "none" and not host.allow_insecure_auth:
                raise ConfigError("auth.omicard", f"smarthosts[{i}] has security = \"none\":"
                                  " OMICard passwords would cross the network in clear")
    ratelimit = parse_ratelimit(data.get("ratelimit", {}), ctx, _table)
    service = parse_service(data.get("service", {}), ctx, _table)
    check_workers(service, ratelimit)
    return Config(
        gateway=_gateway(data.get("gateway", {}), ctx),
        tls=TLSSection(*_key_pair(_table(data.get("tls", {}), "tls", _TLS_KEYS, ctx), "tls")),
        listeners=listeners,
        relay=RelaySection(**_table(data.get("relay", {}), "relay", _RELAY_KEYS, ctx)),
        smarthosts=smarthosts,
        auth=auth,
        limits=_limits(data.get("limits", {}), ctx),
        queue=_queue(data.get("queue", {}), ctx),
        options=parse_options(data.get("options", {}), ctx),
        ratelimit=ratelimit,
        service=service,
        metrics=parse_metrics(data.get("metrics", {}), ctx, _table),
        source=source,
    )


def describe(config: Config) -> list[str]:
    """The effective configuration as log lines, one per section; passwords show as <set>."""
    lines = [f"config: {config.source or 'embedded default'}", _line("gateway", config.gateway)]
    if config.tls.certificate is None:
        lines.append(f"tls: self-signed certificate in {config.gateway.state_dir / 'tls'}")
    else:
        lines.append(_line("tls", config.tls))
    lines += [_line(f"listener {listener.name}", listener) for listener in config.listeners]
    lines.append(_line("relay", config.relay))
    for i, host in enumerate(config.smarthosts):
        password = "<set>" if host.password is not None else "-"
        lines.append(_line(f"smarthosts[{i}]", host) + f" password={password}")
    lines += [_line("auth", config.auth)]
    if config.auth.ldap is not None:
        lines.append(_line("auth.ldap", config.auth.ldap)
                     + f" bind_password={'<set>' if config.auth.ldap.bind_password else '-'}")
    if config.auth.omicard is not None:
        lines.append(_line("auth.omicard", config.auth.omicard))
    for i, account in enumerate(config.auth.upstream_accounts):
        lines.append(_line(f"auth.upstream_accounts[{i}]", account) + " password=<set>")
    lines += [_line("limits", config.limits),
              _line("queue", config.queue), _options_line(config.options)]
    lines.append(_ratelimit_line(config.ratelimit))
    lines += [_line("service", config.service), _line("metrics", config.metrics)]
    return lines


def _options_line(options: OptionsSection) -> str:
    parts = []
    for f in fields(options):
        value = getattr(options, f.name)
        if isinstance(value, Mapping):
            value = ",".join(k if not isinstance(x, str | int | frozenset) else
                             f"{k}={'+'.join(map(str, sorted(x)))}" if isinstance(x, frozenset)
                             else f"{k}={str(x).lower() if isinstance(x, bool) else x}"
                             for k, x in value.items()) or "-"
        elif not isinstance(value, str | int | float | type(None)):
            value = "<set>" if value != f.default_factory() else "-"  # type: ignore[misc]
        parts.append(f"{f.name}={_value_text(f.name, value, str(f.type))}")
    return "options: " + " ".join(parts)


# --- sections -------------------------------------------------------------------------------

# section name -> is it an array of tables ([[name]])?
_SECTIONS = {"gateway": False, "tls": False, "listeners": True, "relay": False,
             "smarthosts": True, "auth": False, "limits": False, "queue": False,
             "options": False, "ratelimit": False, "service": False, "metrics": False}
_GATEWAY_KEYS: dict[str, v.Convert] = {"hostname": v.dns_name, "state_dir": v.file_path}
_TLS_KEYS: dict[str, v.Convert] = {"certificate": v.file_path, "private_key": v.file_path}
_LISTENER_KEYS: dict[str, v.Convert] = {
    "endpoint": v.endpoint, "mode": v.choice("smtp", "submission", "smtps"),
    "name": v.listener_name, "tls_min_version": v.tls_version, "certificate": v.file_path,
    "private_key": v.file_path, "auth_required": v.boolean, "auth": backend_list,
    "proxy_protocol_from": v.networks}
_RELAY_KEYS: dict[str, v.Convert] = {
    "trusted_networks": v.networks, "connect_timeout": v.duration,
    "greeting_timeout": v.duration, "command_timeout": v.duration, "data_timeout": v.duration,
    "max_messages_per_connection": v.positive_int, "max_connections_per_host": v.positive_int,
    "connection_idle_timeout": v.duration, "connection_max_age": v.duration,
    "messages_per_second": v.rate, "breaker_failures": v.positive_int,
    "breaker_cooldown": v.duration}
_SMARTHOST_KEYS: dict[str, v.Convert] = {
    "host": v.host, "port": v.int_range(1, 65535),
    "security": v.choice("smtps", "starttls", "none"), "username": v.string,
    "password_file": v.file_path, "ca_file": v.ca_file, "tls_name": v.dns_name,
    "allow_insecure_auth": v.boolean, "fallbacks": lambda value, path, ctx: value}
_AUTH_KEYS: dict[str, v.Convert] = {
    "users_file": v.readable_file, "mechanisms": v.mechanisms,
    "max_failures": v.positive_int, "failure_window": v.duration,
    "failure_floor": duration_or_zero, "ldap": parse_ldap, "omicard": parse_omicard,
    "upstream_accounts": parse_upstream_accounts}
_LIMITS_KEYS: dict[str, v.Convert] = {
    "max_message_size": v.size, "max_recipients": v.positive_int,
    "max_line_length": v.int_range(200, 998),
    "bare_line_ending": v.choice("normalize", "reject"), "idle_timeout": v.duration,
    "session_timeout": v.duration, "max_connections": v.positive_int,
    "max_connections_per_ip": v.positive_int, "max_errors": v.positive_int}
_QUEUE_KEYS: dict[str, v.Convert] = {
    "max_lifetime": v.duration, "retry_min": v.duration, "retry_max": v.duration,
    "concurrency": v.positive_int}
_DEFAULT_PORTS = {"smtps": 465, "starttls": 587, "none": 25}
_REFUSED_PASSWORD = {"password": "never put the password in this file: write it to a file"
                                 " readable only by the gateway and set password_file"}
_EXAMPLES = {"listeners": 'endpoint = "tcp:2525:interface=127.0.0.1" and mode = "smtp"',
             "smarthosts": 'host = "smtp.itpison.com"'}


def _suggest(key: str, valid: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"


def _table(raw: Any, path: str, keys: Mapping[str, v.Convert], ctx: Context,
           refused: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Convert each key of one TOML table; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a table, not {v.kind(raw)}")
    values = {}
    for key, value in raw.items():
        if refused and key in refused:
            raise ConfigError(f"{path}.{key}", refused[key])
        if key not in keys:
            raise ConfigError(f"{path}.{key}", "unknown key" + _suggest(key, keys))
        values[key] = keys[key](value, f"{path}.{key}", ctx)
    return values


def _tables(raw: list[Any], name: str) -> list[Any]:
    if not raw:
        raise ConfigError(name, f"at least one [[{name}]] table is required, with"
                                f" {_EXAMPLES[name]}")
    return raw


def _require(values: Mapping[str, Any], key: str, path: str, how: str) -> None:
    if key not in values:
        raise ConfigError(f"{path}.{key}", f"required: {how}")


def _key_pair(values: Mapping[str, Any], path: str) -> tuple[Path | None, Path | None]:
    cert, key = values.get("certificate"), values.get("private_key")
    if cert is None and key is None:
        return None, None
    if key is None:
        raise ConfigError(f"{path}.private_key", "required when certificate is set")
    if cert is None:
        raise ConfigError(f"{path}.certificate", "required when private_key is set")
    v.key_pair(cert, key, path)
    return cert, key


def _default_hostname() -> str:
    fqdn = socket.getfqdn()
    return fqdn if v.is_dns_name(fqdn) else "localhost"


def _default_state_dir(environ: Mapping[str, str]) -> Path:
    first = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(os.path.abspath(first or "var"))


def _gateway(raw: Any, ctx: Context) -> GatewaySection:
    values = _table(raw, "gateway", _GATEWAY_KEYS, ctx)
    return GatewaySection(hostname=values.get("hostname") or _default_hostname(),
                          state_dir=values.get("state_dir") or _default_state_dir(ctx.environ))


def _listeners(raw: list[Any], ctx: Context) -> tuple[ListenerSection, ...]:
    parsed: list[dict[str, Any]] = []
    named: dict[str, int] = {}
    endpoints: dict[tuple[str, ...], int] = {}
    for i, item in enumerate(_tables(raw, "listeners")):
        path = f"listeners[{i}]"
        values = _table(item, path, _LISTENER_KEYS, ctx)
        _require(values, "endpoint", path, 'e.g. endpoint = "tcp:2525:interface=127.0.0.1"')
        _require(values, "mode", path, "one of smtp, submission, smtps")
        values["certificate"], values["private_key"] = _key_pair(values, path)
        address = v.endpoint_address(values["endpoint"])
        if address is not None and (first := endpoints.setdefault(address, i)) != i:
            raise ConfigError(f"{path}.endpoint", f"listeners[{first}] listens there already:"
                                                  " give each listener its own address or port")
        if "name" in values and (first := named.setdefault(values["name"], i)) != i:
            raise ConfigError(f"{path}.name", f"listeners[{first}] is already named"
                                              f" '{values['name']}': names must be unique")
        parsed.append(values)
    taken = set(named)
    for values in parsed:
        if "name" not in values:
            mode, n = values["mode"], 1
            values["name"] = mode
            while values["name"] in taken:
                n += 1
                values["name"] = f"{mode}-{n}"
            taken.add(values["name"])
    return tuple(ListenerSection(**values) for values in parsed)


def _check_listener_backends(listeners: tuple[ListenerSection, ...],
                             auth: AuthSection) -> None:
    configured = configured_backends(auth)
    for i, listener in enumerate(listeners):
        for j, name in enumerate(listener.auth or ()):
            if name not in configured:
                raise ConfigError(f"listeners[{i}].auth[{j}]", f"{name} is not configured in"
                                  f" [auth] (configured: {', '.join(configured) or 'none'})")


def _smarthosts(raw: list[Any], ctx: Context) -> tuple[SmarthostSection, ...]:
    hosts: list[SmarthostSection] = []
    for i, item in enumerate(_tables(raw, "smarthosts")):
        path = f"smarthosts[{i}]"
        values = _table(item, path, _SMARTHOST_KEYS, ctx, _REFUSED_PASSWORD)
        _require(values, "host", path, 'the relay\'s name, e.g. host = "smtp.itpison.com"')
        _check_smarthost(values, path)
        values["fallbacks"] = _fallbacks(values.get("fallbacks", []), values, path, ctx)
        if values.get("password_file") is not None:
            values["password"] = v.read_password(values["password_file"],
                                                 f"{path}.password_file")
        host = SmarthostSection(**values)
        for j, other in enumerate(hosts):
            if other.address == host.address:
                raise ConfigError(path, f"{host.address} is already smarthosts[{j}]")
        hosts.append(host)
    return tuple(hosts)


def _check_smarthost(values: dict[str, Any], path: str) -> None:
    """Fill in the port; refuse combinations that cannot work or leak the password."""
    security = values.get("security", "smtps")
    port = values.setdefault("port", _DEFAULT_PORTS[security])
    if port == 465 and security != "smtps":
        raise ConfigError(f"{path}.port", '465 is the implicit-TLS port: set security = "smtps"'
                                          " or use the port your relay gave you for it")
    if port == 587 and security == "smtps":
        raise ConfigError(f"{path}.port", '587 is the STARTTLS port: set security = "starttls"'
                                          " or port = 465")
    username, password_file = values.get("username"), values.get("password_file")
    if username is not None and password_file is None:
        raise ConfigError(f"{path}.password_file", "required when username is set: name a"
                                                   " file holding the password")
    if password_file is not None and username is None:
        raise ConfigError(f"{path}.username", "required when password_file is set")
    if security != "none":
        return
    if username is not None and not values.get("allow_insecure_auth", False):
        raise ConfigError(f"{path}.username", 'with security = "none" the password would cross'
                                              ' the network in clear: use "smtps" or "starttls",'
                                              " or set allow_insecure_auth = true to accept that")
    for key in ("ca_file", "tls_name"):
        if key in values:
            raise ConfigError(f"{path}.{key}", 'has no effect with security = "none": remove'
                                               " it or use TLS")


_FALLBACK_KEYS: dict[str, v.Convert] = {
    "port": v.int_range(1, 65535), "security": v.choice("smtps", "starttls", "none")}


def _fallbacks(raw: Any, host: dict[str, Any], path: str,
               ctx: Context) -> tuple[SmarthostFallback, ...]:
    """``fallbacks = [{port = 587, security = "starttls"}, ...]``: never a downgrade."""
    if not isinstance(raw, list):
        raise ConfigError(f"{path}.fallbacks", "must be a list of tables, e.g. "
                                               '[{port = 587, security = "starttls"}]')
    seen = {(host["port"], host.get("security", "smtps")): f"{path}.port"}
    out = []
    for i, item in enumerate(raw):
        where = f"{path}.fallbacks[{i}]"
        values = _table(item, where, _FALLBACK_KEYS, ctx)
        _require(values, "port", where, "the port to try, e.g. port = 587")
        port = values["port"]
        security = values.get("security", "smtps" if port == 465 else "starttls")
        if security == "none" and host.get("security", "smtps") != "none":
            raise ConfigError(f"{where}.security", "a fallback without TLS would send the mail"
                                                   " (and password) in clear: use starttls")
        if port == 465 and security != "smtps":
            raise ConfigError(f"{where}.security", '465 is the implicit-TLS port: "smtps"')
        if port == 587 and security == "smtps":
            raise ConfigError(f"{where}.security", '587 is the STARTTLS port: "starttls"')
        if (first := seen.setdefault((port, security), where)) != where:
            raise ConfigError(where, f"port {port} with {security} is already {first}")
        out.append(SmarthostFallback(port, security))
    return tuple(out)


def _limits(raw: Any, ctx: Context) -> LimitsSection:
    limits = LimitsSection(**_table(raw, "limits", _LIMITS_KEYS, ctx))
    if limits.max_message_size < 1024:
        raise ConfigError("limits.max_message_size", f"{limits.max_message_size} bytes cannot"
                                                     ' hold a message: give a unit, e.g. "35M"')
    if limits.max_connections_per_ip > limits.max_connections:
        raise ConfigError("limits.max_connections_per_ip", "must not exceed max_connections"
                                                           f" ({limits.max_connections})")
    if limits.idle_timeout > limits.session_timeout:
        raise ConfigError("limits.idle_timeout", "must not exceed session_timeout"
                                                 f" ({v.duration_text(limits.session_timeout)})")
    return limits


def _queue(raw: Any, ctx: Context) -> QueueSection:
    queue = QueueSection(**_table(raw, "queue", _QUEUE_KEYS, ctx))
    if queue.retry_min > queue.retry_max:
        raise ConfigError("queue.retry_max", "must be at least retry_min"
                                             f" ({v.duration_text(queue.retry_min)})")
    if queue.retry_min >= queue.max_lifetime:
        raise ConfigError("queue.retry_min", "must be shorter than max_lifetime"
                                             f" ({v.duration_text(queue.max_lifetime)})")
    return queue


# --- describe -------------------------------------------------------------------------------

def _value_text(name: str, value: Any, type_name: str) -> str:
    if value is None:
        return "-"
    if is_dataclass(value):  # a subsection, described on a line of its own
        return "configured"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{item.port}/{item.security}" if isinstance(item, SmarthostFallback)
                        else item.name if isinstance(item, UpstreamAccountSection)
                        else str(item) for item in value) or "-"
    if name == "messages_per_second":
        return f"{value:g}/s" if value else "unlimited"
    if type_name == "float":
        return v.duration_text(value)
    if name == "max_message_size":
        return f"{value} ({value / 1024**2:g}M)"
    return str(value)


def _ratelimit_line(rl: RateLimitSection) -> str:
    store = f"redis={rl.redis} fail_mode={rl.fail_mode}" if rl.redis else "in-process"
    rules = [f"{r.dimension}/{r.key}={r.limit}"
             + (f"/{v.duration_text(r.window)}" if r.window else "") for r in rl.rules]
    out = []
    if rl.outbound_messages_per_second:
        out.append(f"{rl.outbound_messages_per_second:g}/s")
    if rl.outbound_connections:
        out.append(f"{rl.outbound_connections} connections")
    return (f"ratelimit: {store} rules={','.join(rules) or '-'}"
            f" overrides={len(rl.overrides)} outbound={','.join(out) or '-'}")


def _line(label: str, section: Any) -> str:
    """``label: key=value ...`` for every field that repr shows (so never a password)."""
    parts = [f"{f.name}={_value_text(f.name, getattr(section, f.name), str(f.type))}"
             for f in fields(section) if f.repr and f.name != "name"]
    return f"{label}: " + " ".join(parts)
