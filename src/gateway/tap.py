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
        logger, forward = _worker_logging(getattr(options, "parent", None))
        gateway: Any = Supervisor(options.loaded, reactor, Notifier(), logger=logger,
                                  forward_logs=forward)
    else:
        gateway = GatewayService(options.loaded, reactor, Notifier())
    HangupService(gateway.reload, reactor).setServiceParent(gateway)
    return gateway


def _worker_logging(twistd: Any) -> tuple[str | None, bool]:
    """How the workers log, from twistd's own options: through the same ``--logger`` on
    the shared stdout, in twistd's text format on stdout, or (``--logfile``, ``--syslog``,
    or a daemon's default twistd.log) by sending their events to the supervisor, so that
    one process writes and rotates the file."""
    if twistd is None:
        return None, False
    if twistd.get("logger"):
        return twistd["logger"], False
    logfile = twistd.get("logfile")
    to_stdout = logfile == "-" or (twistd.get("nodaemon") and not logfile)
    return None, bool(twistd.get("syslog")) or not to_stdout
