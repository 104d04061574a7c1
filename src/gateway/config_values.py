"""Value checks for :mod:`gateway.config`: one converter per kind of configuration value.

A converter takes ``(value, key_path, context)`` and returns the typed value, or raises a
:class:`ConfigError` naming ``key_path`` with a message that says how to fix it.  Import
:class:`ConfigError` from :mod:`gateway.config`; this module is that one's internals.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class ConfigError(Exception):
    """A configuration problem at ``path``; ``str(e) == f"{path}: {message}"``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Context:
    base_dir: Path  # relative paths resolve against it
    environ: Mapping[str, str]


Convert = Callable[[Any, str, Context], Any]
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def kind(value: Any) -> str:
    """What a TOML value is, for messages."""
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "an array"), (dict, "a table")]
    return next((name for t, name in kinds if isinstance(value, t)), "a date/time")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unquote_hint(value: Any) -> str:
    return " (write the number without quotes)" if isinstance(value, str) else ""


def string(value: Any, path: str, ctx: Context | None = None) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"must be a string in quotes, not {kind(value)}")
    if not value.strip():
        raise ConfigError(path, "must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(path, "must not contain control characters")
    return value


def boolean(value: Any, path: str, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false (without quotes), not {kind(value)}")
    return value


def positive_int(value: Any, path: str, ctx: Context) -> int:
    if not _is_int(value) or value <= 0:
        raise ConfigError(path, "must be a positive integer" + _unquote_hint(value))
    return value


def rate(value: Any, path: str, ctx: Context) -> float:
    """A non-negative number per second (0 means "no limit")."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(path, "must be a number >= 0 (per second; 0 means no limit)"
                          + _unquote_hint(value))
    return float(value)


def int_range(low: int, high: int) -> Convert:
    def convert(value: Any, path: str, ctx: Context) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise ConfigError(path, f"must be {low}..{high}" + _unquote_hint(value))
        return value
    return convert


def choice(*options: str) -> Convert:
    def convert(value: Any, path: str, ctx: Context) -> str:
        if not isinstance(value, str) or value not in options:
            raise ConfigError(path, f"must be one of {', '.join(options)}")
        return value
    return convert


def tls_version(value: Any, path: str, ctx: Context) -> str:
    versions = ("1.0", "1.1", "1.2", "1.3")
    if not isinstance(value, str) or value not in versions:
        hint = f' (a string: tls_min_version = "{value}")' if isinstance(value, float) else ""
        raise ConfigError(path, f"must be one of {', '.join(versions)}{hint}")
    return value


def duration(value: Any, path: str, ctx: Context) -> float:
    """Seconds as a number, or "90s", "5m", "2h", "5d"; positive and finite."""
    seconds = None
    if _is_int(value) or isinstance(value, float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(path, 'must be a positive duration: seconds as a number, or a string'
                                ' such as "90s", "5m", "2h", "5d"')
    return seconds


def size(value: Any, path: str, ctx: Context) -> int:
    """Bytes as an integer, or "512k", "35M", "35MiB", "1G" (powers of 1024)."""
    result = value if _is_int(value) else None
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        result = int(m.group(1)) * _SIZE_UNITS[unit]
    if result is None:
        raise ConfigError(path, 'must be a positive integer (bytes) or a size such as "512k",'
                                ' "35M", "1G" (k, M, G are powers of 1024)')
    if result <= 0:
        raise ConfigError(path, "must be a positive integer")
    return result


def is_dns_name(name: str) -> bool:
    labels = name.split(".")
    return (0 < len(name) <= 253 and all(_LABEL_RE.match(label) for label in labels)
            and not labels[-1].isdigit())


def dns_name(value: Any, path: str, ctx: Context) -> str:
    name = string(value, path)
    if not is_dns_name(name):
        raise ConfigError(path, f"'{name}' is not a valid DNS name: use letters, digits and"
                                " hyphens in dot-separated labels, no underscores, no"
                                " trailing dot (xn-- form for international names)")
    return name


def host(value: Any, path: str, ctx: Context) -> str:
    """A DNS name or an IP address (without brackets)."""
    text = string(value, path).strip()
    if text.startswith("[") and text.endswith("]"):
        raise ConfigError(path, "write an IP address without brackets")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return dns_name(text, path, ctx)


def listener_name(value: Any, path: str, ctx: Context) -> str:
    text = string(value, path)
    if not _NAME_RE.match(text):
        raise ConfigError(path, "must be 1-63 letters, digits, '.', '_' or '-',"
                                " starting with a letter or digit")
    return text


def file_path(value: Any, key: str, ctx: Context) -> Path:
    """An absolute path; relative ones resolve against the configuration's directory.
    ``${CREDENTIALS_DIRECTORY}`` is systemd's directory of ``LoadCredential=`` secrets."""
    text = string(value, key)
    if "${CREDENTIALS_DIRECTORY}" in text:
        credentials = ctx.environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            raise ConfigError(key, "${CREDENTIALS_DIRECTORY} is not set: it exists only under"
                                   " systemd with LoadCredential= (see the unit file)")
        text = text.replace("${CREDENTIALS_DIRECTORY}", credentials)
    given = Path(text).expanduser()
    return Path(os.path.normpath(ctx.base_dir / given))


def read_bytes(file: Path, key: str) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        problem = "does not exist"
    except IsADirectoryError:
        problem = "is a directory, not a file"
    except PermissionError:
        problem = f"is not readable by this process (uid {os.getuid()}): check owner and mode"
    except OSError as e:
        problem = f"cannot be read: {e.strerror}"
    raise ConfigError(key, f"{file} {problem} (relative paths are resolved against the"
                           " configuration file's directory)")


def readable_file(value: Any, key: str, ctx: Context) -> Path:
    file = file_path(value, key, ctx)
    read_bytes(file, key)
    return file


def ca_file(value: Any, key: str, ctx: Context) -> Path:
    file = file_path(value, key, ctx)
    try:
        x509.load_pem_x509_certificates(read_bytes(file, key))
    except ValueError:
        raise ConfigError(key, f"{file} holds no PEM certificate"
                               " (-----BEGIN CERTIFICATE-----)") from None
    return file


def networks(value: Any, key: str, ctx: Context) -> tuple[IPv4Network | IPv6Network, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, 'must be an array of networks, e.g. ["127.0.0.0/8", "::1/128"]')
    result = []
    for i, item in enumerate(value):
        text = string(item, f"{key}[{i}]").strip()
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"'{text}' is not an IP network: write an address"
                                             ' or address/prefix, e.g. "192.0.2.0/24"') from None
        if network.prefixlen == 0:
            raise ConfigError(f"{key}[{i}]", f"{network} trusts every address and would make"
                                             " the gateway an open relay: list your networks")
        result.append(network)
    return tuple(result)


def mechanisms(value: Any, key: str, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, 'must be a non-empty array, e.g. ["PLAIN", "LOGIN"]')
    names: list[str] = []
    for i, item in enumerate(value):
        mechanism = string(item, f"{key}[{i}]").strip().upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise ConfigError(f"{key}[{i}]", "must be PLAIN or LOGIN")
        if mechanism in names:
            raise ConfigError(f"{key}[{i}]", f"{mechanism} is listed twice")
        names.append(mechanism)
    return tuple(names)


def key_pair(cert: Path, key: Path, section: str) -> None:
    """Both files are PEM, and the key belongs to the (first) certificate."""
    cert_key, key_key = f"{section}.certificate", f"{section}.private_key"
    cert_pem, key_pem = read_bytes(cert, cert_key), read_bytes(key, key_key)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        swapped = "; are certificate and private_key swapped?" if b"PRIVATE KEY" in cert_pem \
            else ""
        raise ConfigError(cert_key, f"{cert} holds no PEM certificate{swapped}") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(key_key, f"{key} is encrypted: store it unencrypted (openssl pkey"
                                   " -in KEY -out PLAIN), readable only by the gateway") from None
    except (ValueError, UnsupportedAlgorithm):
        swapped = "; are certificate and private_key swapped?" \
            if b"BEGIN CERTIFICATE" in key_pem else ""
        raise ConfigError(key_key, f"{key} holds no PEM private key{swapped}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(key_key, f"{key} is not the key of the certificate in {cert}")


def read_password(file: Path, key: str) -> str:
    """The file's text minus one trailing newline; one non-empty line."""
    try:
        text = read_bytes(file, key).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{file} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(key, f"{file} is empty: write the smarthost password into it")
    if any(c in text for c in "\r\n\0"):
        raise ConfigError(key, f"{file} must hold only the password, on one line")
    return text


def duration_text(seconds: float) -> str:
    """``300.0`` -> ``"5m"``: the largest unit that divides evenly."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    return f"{seconds:g}s"


# --- Twisted server endpoint strings ------------------------------------------------------

# The parameters of each parser, in positional order (twisted.internet.endpoints).
ENDPOINT_PARAMETERS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog",
            "extraCertChain", "dhParameters"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
_IPV6_HINT = r" (escape the colons of an IPv6 address as \:, e.g. tcp6:25:interface=\:\:1)"


def endpoint(value: Any, key: str, ctx: Context) -> str:
    """A server endpoint string whose type and parameters Twisted will accept."""
    text = string(value, key)
    try:
        problem = _endpoint_problem(text)
    except ValueError as e:
        problem = str(e)
    if problem:
        hint = _IPV6_HINT if "::" in text.replace("\\:", "") else ""
        raise ConfigError(key, problem + hint)
    return text


def endpoint_address(text: str) -> tuple[str, ...] | None:
    """What a valid endpoint binds, to find two listeners on one address; None for port 0."""
    args, kwargs = _split_endpoint(text)
    params = dict(zip(ENDPOINT_PARAMETERS[args[0]], args[1:], strict=False)) | kwargs
    if args[0] in ("unix", "systemd"):
        return (args[0], params.get("address", ""), params.get("index", ""),
                params.get("name", ""))
    if int(params["port"]) == 0:
        return None
    return ("tcp6" if args[0] == "tcp6" else "tcp", params.get("interface", ""), params["port"])


def tcp_listen_parameters(text: str) -> tuple[str, str, int, int] | None:
    """``(kind, interface, port, backlog)`` of a valid tcp/tcp6 endpoint whose interface
    is an IP address (or empty); None for any other endpoint."""
    args, kwargs = _split_endpoint(text)
    if args[0] not in ("tcp", "tcp6"):
        return None
    params = dict(zip(ENDPOINT_PARAMETERS[args[0]], args[1:], strict=False)) | kwargs
    interface = params.get("interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            return None
    try:
        return args[0], interface, int(params["port"]), int(params.get("backlog") or 50)
    except (KeyError, ValueError):
        return None


def _split_endpoint(text: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's strports grammar: ':' separates, the first '=' names, '\\' escapes."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []
    current, operators, chars = "", ":=", iter(text)

    def flush() -> None:
        if len(parts) == 1:
            args.append(parts[0])
        elif parts[0] in kwargs:
            raise ValueError(f"parameter '{parts[0]}' is given twice")
        else:
            kwargs[parts[0]] = parts[1]

    for char in chars:
        if char in operators:
            parts.append(current)
            current = ""
            if char == ":":
                flush()
                parts, operators = [], ":="
            else:
                operators = ":"
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(r"ends with a lone backslash (write \\ for a backslash)")
            current += escaped
        else:
            current += char
    parts.append(current)
    flush()
    return args, kwargs


def _endpoint_problem(text: str) -> str | None:
    args, kwargs = _split_endpoint(text)
    kind_ = args[0] if args else ""
    if kind_ not in ENDPOINT_PARAMETERS:
        return (f"unknown endpoint type '{kind_}': start with one of "
                + ", ".join(f"{k}:" for k in ENDPOINT_PARAMETERS)
                + ' (e.g. "tcp:2525:interface=127.0.0.1")')
    names = ENDPOINT_PARAMETERS[kind_]
    if len(args) - 1 > len(names):
        return f"too many ':'-separated values for a {kind_} endpoint"
    params = dict(zip(names, args[1:], strict=False))
    for param, value in kwargs.items():
        if param not in names:
            return f"unknown {kind_} endpoint parameter '{param}' (valid: {', '.join(names)})"
        if param in params:
            return f"parameter '{param}' is given twice"
        params[param] = value
    if "backlog" in params and not params["backlog"].isdigit():
        return "backlog must be a number"
    if kind_ == "unix":
        return _unix_problem(params)
    if kind_ == "systemd":
        return _systemd_problem(params)
    return _inet_problem(kind_, params)


def _inet_problem(kind_: str, params: dict[str, str]) -> str | None:
    port = params.get("port")
    if port is None:
        return f'a {kind_} endpoint needs a port, e.g. "{kind_}:2525"'
    if not port.isdigit() or int(port) > 65535:
        return f"port '{port}' must be 0..65535"
    interface = params.get("interface")
    if interface is None:
        return None
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        if kind_ != "tcp6" and is_dns_name(interface):
            return None
        return f"interface '{interface}' must be an IP address"
    if kind_ == "tcp6" and address.version != 6:
        return f"a tcp6 interface must be an IPv6 address, not {interface}"
    return None


def _unix_problem(params: dict[str, str]) -> str | None:
    if not params.get("address"):
        return 'a unix endpoint needs a socket path, e.g. "unix:/run/itpison-gateway/smtp.sock"'
    if "mode" in params and not re.fullmatch(r"[0-7]{3,4}", params["mode"]):
        return "mode must be octal permissions such as 660"
    if params.get("lockfile", "1") not in ("0", "1"):
        return "lockfile must be 0 or 1"
    return None


def _systemd_problem(params: dict[str, str]) -> str | None:
    if params.get("domain") not in ("INET", "INET6", "UNIX"):
        return ("a systemd endpoint needs domain=INET, INET6 or UNIX,"
                ' e.g. "systemd:domain=INET:index=0"')
    if ("index" in params) == ("name" in params):
        return "a systemd endpoint needs exactly one of index= and name="
    if "index" in params and not params["index"].isdigit():
        return "index must be a number (the socket's position in the .socket unit)"
    return None
