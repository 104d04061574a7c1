"""The ``itpison-gateway`` command: administration next to the twistd service.

Each subcommand is a ``register(subparsers)`` function in ``COMMANDS`` that adds its parser
and sets ``handler``; a handler takes the parsed arguments and returns the exit status
(0 ok, 1 failure; argparse exits 2 on usage errors).  Heavy modules are imported inside the
handlers so ``--help`` stays fast and one broken module can't take every command down.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway import __version__, options_cli

Subparsers = Any  # argparse's _SubParsersAction is private
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments found by a handler: exit status 2."""


def _register_check_config(sub: Subparsers) -> None:
    p = sub.add_parser("check-config", help="validate a configuration file and show it",
                       description="Load FILE, print the effective configuration, exit 1 "
                                   "with the error if it is invalid.")
    p.add_argument("file", metavar="FILE", help="the TOML configuration file")
    p.set_defaults(handler=check_config)


def check_config(args: argparse.Namespace) -> int:
    from gateway import config as config_module

    try:
        config = config_module.load_config(args.file)
    except config_module.ConfigError as e:
        # e.path is the key path ("listeners[0].mode"), or the file itself for read errors.
        print(str(e) if e.path == str(args.file) else f"{args.file}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"{args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    describe = getattr(config_module, "describe", None)
    lines = describe(config) if describe is not None else _summary(config)
    print(lines if isinstance(lines, str) else "\n".join(lines))
    print("configuration ok")
    return EXIT_OK


def _summary(config: Any) -> list[str]:
    """A short summary when config.describe is not available (never shows secrets)."""
    lines = [f"gateway.hostname = {config.gateway.hostname}",
             f"gateway.state_dir = {config.gateway.state_dir}"]
    for listener in config.listeners:
        lines.append(f"listener {listener.name}: {listener.mode} on {listener.endpoint}")
    for i, host in enumerate(config.smarthosts):
        lines.append(f"smarthost[{i}]: {host.address} ({host.security})")
    lines.append(f"auth.users_file = {config.auth.users_file or '-'}")
    return lines


def _register_passwd(sub: Subparsers) -> None:
    p = sub.add_parser(
        "passwd", help="add a local user or change a password",
        description="Set USER's password in USERS_FILE (created if missing).  The password "
                    "is asked twice on a terminal, else read as one line from stdin.")
    p.add_argument("users_file", metavar="USERS_FILE")
    p.add_argument("user", metavar="USER")
    p.add_argument("--sender", dest="senders", action="append", metavar="ADDR_OR_@DOMAIN_OR_*",
                   help="an envelope sender USER may use (repeatable); replaces the "
                        "user's list, which is kept when no --sender is given")
    p.add_argument("--group", dest="groups", action="append", metavar="GROUP",
                   help="an [options.groups.GROUP] the user belongs to (repeatable); "
                        "replaces the user's groups, which are kept when none is given")
    p.set_defaults(handler=passwd)


def passwd(args: argparse.Namespace) -> int:
    from gateway.auth import SenderPolicy
    from gateway.auth_file import UsersFileError, check_username, load_users, set_user

    try:
        check_username(args.user)
        if args.senders is not None:
            SenderPolicy.parse(args.senders)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        password = _read_password()
        set_user(args.users_file, args.user, password, args.senders, args.groups)
        senders = load_users(args.users_file)[args.user].senders
    except (ValueError, UsersFileError) as e:
        print(f"itpison-gateway passwd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"itpison-gateway passwd: {args.users_file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"user {args.user} updated in {args.users_file}")
    if not senders:
        print(f"warning: {args.user} may not send as any address; add --sender",
              file=sys.stderr)
    return EXIT_OK


def _read_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Repeat password: "):
            raise ValueError("the passwords do not match")
    else:
        password = sys.stdin.readline()
        password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError("empty password refused")
    return password


def _register_queue(sub: Subparsers) -> None:
    from gateway import queuecli  # light: no reactor, no twisted.mail
    queuecli.register(sub)


COMMANDS: list[Callable[[Subparsers], None]] = [_register_check_config, _register_passwd,
                                               _register_queue, options_cli.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itpison-gateway",
                                     description="itpison-gateway administration")
    parser.add_argument("--version", action="version", version=f"itpison-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (EXIT_USAGE if e.code else EXIT_OK)
    try:
        return args.handler(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
