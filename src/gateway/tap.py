"""``twistd -n itpison-gateway [--config FILE]``: options and makeService.

The only module that imports the global reactor.  The configuration is loaded and
validated while the options are parsed, so a bad file stops twistd with a message that
names the key, before anything listens.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from gateway.config import Config, ConfigError, default_config, load_config


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("SMTP relay gateway to the ITPison mail relay.  Without --config it runs on "
                "the embedded default: listeners on 127.0.0.1:2525 (smtp), 2587 (submission) "
                "and 2465 (smtps), spool under ./var (or $STATE_DIRECTORY).")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded configuration)"],
    ]

    def postOptions(self) -> None:
        try:
            self.loaded: Config = (load_config(self["config"]) if self["config"]
                                   else default_config())
        except ConfigError as e:
            where = self["config"] or "embedded default"
            raise usage.UsageError(f"{where}: {e}") from None


def makeService(options: Options):
    from twisted.internet import reactor

    from gateway.reload import HangupService
    from gateway.sdnotify import Notifier
    from gateway.service import GatewayService
    from gateway.supervisor import Supervisor
    if options.loaded.service.workers > 1:
        # The workers log through the same observer as twistd (--logger).
        twistd = getattr(options, "parent", None)
        logger = twistd.get("logger") if twistd is not None else None
        gateway: Any = Supervisor(options.loaded, reactor, Notifier(), logger=logger)
    else:
        gateway = GatewayService(options.loaded, reactor, Notifier())
    HangupService(gateway.reload, reactor).setServiceParent(gateway)
    return gateway
