"""The blocking half of the LDAP checker: ldap3 calls, run only in the LDAP thread pool.

``Directory.verify(user, password)`` returns a ``DirectoryUser`` or raises
``BadCredentials`` (wrong password, unknown user, not in a required group) or
``DirectoryError`` (no server reachable, TLS failure, timeout, an unexpected answer).

Following twisted-notes §6: SAFE_SYNC connections only (thread safe, no restartable
strategy that stalls for minutes), short connect and receive timeouts, a fresh ``Server``
object for every new connection (ldap3 marks a failed address unusable for 5 s), a small
pool of bound service connections that are discarded on any error, and a new short-lived
connection for each user bind.  TLS always verifies against ``ca_file`` (or the system
store) with the host name checked, unless ``tls_verify = false``.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as lx
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from gateway.auth import valid_login
from gateway.config_auth import LdapSection

INVALID_CREDENTIALS = 49


class BadCredentials(Exception):
    """Unknown user, wrong password, or not allowed to relay: 535."""


class DirectoryError(Exception):
    """The directory could not answer: 454."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    groups: tuple[str, ...] = ()  # group DNs


@dataclass(frozen=True)
class Endpoint:
    url: str
    host: str
    port: int
    ldaps: bool


def endpoints(section: LdapSection) -> tuple[Endpoint, ...]:
    out = []
    for url in section.urls:
        parts = urlsplit(url)
        ldaps = parts.scheme == "ldaps"
        out.append(Endpoint(url, parts.hostname or "", parts.port or (636 if ldaps else 389),
                            ldaps))
    return tuple(out)


class Directory:
    def __init__(self, section: LdapSection) -> None:
        self.section = section
        self.endpoints = endpoints(section)
        self._idle: list[ldap3.Connection] = []
        self._lock = threading.Lock()
        self._tls = self._make_tls()
        names = list(section.sender_attributes)
        for extra in (section.class_attribute, section.options_attribute):
            if extra:
                names.append(extra)
        if not section.group_base:
            names.append("memberOf")
        self.attribute_names = tuple(dict.fromkeys(names))

    def _make_tls(self) -> ldap3.Tls:
        s = self.section
        if not s.tls_verify:
            return ldap3.Tls(validate=ssl.CERT_NONE)
        return VerifiedTls(s.ca_file, s.tls_name)

    # -- connections ----------------------------------------------------------------------
    def _connect(self, endpoint: Endpoint, user: str | None, password: str | None
                 ) -> ldap3.Connection:
        """An open (TLS) connection bound as ``user``; raises BadCredentials on code 49."""
        s = self.section
        server = ldap3.Server(endpoint.host, port=endpoint.port, use_ssl=endpoint.ldaps,
                              tls=self._tls, connect_timeout=s.connect_timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, user=user, password=password,
                                client_strategy=ldap3.SAFE_SYNC,
                                receive_timeout=max(1, math.ceil(s.receive_timeout)),  # an int: SO_RCVTIMEO
 auto_bind=ldap3.AUTO_BIND_NONE,
                                raise_exceptions=False, read_only=True)
        try:
            conn.open()
            # Requests go out in several small writes: without TCP_NODELAY, Nagle and the
            # peer's delayed ACK add ~40 ms to every bind.
            conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not endpoint.ldaps and s.starttls:
                ok, result, _, _ = conn.start_tls()
                if not ok:
                    raise DirectoryError(f"{endpoint.url}: StartTLS refused: {_desc(result)}")
            ok, result, _, _ = conn.bind()
        except BaseException:
            _close(conn)
            raise
        if not ok:
            _close(conn)
            if result and result.get("result") == INVALID_CREDENTIALS:
                raise BadCredentials("invalid credentials")
            raise DirectoryError(f"{endpoint.url}: bind failed: {_desc(result)}")
        return conn

    def _first_reachable(self, user: str | None, password: str | None
                         ) -> tuple[Endpoint, ldap3.Connection]:
        """Try each URL in order; the first that answers (even with 49) decides."""
        errors = []
        for endpoint in self.endpoints:
            try:
                return endpoint, self._connect(endpoint, user, password)
            except (lx.LDAPException, OSError, DirectoryError) as e:
                errors.append(f"{endpoint.url}: {_brief(e)}")
        raise DirectoryError("no directory server answered: " + "; ".join(errors))

    def _service(self) -> tuple[Endpoint | None, ldap3.Connection]:
        with self._lock:
            if self._idle:
                return None, self._idle.pop()
        try:
            return self._first_reachable(self.section.bind_dn, self.section.bind_password)
        except BadCredentials:
            raise DirectoryError("the service account (bind_dn) was refused: check"
                                 " bind_password_file") from None

    def _give_back(self, conn: ldap3.Connection) -> None:
        with self._lock:
            if len(self._idle) < self.section.pool_size:
                self._idle.append(conn)
                return
        _close(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)

    def _search(self, base: str, filter_: str, attributes: Iterable[str], scope: Any,
                size_limit: int) -> list[dict[str, Any]]:
        """A search on a pooled service connection (a retry on a fresh one if the pooled
        connection had gone stale)."""
        for attempt in (1, 2):
            _, conn = self._service()
            try:
                ok, result, response, _ = conn.search(
                    base, filter_, search_scope=scope, attributes=list(attributes),
                    size_limit=size_limit, time_limit=max(1, int(self.section.receive_timeout)))
            except (lx.LDAPException, OSError) as e:
                _close(conn)
                if attempt == 2:
                    raise DirectoryError(f"search failed: {_brief(e)}") from None
                continue
            code = result.get("result") if result else None
            if code not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
                _close(conn)
                raise DirectoryError(f"search failed: {_desc(result)}")
            self._give_back(conn)
            return [r for r in response or () if r.get("type") == "searchResEntry"]
        raise DirectoryError("search failed")  # not reached: the loop returns or raises

    # -- the check ------------------------------------------------------------------------
    def verify(self, user: str, password: str) -> DirectoryUser:
        if not valid_login(user) or not password or "\0" in password:
            raise BadCredentials("not a valid login")
        found = self._search_user(user) if self.section.search else None
        bind_as = found.dn if found is not None else self._bind_name(user)
        endpoint, conn = self._first_reachable(bind_as, password)
        try:
            if found is None:
                found = self._own_entry(conn, user, bind_as)
        finally:
            _close(conn)
        groups = self._groups(found, user)
        if self.section.required_groups and not _member(groups, self.section.required_groups):
            raise BadCredentials("not in a required group")
        return DirectoryUser(found.dn, found.attributes, groups)

    def _search_user(self, user: str) -> DirectoryUser:
        s = self.section
        filter_ = s.user_filter.format(user=escape_filter_chars(user))
        hits = self._search(s.base_dn or "", filter_, self.attribute_names, ldap3.SUBTREE, 2)
        if len(hits) != 1:
            raise BadCredentials("no such user" if not hits else "ambiguous user")
        return _user(hits[0])

    def _bind_name(self, user: str) -> str:
        template = self.section.bind_template or "{user}"
        if "=" in template.replace("{user}", ""):  # a DN template: escape as an RDN value
            return template.format(user=escape_rdn(user))
        return template.format(user=user)

    def _own_entry(self, conn: ldap3.Connection, user: str, bind_as: str) -> DirectoryUser:
        """After a direct bind: read the user's entry as the user (attributes, memberOf)."""
        s = self.section
        if s.base_dn:
            filter_ = s.user_filter.format(user=escape_filter_chars(user))
            base, scope = s.base_dn, ldap3.SUBTREE
        elif _is_dn(bind_as):
            filter_, base, scope = "(objectClass=*)", bind_as, ldap3.BASE
        else:
            return DirectoryUser(bind_as)
        try:
            ok, result, response, _ = conn.search(base, filter_, search_scope=scope,
                                                  attributes=list(self.attribute_names),
                                                  size_limit=2)
        except (lx.LDAPException, OSError) as e:
            raise DirectoryError(f"reading the user's entry: {_brief(e)}") from None
        hits = [r for r in response or () if r.get("type") == "searchResEntry"]
        if len(hits) != 1:
            return DirectoryUser(bind_as)
        return _user(hits[0])

    def _groups(self, found: DirectoryUser, user: str) -> tuple[str, ...]:
        s = self.section
        if not s.group_base:
            return found.attributes.get("memberOf", ())
        filter_ = s.group_filter.format(dn=escape_filter_chars(found.dn),
                                        user=escape_filter_chars(user))
        hits = self._search(s.group_base, filter_, [s.group_name_attribute], ldap3.SUBTREE, 1000)
        return tuple(hit["dn"] for hit in hits)


class VerifiedTls(ldap3.Tls):
    """TLS the way the standard library does it: ``ssl.create_default_context`` (the CA
    file or the system store, CERT_REQUIRED, TLS 1.2+) with ``check_hostname`` against
    ``name`` (else the server's host), which is also sent as SNI.

    ldap3's own check (``Tls(valid_names=...)``) accepts a certificate that matches the
    connected address *or* any of the extra names, so a configured ``tls_name`` would
    not be enforced; this one verifies exactly the name asked for, during the handshake.
    """

    def __init__(self, ca_file: Any, name: str | None) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED,
                         ca_certs_file=str(ca_file) if ca_file else None)
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.name = name

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self.context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self.name or connection.server.host)


def group_name(dn: str, attribute: str = "cn") -> str:
    """``cn=sales,ou=groups,...`` -> ``sales`` (the DN itself if it has no such RDN)."""
    try:
        first = parse_dn(dn)[0]
    except (lx.LDAPException, IndexError):
        return dn
    return first[1] if first[0].lower() == attribute.lower() else dn


def _member(groups: Iterable[str], required: Iterable[str]) -> bool:
    have = {g.lower() for g in groups} | {group_name(g).lower() for g in groups}
    return any(r.lower() in have for r in required)


def _user(hit: Mapping[str, Any]) -> DirectoryUser:
    raw = hit.get("raw_attributes") or {}
    attrs = {}
    for name, values in raw.items():
        attrs[name] = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                            for v in values)
    # attribute names are case-insensitive in LDAP: index them as configured
    return DirectoryUser(hit["dn"], _Caseless(attrs))


class _Caseless(dict):  # type: ignore[type-arg]
    def get(self, key: Any, default: Any = None) -> Any:
        for name, value in self.items():
            if name.lower() == str(key).lower():
                return value
        return default


def _is_dn(text: str) -> bool:
    try:
        return bool(parse_dn(text))
    except lx.LDAPException:
        return False


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - a dead connection is dropped whatever it says
        pass


def _desc(result: Mapping[str, Any] | None) -> str:
    if not result:
        return "no result"
    return f"{result.get('result')} {result.get('description', '')}".strip()


def _brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]
