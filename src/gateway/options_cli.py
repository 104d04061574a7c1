"""``itpison-gateway options``: the X-Header catalog and policy from the command line.

    itpison-gateway options decode X-LinkOption 192        -> the option names
    itpison-gateway options encode X-LinkOption NotTrackOpen NotTrackAllLink   -> 192
    itpison-gateway options list [FAMILY]                   -> the catalog
    itpison-gateway options explain [--config FILE] --user alice message.eml

``explain`` runs the gateway's own policy (``optionpolicy``) over a message file and
prints the control headers that would be sent, and why; exit 1 if it would be refused.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def register(sub: Any) -> None:
    p = sub.add_parser("options", help="decode, encode and explain ITPison X-Header options",
                       description="The ITPison option catalog (guide Appendix A) and the "
                                   "gateway's [options] policy.")
    ops = p.add_subparsers(dest="operation", metavar="OPERATION", required=True)
    d = ops.add_parser("decode", help="an integer to option names")
    d.add_argument("family", metavar="HEADER_OR_FAMILY", help="X-LinkOption, LinkType, ...")
    d.add_argument("value", metavar="INTEGER")
    d.set_defaults(handler=decode)
    e = ops.add_parser("encode", help="option names to the integer")
    e.add_argument("family", metavar="HEADER_OR_FAMILY")
    e.add_argument("names", metavar="NAME", nargs="+", help="friendly or guide names, any case")
    e.set_defaults(handler=encode)
    ls = ops.add_parser("list", help="print the catalog")
    ls.add_argument("family", metavar="FAMILY", nargs="?")
    ls.set_defaults(handler=list_catalog)
    x = ops.add_parser("explain", help="the control headers the gateway would send for a message")
    x.add_argument("message", metavar="MESSAGE_FILE", help="an RFC 5322 message (.eml)")
    x.add_argument("--config", metavar="FILE", help="configuration (default: embedded)")
    who = x.add_mutually_exclusive_group()
    who.add_argument("--user", help="as this authenticated user (groups from the users file)")
    who.add_argument("--client-ip", default="127.0.0.1",
                     help="as a trusted-network client at this address (the default)")
    x.add_argument("--group", dest="groups", action="append", default=[], metavar="GROUP",
                   help="an extra group of the user, as a directory would supply it")
    x.add_argument("--queue-id", default="EXPLAIN", help="for {queue_id} in templates")
    x.set_defaults(handler=explain)


def _family(name: str) -> Any:
    from gateway import options as O
    try:
        return O.family(name)
    except O.UnknownName as e:
        raise _usage(str(e)) from None


class _BadArgument(Exception):
    """A bad family name or number: exit status 2, like argparse's own usage errors."""


def _usage(message: str) -> Exception:
    return _BadArgument(message)


def _usage_errors(handler: Callable[[argparse.Namespace], int]
                  ) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _BadArgument as e:
            print(f"itpison-gateway options {args.operation}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return run


@_usage_errors
def decode(args: argparse.Namespace) -> int:
    from gateway import options as O
    family = _family(args.family)
    if not args.value.isdigit() or int(args.value) > O.UINT32_MAX:
        raise _usage(f"{args.value!r} is not an integer 0..{O.UINT32_MAX}")
    value = int(args.value)
    if isinstance(family, O.ValueFamily):
        rest = 0
        if family.mask is not None:
            rest, value = value & ~family.mask, value & family.mask
        option = family.by_value(value)
        if option is None:
            print(f"{value} is not a {family.name} value", file=sys.stderr)
            return EXIT_FAILURE
        print(f"{option.value}\t{option.name}\t{option.const}")
        if rest:
            print(f"unknown bits {rest}: outside {family.name} mask {family.mask}",
                  file=sys.stderr)
        return EXIT_FAILURE if rest else EXIT_OK
    options, unknown = family.decode(value)
    if family.field_mask and value & family.field_mask:
        print(f"{value & family.field_mask}\t(number in cLinkMask {family.field_mask})")
    for option in options:
        print(f"{option.value}\t{option.name}\t{option.const}")
    if unknown:
        print(f"unknown bits {unknown}: not in the guide's {family.name}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


@_usage_errors
def encode(args: argparse.Namespace) -> int:
    from gateway import options as O
    family = _family(args.family)
    try:
        if isinstance(family, O.ValueFamily):
            if len(args.names) != 1:
                raise ValueError(f"{family.name} is one value, not a combination")
            print(family.parse(args.names[0]))
        else:
            print(family.encode(args.names))
    except ValueError as e:
        print(f"itpison-gateway options encode: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


@_usage_errors
def list_catalog(args: argparse.Namespace) -> int:
    from gateway import options as O
    families = [_family(args.family)] if args.family else list(O.FAMILIES.values())
    for family in families:
        print(f"{family.name}:")
        for option in family.options:
            note = f"  # {option.note}" if option.note else ""
            print(f"  {option.value:>10}  {option.name:<40} {option.const}{note}")
    return EXIT_OK


def explain(args: argparse.Namespace) -> int:
    from gateway import config as C
    from gateway.auth_file import UsersFileError, load_users
    from gateway.optionpolicy import Submitter, XHeaderPolicy
    from gateway.reply import ReplyError

    try:
        config = C.load_config(args.config) if args.config else C.default_config()
        raw = open(args.message, "rb").read()
    except C.ConfigError as e:
        print(f"itpison-gateway options explain: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"itpison-gateway options explain: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if args.user is not None:
        groups = list(args.groups)
        if config.auth.users_file is not None:
            try:
                record = load_users(config.auth.users_file).get(args.user)
            except UsersFileError as e:
                print(f"itpison-gateway options explain: {e}", file=sys.stderr)
                return EXIT_FAILURE
            groups = list(record.groups if record else ()) + groups
        who = Submitter(args.user, True, tuple(groups))
        print(f"as user {args.user}" + (f" (groups: {', '.join(groups)})" if groups else ""))
    else:
        who = Submitter(args.client_ip, False, tuple(args.groups))
        print(f"as trusted-network client {args.client_ip}")
    import time
    try:
        outcome = XHeaderPolicy(config.options).apply(who, message, time.time(), args.queue_id)
    except ReplyError as e:
        print(f"refused: {e.reply}")
        return EXIT_FAILURE
    for note in outcome.notes or ("no control headers in the message and none to add",):
        print(f"  {note}")
    print("sent:" if outcome.headers else "sent: no control headers")
    for header, text in outcome.headers:
        print(f"  {header.name}: {text}")
    return EXIT_OK
