"""The AUTH backends of one configuration: checkers by name, a portal per listener chain,
and the upstream-account policy.  Built whole at start and again on every reload, so a
reload swaps them in one step (gateway.reload).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.cred.portal import Portal

from gateway.auth import make_portal
from gateway.auth_file import FileChecker
from gateway.auth_ldap import LdapChecker
from gateway.auth_omicard import OmicardChecker
from gateway.config import Config, ListenerSection, configured_backends
from gateway.upstream import CredentialSealer, UpstreamPolicy, load_key


class AuthBackends:
    """``checkers`` by backend name; ``portal_for(listener)``; ``services`` to run (LDAP)."""

    def __init__(self, config: Config, reactor: Any, auth_pool: Any, connector: Any) -> None:
        self.config = config
        self.reactor = reactor
        auth = config.auth
        self.checkers: dict[str, Any] = {}
        self.services: list[service.IService] = []
        if auth.ldap is not None:
            ldap = LdapChecker(auth.ldap, reactor)
            self.services.append(ldap)
            self.checkers["ldap"] = ldap
        if auth.omicard is not None:
            self.checkers["omicard"] = OmicardChecker(auth.omicard, config.smarthosts,
                                                      config.relay, config.gateway.hostname,
                                                      reactor, connector=connector)
        if auth.users_file is not None:
            self.checkers["file"] = FileChecker(auth.users_file, reactor, auth_pool)
        self._portals: dict[tuple[str, ...], Portal] = {}

    def portal_for(self, listener: ListenerSection) -> Portal | None:
        """The listener's checker chain (``auth = [...]``, default: every backend, in the
        order ldap, omicard, file); one portal per distinct chain."""
        names = listener.auth or configured_backends(self.config.auth)
        names = tuple(n for n in names if n in self.checkers)
        if not names:
            return None
        if names not in self._portals:
            self._portals[names] = make_portal([self.checkers[n] for n in names], self.reactor,
                                               self.config.auth.failure_floor)
        return self._portals[names]


def upstream_policy(config: Config) -> UpstreamPolicy | None:
    """Per-user and per-group upstream accounts; None: everything under the global one.
    The credential key is loaded (or made) only when OMICard users relay as themselves."""
    auth = config.auth
    sealer = None
    if auth.omicard is not None and auth.omicard.relay_as_user:
        sealer = CredentialSealer(load_key(auth.omicard.key_file, config.gateway.state_dir))
    if sealer is None and not auth.upstream_accounts:
        return None
    return UpstreamPolicy(sealer, auth.upstream_accounts)
