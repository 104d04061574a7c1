"""gateway.config: TOML -> frozen, validated sections; every error names its key path."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from gateway import config as C
from gateway.config import ConfigError, default_config, describe, load_config, parse_config

ETC_FILE = Path(__file__).resolve().parent.parent / "etc" / "itpison-gateway.toml"


def toml_table(header: str, **keys: Any) -> str:
    """``[header]`` (or ``[[header]]``) with ``keys``; JSON literals are valid TOML here."""
    lines = [header] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def listener(**keys: Any) -> str:
    return toml_table("[[listeners]]", **{"endpoint": "tcp:2525", "mode": "smtp", **keys})


def smarthost(**keys: Any) -> str:
    return toml_table("[[smarthosts]]", **{"host": "smtp.example.test", **keys})


def section(name: str, **keys: Any) -> str:
    return toml_table(f"[{name}]", **keys)


BASE = listener() + smarthost()


def parse(text: str, base_dir: Path = Path("/nonexistent"), environ: dict | None = None):
    return parse_config(tomllib.loads(text), base_dir=base_dir, environ=environ or {})


def parse_error(text: str, base_dir: Path = Path("/nonexistent")) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir)
    return info.value


# --- errors: (TOML, path, part of the message) ------------------------------------------

ERRORS = [
    # sections and keys
    (BASE + section("relays", x=1), "relays", "unknown section; did you mean 'relay'?"),
    ("colour = 1\n" + BASE, "colour", "unknown section; valid: gateway, tls, listeners"),
    (BASE + section("relay", foo=1), "relay.foo", "unknown key; valid: trusted_networks"),
    (BASE + section("relay", conect_timeout=5), "relay.conect_timeout",
     "did you mean 'connect_timeout'?"),
    (BASE + section("tls", cert="x.pem"), "tls.cert", "unknown key"),
    (listener(mood="smtp") + smarthost(), "listeners[0].mood", "did you mean 'mode'?"),
    (section("listeners", endpoint="tcp:25", mode="smtp") + smarthost(), "listeners",
     "must be an array of tables: write [[listeners]] (double brackets)"),
    (BASE + "[[relay]]\n", "relay", "must be a table: write [relay] (single brackets)"),
    ('listeners = ["tcp:25"]\n' + smarthost(), "listeners[0]", "must be a table"),
    (smarthost(), "listeners", "at least one [[listeners]] table is required"),
    ("listeners = []\n" + smarthost(), "listeners", "at least one [[listeners]]"),
    (listener(), "smarthosts", "at least one [[smarthosts]] table is required"),
    # gateway
    (BASE + section("gateway", hostname="gw_1.example.test"), "gateway.hostname",
     "not a valid DNS name"),
    (BASE + section("gateway", hostname="gw.example.test."), "gateway.hostname",
     "no trailing dot"),
    (BASE + section("gateway", hostname="192.0.2.1"), "gateway.hostname", "not a valid DNS"),
    (BASE + section("gateway", hostname=5), "gateway.hostname", "must be a string"),
    (BASE + section("gateway", state_dir=""), "gateway.state_dir", "must not be empty"),
    # listeners
    (toml_table("[[listeners]]", mode="smtp") + smarthost(), "listeners[0].endpoint",
     "required"),
    (toml_table("[[listeners]]", endpoint="tcp:25") + smarthost(), "listeners[0].mode",
     "required: one of smtp, submission, smtps"),
    (listener(mode="SMTP") + smarthost(), "listeners[0].mode",
     "must be one of smtp, submission, smtps"),
    (listener(endpoint=25) + smarthost(), "listeners[0].endpoint", "must be a string"),
    (listener(endpoint="  ") + smarthost(), "listeners[0].endpoint", "must not be empty"),
    (listener(endpoint="tpc:25") + smarthost(), "listeners[0].endpoint",
     "unknown endpoint type 'tpc': start with one of tcp:, tcp6:, ssl:, unix:, systemd:"),
    (listener(endpoint="TCP:25") + smarthost(), "listeners[0].endpoint", "unknown endpoint"),
    (listener(endpoint="tcp") + smarthost(), "listeners[0].endpoint", "needs a port"),
    (listener(endpoint="tcp:port=99999") + smarthost(), "listeners[0].endpoint",
     "port '99999' must be 0..65535"),
    (listener(endpoint="tcp:smtp") + smarthost(), "listeners[0].endpoint", "must be 0..65535"),
    (listener(endpoint="tcp:25:interfac=127.0.0.1") + smarthost(), "listeners[0].endpoint",
     "unknown tcp endpoint parameter 'interfac'"),
    (listener(endpoint="tcp:25:port=26") + smarthost(), "listeners[0].endpoint",
     "'port' is given twice"),
    (listener(endpoint="tcp:25:interface=127.0.0.1:backlog=x") + smarthost(),
     "listeners[0].endpoint", "backlog must be a number"),
    (listener(endpoint="tcp:25:interface=127.0.0.300") + smarthost(), "listeners[0].endpoint",
     "must be an IP address"),
    (listener(endpoint="tcp6:25:interface=::1") + smarthost(), "listeners[0].endpoint",
     r"escape the colons of an IPv6 address as \:"),
    (listener(endpoint="tcp6:25:interface=127.0.0.1") + smarthost(), "listeners[0].endpoint",
     "must be an IPv6 address"),
    (listener(endpoint="tcp:25:a:b:c") + smarthost(), "listeners[0].endpoint", "too many"),
    (listener(endpoint="unix:") + smarthost(), "listeners[0].endpoint", "needs a socket path"),
    (listener(endpoint="unix:/run/x.sock:mode=rw") + smarthost(), "listeners[0].endpoint",
     "octal"),
    (listener(endpoint="systemd:domain=INET") + smarthost(), "listeners[0].endpoint",
     "exactly one of index= and name="),
    (listener(endpoint="systemd:domain=IPV4:index=0") + smarthost(), "listeners[0].endpoint",
     "domain=INET, INET6 or UNIX"),
    (listener(endpoint="systemd:domain=INET:index=first") + smarthost(),
     "listeners[0].endpoint", "index must be a number"),
    (listener(endpoint="tcp:25\\") + smarthost(), "listeners[0].endpoint",
     "ends with a lone backslash"),
    (listener() + listener() + smarthost(), "listeners[1].endpoint",
     "listeners[0] listens there already"),
    (listener(endpoint="tcp:25:interface=127.0.0.1")
     + listener(endpoint="tcp:port=25:interface=127.0.0.1:backlog=5") + smarthost(),
     "listeners[1].endpoint", "listeners[0] listens there already"),
    (listener(endpoint="systemd:domain=INET:index=0") + listener(endpoint="tcp:0")
     + listener(endpoint="systemd:domain=INET6:index=0") + smarthost(), "listeners[2].endpoint",
     "listeners[0] listens there already"),
    (listener(name="in") + listener(endpoint="tcp:26", name="in") + smarthost(),
     "listeners[1].name", "listeners[0] is already named 'in': names must be unique"),
    (listener(name="my listener") + smarthost(), "listeners[0].name", "letters, digits"),
    (listener(tls_min_version=1.2) + smarthost(), "listeners[0].tls_min_version",
     'must be one of 1.0, 1.1, 1.2, 1.3 (a string: tls_min_version = "1.2")'),
    (listener(tls_min_version="1.4") + smarthost(), "listeners[0].tls_min_version",
     "must be one of 1.0, 1.1, 1.2, 1.3"),
    (listener(auth_required="true") + smarthost(), "listeners[0].auth_required",
     "must be true or false (without quotes), not a string"),
    (listener(auth_required=1) + smarthost(), "listeners[0].auth_required",
     "must be true or false"),
    (listener(certificate="c.pem") + smarthost(), "listeners[0].private_key",
     "required when certificate is set"),
    (listener(private_key="k.pem") + smarthost(), "listeners[0].certificate",
     "required when private_key is set"),
    (BASE + section("tls", private_key="k.pem"), "tls.certificate", "required when"),
    # smarthosts
    (BASE + smarthost(host="b.example.test", port=70000), "smarthosts[1].port",
     "must be 1..65535"),
    (listener() + smarthost(port=0), "smarthosts[0].port", "must be 1..65535"),
    (listener() + smarthost(port="465"), "smarthosts[0].port",
     "must be 1..65535 (write the number without quotes)"),
    (listener() + smarthost(security="tls"), "smarthosts[0].security",
     "must be one of smtps, starttls, none"),
    (listener() + toml_table("[[smarthosts]]", port=465), "smarthosts[0].host", "required"),
    (listener() + smarthost(host="smtp_relay.example.test"), "smarthosts[0].host",
     "not a valid DNS name"),
    (listener() + smarthost(host="[::1]"), "smarthosts[0].host", "without brackets"),
    (listener() + smarthost(password="hunter2"), "smarthosts[0].password",
     "never put the password in this file"),
    (listener() + smarthost(username="u"), "smarthosts[0].password_file",
     "required when username is set"),
    (listener() + smarthost(username=""), "smarthosts[0].username", "must not be empty"),
    (listener() + smarthost(port=465, security="starttls"), "smarthosts[0].port",
     'set security = "smtps"'),
    (listener() + smarthost(port=465, security="none"), "smarthosts[0].port", "465"),
    (listener() + smarthost(port=587, security="smtps"), "smarthosts[0].port",
     'set security = "starttls"'),
    (listener() + smarthost(security="none", tls_name="relay.example.test"),
     "smarthosts[0].tls_name", 'has no effect with security = "none"'),
    (listener() + smarthost(tls_name="*.example.test"), "smarthosts[0].tls_name",
     "not a valid DNS name"),
    (listener() + smarthost(allow_insecure_auth="yes"), "smarthosts[0].allow_insecure_auth",
     "must be true or false"),
    (BASE + smarthost(port=465), "smarthosts[1]", "smtp.example.test:465 is already smarthosts[0]"),
    # relay
    (BASE + section("relay", trusted_networks="127.0.0.1"), "relay.trusted_networks",
     "must be an array"),
    (BASE + section("relay", trusted_networks=["127.0.0.1", "10.0.0.0/33"]),
     "relay.trusted_networks[1]", "'10.0.0.0/33' is not an IP network"),
    (BASE + section("relay", trusted_networks=[10]), "relay.trusted_networks[0]",
     "must be a string"),
    (BASE + section("relay", trusted_networks=["0.0.0.0/0"]), "relay.trusted_networks[0]",
     "open relay"),
    (BASE + section("relay", trusted_networks=["::1", "::/0"]), "relay.trusted_networks[1]",
     "open relay"),
    (BASE + section("relay", connect_timeout=0), "relay.connect_timeout",
     'must be a positive duration: seconds as a number, or a string such as "90s"'),
    (BASE + section("relay", connect_timeout=-1), "relay.connect_timeout", "positive duration"),
    (BASE + section("relay", connect_timeout="5 minutes"), "relay.connect_timeout",
     "positive duration"),
    (BASE + section("relay", connect_timeout="5M"), "relay.connect_timeout",
     "positive duration"),
    (BASE + section("relay", connect_timeout=True), "relay.connect_timeout",
     "positive duration"),
    (BASE + "[relay]\ndata_timeout = inf\n", "relay.data_timeout", "positive duration"),
    (BASE + "[relay]\ndata_timeout = nan\n", "relay.data_timeout", "positive duration"),
    # auth
    (BASE + section("auth", mechanisms=["PLAIN", "CRAM-MD5"]), "auth.mechanisms[1]",
     "must be PLAIN or LOGIN"),
    (BASE + section("auth", mechanisms=[]), "auth.mechanisms", "must be a non-empty array"),
    (BASE + section("auth", mechanisms="PLAIN"), "auth.mechanisms", "must be a non-empty"),
    (BASE + section("auth", mechanisms=["plain", "PLAIN"]), "auth.mechanisms[1]",
     "PLAIN is listed twice"),
    (BASE + section("auth", max_failures=0), "auth.max_failures", "must be a positive integer"),
    (BASE + section("auth", failure_window="forever"), "auth.failure_window", "duration"),
    # limits
    (BASE + section("limits", max_message_size=0), "limits.max_message_size",
     "must be a positive integer"),
    (BASE + section("limits", max_message_size="35 megabytes"), "limits.max_message_size",
     '"35M", "1G" (k, M, G are powers of 1024)'),
    (BASE + section("limits", max_message_size=3.5e7), "limits.max_message_size",
     "must be a positive integer (bytes)"),
    (BASE + section("limits", max_message_size=35), "limits.max_message_size",
     'give a unit, e.g. "35M"'),
    (BASE + section("limits", max_message_size="1.5M"), "limits.max_message_size",
     "a size such as"),
    (BASE + section("limits", max_recipients=-1), "limits.max_recipients",
     "must be a positive integer"),
    (BASE + section("limits", max_recipients="100"), "limits.max_recipients",
     "without quotes"),
    (BASE + section("limits", max_line_length=1000), "limits.max_line_length",
     "must be 200..998"),
    (BASE + section("limits", max_line_length=78), "limits.max_line_length", "200..998"),
    (BASE + section("limits", bare_line_ending="strip"), "limits.bare_line_ending",
     "must be one of normalize, reject"),
    (BASE + section("limits", max_connections_per_ip=2000), "limits.max_connections_per_ip",
     "must not exceed max_connections (1000)"),
    (BASE + section("limits", idle_timeout="2h"), "limits.idle_timeout",
     "must not exceed session_timeout (1h)"),
    (BASE + section("limits", max_errors=False), "limits.max_errors", "positive integer"),
    # queue
    (BASE + section("queue", retry_min="2h"), "queue.retry_max",
     "must be at least retry_min (2h)"),
    (BASE + section("queue", retry_min="5d", retry_max="6d"), "queue.retry_min",
     "must be shorter than max_lifetime (5d)"),
    (BASE + section("queue", concurrency=1.5), "queue.concurrency", "positive integer"),
    (BASE + section("queue", max_lifetime=0), "queue.max_lifetime", "positive duration"),
]


@pytest.mark.parametrize(("text", "path", "message"), ERRORS,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(ERRORS)])
def test_error_names_key_path(text: str, path: str, message: str) -> None:
    error = parse_error(text)
    assert error.path == path
    assert message in error.message
    assert str(error) == f"{path}: {error.message}"


@pytest.mark.parametrize(("text", "expected"), [
    (BASE + smarthost(host="b.example.test", port=70000), "smarthosts[1].port: must be 1..65535"),
    (listener(mode="smpt") + smarthost(),
     "listeners[0].mode: must be one of smtp, submission, smtps"),
    (BASE + section("limits", max_message_size=-5),
     "limits.max_message_size: must be a positive integer"),
])
def test_documented_messages_exactly(text: str, expected: str) -> None:
    assert str(parse_error(text)) == expected


# --- values ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90.0), (0.5, 0.5), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
    ("1.5h", 5400.0), ("45", 45.0), (" 10 s ", 10.0),
])
def test_durations(value: Any, seconds: float) -> None:
    relay = parse(BASE + section("relay", connect_timeout=value)).relay
    assert relay.connect_timeout == seconds
    assert isinstance(relay.connect_timeout, float)


@pytest.mark.parametrize(("value", "size"), [
    (1024, 1024), ("512k", 512 * 1024), ("512K", 512 * 1024), ("35M", 36700160),
    ("35MB", 36700160), ("10MiB", 10 * 1024**2), ("10m", 10 * 1024**2), ("1G", 1024**3),
    ("64kB", 64 * 1024), ("4096B", 4096), ("4096", 4096),
])
def test_sizes_are_powers_of_1024(value: Any, size: int) -> None:
    assert parse(BASE + section("limits", max_message_size=value)).limits.max_message_size == size


def test_trusted_networks_ignore_host_bits() -> None:
    relay = parse(BASE + section("relay", trusted_networks=["10.1.2.3/8", "192.0.2.7",
                                                             "2001:db8::1/32", " ::1 "])).relay
    assert relay.trusted_networks == tuple(ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128"))
    assert parse(BASE + section("relay", trusted_networks=[])).relay.trusted_networks == ()


def test_mechanisms_are_upper_cased() -> None:
    assert parse(BASE + section("auth", mechanisms=["login"])).auth.mechanisms == ("LOGIN",)


@pytest.mark.parametrize("endpoint", [
    "tcp:2525", "tcp:0:interface=127.0.0.1", "tcp:port=25:interface=localhost:backlog=10",
    r"tcp6:25:interface=\:\:1", "tcp6:25", "ssl:465:privateKey=key.pem:certKey=cert.pem",
    "unix:/run/itpison-gateway/smtp.sock:mode=660", "systemd:domain=INET:index=0",
    "systemd:domain=INET6:name=smtp",
])
def test_valid_endpoints_are_kept_verbatim(endpoint: str) -> None:
    assert parse(listener(endpoint=endpoint) + smarthost()).listeners[0].endpoint == endpoint


@pytest.mark.parametrize(("security", "port"), [("smtps", 465), ("starttls", 587), ("none", 25)])
def test_smarthost_port_follows_security(security: str, port: int) -> None:
    host = parse(listener() + smarthost(security=security)).smarthosts[0]
    assert (host.port, host.security, host.address) == (port, security,
                                                        f"smtp.example.test:{port}")


def test_smarthost_address_and_verify_name() -> None:
    hosts = parse(listener() + smarthost(host="::1", port=2465)
                  + smarthost(host="127.0.0.1", port=2465, tls_name="relay.example.test")
                  ).smarthosts
    assert (hosts[0].address, hosts[0].verify_name) == ("[::1]:2465", "::1")
    assert (hosts[1].address, hosts[1].verify_name) == ("127.0.0.1:2465", "relay.example.test")


def test_port_zero_listeners_may_repeat() -> None:
    text = (listener(endpoint="tcp:0:interface=127.0.0.1") * 2
            + listener(endpoint="tcp:25:interface=127.0.0.1") + listener(endpoint="tcp:25")
            + listener(endpoint=r"tcp6:25:interface=\:\:1") + smarthost())
    assert len(parse(text).listeners) == 5


def test_listener_names_default_to_mode_made_unique() -> None:
    text = (listener(endpoint="tcp:1") + listener(endpoint="tcp:2")
            + listener(endpoint="tcp:3", name="smtp-2")
            + listener(endpoint="tcp:4", mode="submission") + smarthost())
    assert [lst.name for lst in parse(text).listeners] == ["smtp", "smtp-3", "smtp-2",
                                                           "submission"]


def test_minimal_config_takes_the_documented_defaults(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(C.socket, "getfqdn", lambda: "gw.example.test")
    config = parse(BASE)
    assert config.gateway == C.GatewaySection("gw.example.test", tmp_path / "var")
    assert config.tls == C.TLSSection(None, None)
    assert config.listeners == (C.ListenerSection("tcp:2525", "smtp", "smtp"),)
    assert config.smarthosts == (C.SmarthostSection("smtp.example.test", 465),)
    assert (config.relay, config.auth, config.limits, config.queue) == (
        C.RelaySection(), C.AuthSection(), C.LimitsSection(), C.QueueSection())
    assert config.relay.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                             ipaddress.ip_network("::1/128"))
    assert (config.limits.max_message_size, config.queue.max_lifetime) == (36700160, 432000.0)
    assert config.source is None


@pytest.mark.parametrize(("fqdn", "hostname"), [
    ("mail.example.test", "mail.example.test"), ("localhost", "localhost"),
    ("build_box.internal", "localhost"), ("", "localhost"), ("x" * 64 + ".test", "localhost"),
])
def test_hostname_default_is_fqdn_if_valid(monkeypatch: pytest.MonkeyPatch, fqdn: str,
                                           hostname: str) -> None:
    monkeypatch.setattr(C.socket, "getfqdn", lambda: fqdn)
    assert parse(BASE).gateway.hostname == hostname
    assert parse(BASE + section("gateway", hostname="gw.example.test")).gateway.hostname == \
        "gw.example.test"


@pytest.mark.parametrize(("environ", "expected"), [
    ({"STATE_DIRECTORY": "/var/lib/itpison-gateway"}, "/var/lib/itpison-gateway"),
    ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a"),
    ({"STATE_DIRECTORY": "/var/lib/a/"}, "/var/lib/a"),
    ({"STATE_DIRECTORY": "rel"}, "{cwd}/rel"),
    ({"STATE_DIRECTORY": ""}, "{cwd}/var"),
    ({}, "{cwd}/var"),
])
def test_state_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           environ: dict[str, str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    state_dir = parse(BASE, environ=environ).gateway.state_dir
    assert state_dir == Path(expected.format(cwd=tmp_path))
    assert state_dir.is_absolute()


def test_state_dir_in_file_wins_over_environment(tmp_path: Path) -> None:
    text = BASE + section("gateway", state_dir="/srv/gw")
    assert parse(text, environ={"STATE_DIRECTORY": "/var/lib/x"}).gateway.state_dir == \
        Path("/srv/gw")


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = default_config({})
    assert [(lst.endpoint, lst.mode, lst.name) for lst in config.listeners] == [
        ("tcp:2525:interface=127.0.0.1", "smtp", "smtp"),
        ("tcp:2587:interface=127.0.0.1", "submission", "submission"),
        ("tcp:2465:interface=127.0.0.1", "smtps", "smtps")]
    assert [(h.address, h.security, h.username, h.password) for h in config.smarthosts] == [
        ("smtp.itpison.com:465", "smtps", None, None),
        ("smtp2.itpison.com:465", "smtps", None, None)]
    assert [str(n) for n in config.relay.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    assert config.tls == C.TLSSection(None, None)
    assert config.gateway.state_dir == tmp_path / "var"
    assert config.source is None
    assert default_config({"STATE_DIRECTORY": "/run/x"}).gateway.state_dir == Path("/run/x")
    assert config == parse_config(tomllib.loads(C.DEFAULT_TOML), base_dir=tmp_path, environ={})


def test_sections_are_frozen_and_hold_tuples() -> None:
    config = parse(BASE + section("relay", trusted_networks=["10.0.0.0/8"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits = C.LimitsSection()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smarthosts[0].port = 25  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].mode = "smtps"  # type: ignore[misc]
    for value in (config.listeners, config.smarthosts, config.relay.trusted_networks,
                  config.auth.mechanisms):
        assert isinstance(value, tuple)
    hash(config.relay)


# --- files -------------------------------------------------------------------------------

def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "gw.toml", BASE + "[relay]\nconnect_timeout = \n")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert info.value.path == str(file)
    assert re.fullmatch(r"invalid TOML: .*\(at line 7, column \d+\)", info.value.message)


def test_missing_and_non_utf8_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file") as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.path == str(tmp_path / "absent.toml")
    file = write(tmp_path / "latin1.toml", b"# caf\xe9\n" + BASE.encode())
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(file)


def test_relative_paths_resolve_against_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_cert) -> None:
    etc = tmp_path / "etc"
    write(etc / "tls" / "cert.pem", server_cert.cert.read_bytes())
    write(etc / "tls" / "key.pem", server_cert.key.read_bytes())
    write(tmp_path / "secrets" / "relay.pass", "s3cret\n")
    write(etc / "users.toml", "")
    file = write(etc / "gw.toml", BASE.replace(smarthost(), smarthost(
        username="gw", password_file="../secrets/relay.pass"))
        + section("gateway", state_dir="state")
        + section("tls", certificate="tls/cert.pem", private_key="./tls/key.pem")
        + section("auth", users_file="users.toml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(file))
    assert config.source == file
    assert config.gateway.state_dir == etc / "state"
    assert config.tls == C.TLSSection(etc / "tls" / "cert.pem", etc / "tls" / "key.pem")
    assert config.smarthosts[0].password_file == tmp_path / "secrets" / "relay.pass"
    assert config.smarthosts[0].password == "s3cret"
    assert config.auth.users_file == etc / "users.toml"


@pytest.mark.parametrize(("content", "password"), [
    ("s3cret\n", "s3cret"), ("s3cret", "s3cret"), ("s3cret\r\n", "s3cret"),
    (" pass word \n", " pass word "), ("ünïcode\n", "ünïcode"),
])
def test_password_file_strips_one_newline(tmp_path: Path, content: str, password: str) -> None:
    write(tmp_path / "pass", content.encode())
    host = parse(listener() + smarthost(username="u", password_file="pass"), tmp_path
                 ).smarthosts[0]
    assert host.password == password


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"), (b"\n", "is empty"), (b"one\ntwo\n", "only the password, on one line"),
    (b"s3cret\n\n", "on one line"), (b"\xff\xfe", "not UTF-8"),
])
def test_bad_password_files(tmp_path: Path, content: bytes, message: str) -> None:
    write(tmp_path / "pass", content)
    error = parse_error(listener() + smarthost(username="u", password_file="pass"), tmp_path)
    assert (error.path, message in error.message) == ("smarthosts[0].password_file", True)


def test_password_file_needs_username(tmp_path: Path) -> None:
    write(tmp_path / "pass", "x\n")
    error = parse_error(listener() + smarthost(password_file="pass"), tmp_path)
    assert (error.path, error.message) == ("smarthosts[0].username",
                                           "required when password_file is set")


def test_credentials_without_tls_need_explicit_consent(tmp_path: Path) -> None:
    write(tmp_path / "pass", "x\n")
    creds = {"username": "u", "password_file": "pass", "security": "none"}
    error = parse_error(listener() + smarthost(**creds), tmp_path)
    assert error.path == "smarthosts[0].username"
    assert "allow_insecure_auth = true" in error.message
    host = parse(listener() + smarthost(**creds, allow_insecure_auth=True), tmp_path
                 ).smarthosts[0]
    assert (host.port, host.password, host.allow_insecure_auth) == (25, "x", True)


@pytest.mark.parametrize("key", ["password_file", "ca_file"])
def test_missing_files_name_the_key(tmp_path: Path, key: str) -> None:
    error = parse_error(listener() + smarthost(username="u", **{key: "nope/x.pem"}), tmp_path)
    assert error.path == f"smarthosts[0].{key}"
    assert f"{tmp_path / 'nope' / 'x.pem'} does not exist" in error.message


def test_users_file_must_exist_and_be_a_file(tmp_path: Path) -> None:
    error = parse_error(BASE + section("auth", users_file="users.toml"), tmp_path)
    assert (error.path, "does not exist" in error.message) == ("auth.users_file", True)
    (tmp_path / "users.toml").mkdir()
    error = parse_error(BASE + section("auth", users_file="users.toml"), tmp_path)
    assert (error.path, "is a directory" in error.message) == ("auth.users_file", True)


def test_unreadable_file_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = write(tmp_path / "users.toml", "")
    users.chmod(0)
    if os.geteuid() == 0:  # root reads every file: make the read fail as it would for others
        read_bytes = Path.read_bytes

        def refuse(self: Path) -> bytes:
            if self == users:
                raise PermissionError(13, "Permission denied")
            return read_bytes(self)
        monkeypatch.setattr(Path, "read_bytes", refuse)
    error = parse_error(BASE + section("auth", users_file="users.toml"), tmp_path)
    assert (error.path, "not readable" in error.message) == ("auth.users_file", True)


def test_ca_file_must_hold_certificates(tmp_path: Path, test_ca) -> None:
    write(tmp_path / "ca.pem", "not a certificate\n")
    error = parse_error(listener() + smarthost(ca_file="ca.pem"), tmp_path)
    assert (error.path, "holds no PEM certificate" in error.message) == (
        "smarthosts[0].ca_file", True)
    host = parse(listener() + smarthost(ca_file=str(test_ca.ca_pem)), tmp_path).smarthosts[0]
    assert host.ca_file == test_ca.ca_pem


def test_certificate_pair_is_checked(tmp_path: Path, test_ca, server_cert) -> None:
    other = test_ca.issue("config-other", "other.example.test")
    cert, key = str(server_cert.cert), str(server_cert.key)
    assert parse(BASE + section("tls", certificate=cert, private_key=key)).tls == \
        C.TLSSection(server_cert.cert, server_cert.key)
    combined = write(tmp_path / "combined.pem", server_cert.cert.read_bytes()
                     + server_cert.key.read_bytes())
    assert parse(listener(certificate="combined.pem", private_key="combined.pem") + smarthost(),
                 tmp_path).listeners[0].certificate == combined

    def error(certificate: str, private_key: str, where: str = "tls") -> tuple[str, str]:
        text = (BASE + section("tls", certificate=certificate, private_key=private_key)
                if where == "tls" else
                listener(certificate=certificate, private_key=private_key) + smarthost())
        e = parse_error(text, tmp_path)
        return e.path, e.message

    path, message = error(key, cert)
    assert (path, "are certificate and private_key swapped?" in message) == (
        "tls.certificate", True)
    path, message = error(cert, cert, where="listener")
    assert (path, "swapped" in message) == ("listeners[0].private_key", True)
    assert error(cert, str(other.key)) == (
        "tls.private_key", f"{other.key} is not the key of the certificate in {cert}")
    assert error(cert, "missing.key")[0] == "tls.private_key"
    private = serialization.load_pem_private_key(server_cert.key.read_bytes(), None)
    write(tmp_path / "enc.key", private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    path, message = error(cert, "enc.key")
    assert (path, "is encrypted" in message) == ("tls.private_key", True)
    write(tmp_path / "junk.pem", "junk\n")
    path, message = error("junk.pem", key)
    assert (path, message) == ("tls.certificate", f"{tmp_path / 'junk.pem'} holds no PEM"
                                                  " certificate")


# --- describe and repr never show the password -------------------------------------------

def test_password_never_printed(tmp_path: Path) -> None:
    write(tmp_path / "pass", "Tr0ub4dor&3\n")
    config = parse(listener() + smarthost(username="gw", password_file="pass")
                   + smarthost(host="b.example.test"), tmp_path)
    assert config.smarthosts[0].password == "Tr0ub4dor&3"
    lines = describe(config)
    for text in (repr(config), str(config), repr(config.smarthosts[0]), "\n".join(lines)):
        assert "Tr0ub4dor" not in text
    assert "username=gw" in lines[5] and lines[5].endswith("password=<set>")
    assert lines[6].startswith("smarthosts[1]: host=b.example.test port=465")
    assert lines[6].endswith("password=-")


def test_describe_gives_one_line_per_section(tmp_path: Path, server_cert) -> None:
    file = write(tmp_path / "gw.toml", BASE + section("gateway", hostname="gw.example.test",
                                                      state_dir="/srv/gw"))
    lines = describe(load_config(file))
    assert lines[0] == f"config: {file}"
    assert lines[1] == "gateway: hostname=gw.example.test state_dir=/srv/gw"
    assert lines[2] == "tls: self-signed certificate in /srv/gw/tls"
    assert lines[3] == ("listener smtp: endpoint=tcp:2525 mode=smtp tls_min_version=1.2"
                        " certificate=- private_key=- auth_required=false auth=-"
                        " proxy_protocol_from=-")
    assert lines[4] == ("relay: trusted_networks=127.0.0.0/8,::1/128 connect_timeout=30s"
                        " greeting_timeout=2m command_timeout=2m data_timeout=10m"
                        " max_messages_per_connection=100 max_connections_per_host=10"
                        " connection_idle_timeout=30s connection_max_age=10m"
                        " messages_per_second=unlimited breaker_failures=3 breaker_cooldown=30s")
    assert lines[6] == ("auth: users_file=- mechanisms=PLAIN,LOGIN max_failures=5"
                        " failure_window=5m failure_floor=0.3s ldap=- omicard=-"
                        " upstream_accounts=-")
    assert lines[7].startswith("limits: max_message_size=36700160 (35M) max_recipients=1000")
    assert lines[8] == "queue: max_lifetime=5d retry_min=1m retry_max=1h concurrency=20"
    assert lines[9].startswith("options: forbidden=refuse local_time_zone=- time_format=iso8601")
    assert lines[10] == "ratelimit: in-process rules=- overrides=0 outbound=-"
    assert len(lines) == 13
    config = parse(BASE + section("tls", certificate=str(server_cert.cert),
                                  private_key=str(server_cert.key)))
    assert describe(config)[0] == "config: embedded default"
    assert describe(config)[2] == f"tls: certificate={server_cert.cert} private_key=" \
                                  f"{server_cert.key}"


# --- etc/itpison-gateway.toml: the admin's reference ------------------------------------

SECTION_CLASSES = {"gateway": C.GatewaySection, "tls": C.TLSSection,
                   "listeners": C.ListenerSection, "relay": C.RelaySection,
                   "smarthosts": C.SmarthostSection, "auth": C.AuthSection,
                   "limits": C.LimitsSection, "queue": C.QueueSection,
                   "options": C.OptionsSection,
                   "ratelimit": C.RateLimitSection, "ratelimit.rules": C.RateRuleSection,
                   "ratelimit.overrides": C.RateOverrideSection,
                   "auth.ldap": C.LdapSection, "auth.omicard": C.OmicardSection,
                   "auth.upstream_accounts": C.UpstreamAccountSection,
                   "service": C.ServiceSection, "metrics": C.MetricsSection}
NOT_IN_TOML = {("smarthosts", "password"), ("ratelimit", "redis_password"),
               ("auth.ldap", "bind_password"), ("auth", "ldap"), ("auth", "omicard"),
               ("auth", "upstream_accounts"), ("auth.upstream_accounts", "password"),
               ("ratelimit", "rules"), ("ratelimit", "overrides")}
SUBTABLES = {"ratelimit.rules", "ratelimit.overrides"}  # arrays of tables with fields of their own


def etc_keys() -> list[tuple[str, str, str, bool]]:
    """(section, key, value text, commented?) for every ``key = value`` line of the file.

    A sub-table (``[options.defaults]``) counts as its section's key ``defaults``; the
    keys inside it are data (header names), not fields.
    """
    keys, current, nested = [], "", False
    for line in ETC_FILE.read_text().splitlines():
        if header := re.fullmatch(r"\[\[?(\w+)((?:\.\w+)*)\]\]?", line):
            full = header.group(1) + header.group(2)
            if full in SECTION_CLASSES or not header.group(2):
                current, nested = full, False
            else:
                current, nested = header.group(1), True
                keys.append((current, header.group(2).split(".")[1], "<table>", False))
        elif (match := re.fullmatch(r"(# ?)?(\w+) = (.+)", line)) and not nested:
            keys.append((current, match.group(2), match.group(3), bool(match.group(1))))
    return keys


def test_etc_example_loads(tmp_path: Path, server_cert) -> None:
    text = ETC_FILE.read_text().replace("/etc/itpison-gateway/", f"{tmp_path}/")
    assert "/etc/itpison-gateway" not in text
    write(tmp_path / "cert.pem", server_cert.cert.read_bytes())
    write(tmp_path / "key.pem", server_cert.key.read_bytes())
    write(tmp_path / "smarthost.pass", "omicard-password\n")
    write(tmp_path / "marketing.pass", "marketing-password\n")
    write(tmp_path / "users.toml", "")
    config = load_config(write(tmp_path / "itpison-gateway.toml", text))
    assert config.gateway == C.GatewaySection("gw.example.test",
                                              Path("/var/lib/itpison-gateway"))
    assert config.tls.certificate == tmp_path / "cert.pem"
    assert [(lst.name, lst.mode) for lst in config.listeners] == [
        ("local-smtp", "smtp"), ("submission", "submission"), ("smtps", "smtps")]
    assert [(h.address, h.username, h.password) for h in config.smarthosts] == [
        ("smtp.itpison.com:465", "omicard-account", "omicard-password"),
        ("smtp2.itpison.com:465", "omicard-account", "omicard-password")]
    assert config.auth.users_file == tmp_path / "users.toml"
    assert (config.limits.max_message_size, config.limits.max_recipients) == (36700160, 1000)


def test_etc_example_documents_every_key() -> None:
    documented: dict[str, set[str]] = {name: set() for name in SECTION_CLASSES}
    for name, key, _, _ in etc_keys():
        assert name in SECTION_CLASSES, f"{key} outside a known section"
        assert key in {f.name for f in dataclasses.fields(SECTION_CLASSES[name])}, \
            f"{name}.{key} is documented but does not exist"
        documented[name].add(key)
    for name, cls in SECTION_CLASSES.items():
        expected = {f.name for f in dataclasses.fields(cls)} - {k for s, k in NOT_IN_TOML
                                                                 if s == name}
        assert documented[name] == expected, name
    assert {n for n in SECTION_CLASSES if n not in SUBTABLES and "." not in n} == \
        {f.name for f in dataclasses.fields(C.Config)} - {"source"}


def test_etc_example_shows_the_real_defaults() -> None:
    """Each commented ``# key = value`` with a fixed default must show that default."""
    checked = 0
    for name, key, value, commented in etc_keys():
        default = next(f.default for f in dataclasses.fields(SECTION_CLASSES[name])
                       if f.name == key)
        if not commented or default in (None, dataclasses.MISSING) or name in SUBTABLES:
            continue
        setting = tomllib.loads(f"{key} = {value}")
        if name == "auth.ldap":  # the keys it requires, then the one checked
            setting = {"urls": ["ldaps://dc"], "bind_template": "{user}@x", **setting}
        text = (listener(**setting) + smarthost() if name == "listeners" else
                listener() + smarthost(**setting) if name == "smarthosts" else
                BASE + section(name, **setting))
        item = parse(text)
        for part in name.split("."):
            item = getattr(item, part)
        item = item[0] if isinstance(item, tuple) else item
        assert getattr(item, key) == default, f"{name}.{key}"
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("fallbacks, path, message", [
    ('{port = 587}', "smarthosts[0].fallbacks", "must be a list of tables"),
    ('[{security = "starttls"}]', "smarthosts[0].fallbacks[0].port", "required"),
    ('[{port = 25, security = "none"}]', "smarthosts[0].fallbacks[0].security", "in clear"),
    ('[{port = 465, security = "starttls"}]', "smarthosts[0].fallbacks[0].security", "465"),
    ('[{port = 587, security = "smtps"}]', "smarthosts[0].fallbacks[0].security", "587"),
    ('[{port = 465, security = "smtps"}]', "smarthosts[0].fallbacks[0]", "already"),
    ('[{port = 587, sec = "starttls"}]', "smarthosts[0].fallbacks[0].sec", "valid: port, security"),
])
def test_bad_fallbacks(fallbacks: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(listener() + smarthost() + f"fallbacks = {fallbacks}\n")
    assert info.value.path == path and message in str(info.value)


def test_fallbacks_and_routes() -> None:
    config = parse(listener() + smarthost() + 'fallbacks = [{port = 587}, {port = 25}]\n')
    host = config.smarthosts[0]
    assert host.routes == ((465, "smtps"), (587, "starttls"), (25, "starttls"))
    assert default_config().smarthosts[0].routes == host.routes


def test_bad_messages_per_second() -> None:
    with pytest.raises(ConfigError) as info:
        parse(BASE + section("relay", messages_per_second=-1))
    assert info.value.path == "relay.messages_per_second"
