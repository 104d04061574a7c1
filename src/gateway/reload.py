"""Reload without restart (SIGHUP, ``systemctl reload``): all or nothing.

``Reloader.reload()`` reads the configuration file again and, only when it is valid and
every new piece can be built (certificates that load and match their keys, the users
file's checker, the X-Header policy, the relay), swaps them into the running gateway:

- TLS certificates per listener (``certs.SwappableServerTLS``): the next handshake uses
  the new one, sessions already encrypted keep theirs;
- the users file and AUTH settings (a new portal), ``[limits]``, ``[relay]``
  trusted networks and limits for new sessions, the X-Header policy, rate-limit rules;
- the smarthost list and ``[relay]`` client settings: a new relay takes the next delivery,
  the old one finishes its deliveries in flight and QUITs its connections;
- ``[queue]`` retry settings, for the next scheduling decision.

Sessions in progress keep the settings they started with, and queued mail stays where it
is.  A file that fails validation changes nothing: the error is logged (``event=reload``,
``result=refused``) and the running configuration stays.  What needs new sockets or a new
spool (listeners' endpoints, ``gateway.state_dir``, ``[metrics]``,
the Redis address) is logged as "needs a restart" and keeps its running value.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from gateway import tls
from gateway.authsetup import AuthBackends, upstream_policy
from gateway.certs import CertificateSource
from gateway.config import Config, ConfigError, default_config, load_config
from gateway.listener import ListenerSettings
from gateway.optionpolicy import XHeaderPolicy
from gateway.relay import SmarthostRelay
from gateway.sendrate import send_rate

log = Logger(namespace="gateway.reload")


def load_again(current: Config) -> Config:
    """The configuration from the same place as ``current``."""
    if current.source is None:
        return default_config()
    return load_config(current.source)


def restart_only(old: Config, new: Config) -> list[str]:
    """The changed settings a reload cannot apply."""
    changed = []
    shape = [(lst.name, lst.endpoint, lst.mode, lst.proxy_protocol_from) for lst in old.listeners]
    if shape != [(lst.name, lst.endpoint, lst.mode, lst.proxy_protocol_from)
                 for lst in new.listeners]:
        changed.append("listeners (name, endpoint, mode, proxy_protocol_from)")
    if old.gateway.state_dir != new.gateway.state_dir:
        changed.append("gateway.state_dir")
    if old.metrics != new.metrics:
        changed.append("[metrics]")
    if (old.ratelimit.redis, old.ratelimit.redis_password) != (new.ratelimit.redis,
                                                               new.ratelimit.redis_password):
        changed.append("ratelimit.redis")
    return changed


class Reloader:
    """Re-reads and applies the configuration of one ``GatewayService``."""

    def __init__(self, gateway: Any, load: Callable[[Config], Config] = load_again) -> None:
        self.gateway = gateway
        self.load = load
        self.reloads = 0

    def reload(self) -> bool:
        """True when the new configuration is in force."""
        gw = self.gateway
        gw.notifier.reloading()
        try:
            new = self.load(gw.config)
            apply = self._prepare(new)
        except (ConfigError, tls.TLSConfigError, OSError, ValueError) as e:
            log.error("reload refused, the running configuration stays: {error}",
                      error=str(e), event="reload", result="refused")
            gw.notifier.ready("running; last reload refused: " + str(e)[:200])
            return False
        kept = restart_only(gw.config, new)
        apply()
        self.reloads += 1
        if kept:
            log.warn("reload: {changed} changed and need a restart; the running values stay",
                     changed=", ".join(kept), event="reload_restart_needed")
        log.info("configuration reloaded from {source}", source=str(new.source or "default"),
                 event="reload", result="ok")
        gw.notifier.ready(gw.status_text())
        return True

    def _prepare(self, new: Config) -> Callable[[], None]:
        """Build everything that can fail; return the swap that cannot."""
        gw = self.gateway
        kept = restart_only(gw.config, new)
        by_name = {lst.name: lst for lst in new.listeners}
        swaps = []
        for name, creator in gw.tls_creators.items():
            lst = by_name.get(name)
            if lst is None:
                continue
            cert, key = gw.certificate_for(lst, new)
            swaps.append(creator.prepare(CertificateSource(cert, key, lst.tls_min_version)))
        options = XHeaderPolicy(new.options)
        relay_changed = (new.smarthosts != gw.config.smarthosts or new.relay != gw.config.relay
                         or new.gateway.hostname != gw.config.gateway.hostname
                         or new.auth.omicard != gw.config.auth.omicard
                         or new.auth.upstream_accounts != gw.config.auth.upstream_accounts)
        # The upstream accounts travel with the relay: rebuilt together or kept together.
        upstream = upstream_policy(new) if relay_changed else gw.upstream
        relay = (SmarthostRelay(new.smarthosts, new.relay, new.gateway.hostname, gw.reactor,
                                upstream=upstream) if relay_changed else None)
        auth = AuthBackends(new, gw.reactor, gw.auth_pool, (relay or gw.relay).connector)
        if kept:
            new = replace(new, gateway=replace(new.gateway, state_dir=gw.config.gateway.state_dir),
                          listeners=gw.config.listeners, metrics=gw.config.metrics)

        def apply() -> None:
            for swap in swaps:
                swap()
            old_auth, gw.auth = gw.auth, auth
            for backend in old_auth.services:  # e.g. the LDAP checker's thread pool
                backend.disownServiceParent()
            for backend in auth.services:
                backend.setServiceParent(gw)
            gw.options, gw.upstream = options, upstream
            for context in gw.contexts:
                lst = by_name.get(context.settings.name)
                if lst is not None:
                    context.settings = ListenerSettings.from_config(lst, new)
                    context.portal = auth.portal_for(lst)
                context.options, context.upstream = options, upstream
            gw.connections.max_total = new.limits.max_connections
            gw.connections.max_per_ip = new.limits.max_connections_per_ip
            gw.throttle.max_failures = new.auth.max_failures
            gw.throttle.window = new.auth.failure_window
            gw.limiter.reconfigure(new.ratelimit)
            gw.scheduler.cfg = new.queue
            gw.scheduler.hostname = new.gateway.hostname
            if new.relay.messages_per_second != gw.config.relay.messages_per_second:
                gw.scheduler.send_rate = send_rate(new.relay.messages_per_second, gw.reactor)
            if relay is not None:
                old, gw.relay = gw.relay, relay
                gw.scheduler.relay = relay
                gw.retire_relay(old)
            gw.config = new

        return apply


class HangupService(service.Service):
    """SIGHUP calls ``reload`` (without a handler, SIGHUP kills twistd: twisted-notes §4).
    The previous handler comes back when the service stops."""

    def __init__(self, reload: Callable[[], object], reactor: Any) -> None:
        self.reload = reload
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
