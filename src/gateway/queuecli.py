"""``itpison-gateway queue ...``: look at and manage the queue of a running gateway.

Every command goes through the gateway's control socket (gateway.control), so changes are
made by the scheduler that owns the messages.  When no gateway is running, the read-only
commands (summary, list, show) read the spool directly; the others say the gateway must
run.  The state directory comes from ``--state-dir``, else from ``--config FILE``, else
the gateway's own default ($STATE_DIRECTORY, else ./var).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

SOCKET_TIMEOUT = 120.0  # a hold/delete waits for a delivery in flight (bounded by deadlines)
VERBS = {"held": "held", "released": "released", "deleted": "deleted", "bounced": "bounced",
         "flushed": "flushed"}


class GatewayNotRunning(Exception):
    pass


def register(sub: Any) -> None:
    p = sub.add_parser("queue", help="show and manage the queue of a running gateway",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--config", "-c", metavar="FILE", help="the gateway's configuration file")
    p.add_argument("--state-dir", metavar="DIR", type=Path,
                   help="the gateway's state directory (overrides --config)")
    qsub = p.add_subparsers(dest="queue_command", metavar="SUBCOMMAND", required=True)
    s = qsub.add_parser("summary", help="counts by state and age (minutes), like qshape")
    s.add_argument("--json", action="store_true")
    s = qsub.add_parser("list", help="one line per message")
    s.add_argument("--state", choices=("incoming", "active", "deferred", "hold"))
    s.add_argument("--user", help="messages submitted by this authenticated user")
    s.add_argument("--sender", help="envelope sender (an address, or @domain)")
    s.add_argument("--recipient", help="a recipient (an address, or @domain)")
    s.add_argument("--json", action="store_true")
    s = qsub.add_parser("show", help="envelope, recipients and every attempt of one message")
    s.add_argument("id", metavar="ID")
    s.add_argument("--json", action="store_true")
    s = qsub.add_parser("flush", help="retry now (the given messages, or all)")
    s.add_argument("ids", metavar="ID", nargs="*")
    for name, what in (("hold", "stop delivering until released"),
                       ("release", "deliver held messages again"),
                       ("delete", "remove without delivering or bouncing"),
                       ("bounce", "fail the pending recipients and send the bounce")):
        s = qsub.add_parser(name, help=what)
        s.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(handler=queue)


def state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir).absolute()
    from gateway.config import default_config, load_config
    config = load_config(args.config) if args.config else default_config()
    return config.gateway.state_dir


def request(path: Path, payload: dict[str, Any], timeout: float = SOCKET_TIMEOUT) -> Any:
    """One request over the control socket; raises GatewayNotRunning or RuntimeError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise GatewayNotRunning(f"{path}: {e.strerror}") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the gateway closed the control connection")
            data += chunk
    finally:
        sock.close()
    response = json.loads(data)
    if not response.get("ok"):
        raise RuntimeError(response.get("error", "request failed"))
    return response["result"]


def _local(root: Path, command: str, ids: list[str], filters: dict[str, Any]) -> Any:
    """The read-only commands without a gateway: straight from the spool."""
    from gateway import queueview
    from gateway.spool import _checked
    now = time.time()
    if command == "show":
        entry = queueview.load_entry(root, _checked(ids[0]))
        if entry is None:
            raise RuntimeError(f"{ids[0]}: no such message")
        return entry.to_json(now, detail=True)
    items = queueview.entries(root)
    if command == "summary":
        return queueview.summary(items, now)
    return [e.to_json(now) for e in items if e.matches(**filters)]


def queue(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError
    try:
        root = state_dir(args)
    except (ConfigError, OSError) as e:
        print(f"itpison-gateway queue: {e}", file=sys.stderr)
        return 1
    command = args.queue_command
    ids = list(getattr(args, "ids", None) or ([args.id] if command == "show" else []))
    filters = {k: getattr(args, k) for k in ("state", "user", "sender", "recipient")
               if getattr(args, k, None) is not None}
    payload = {"command": command, "ids": ids, "filters": filters}
    try:
        try:
            result = request(root / "control.sock", payload)
        except GatewayNotRunning as e:
            if command not in ("summary", "list", "show"):
                print(f"itpison-gateway queue {command}: the gateway is not running "
                      f"({e}); start it first", file=sys.stderr)
                return 1
            result = _local(root / "spool", command, ids, filters)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"itpison-gateway queue {command}: {e}", file=sys.stderr)
        return 1
    return _print(command, result, getattr(args, "json", False))


def _print(command: str, result: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if command == "summary":
        columns = result["columns"]
        print(f"{'':10}" + "".join(f"{c:>7}" for c in columns))
        for state, row in result["states"].items():
            print(f"{state:10}" + "".join(f"{row[c]:>7}" for c in columns))
        for domain, count in list(result["pending_by_domain"].items())[:20]:
            print(f"  {domain}: {count} pending")
        return 0
    if command == "list":
        for e in result:
            print(f"{e['id']:<26} {e['state']:<9} {e['size']:>9} {_age(e['age']):>6} "
                  f"<{e['sender']}> -> {', '.join(e['pending']) or '-'}")
        print(f"{len(result)} messages")
        return 0
    if command == "show":
        _show(result)
        return 0
    failed = 0
    for qid, status in result.items():
        print(f"{qid}: {status}")
        failed += status not in VERBS
    return 1 if failed else 0


def _show(e: dict[str, Any]) -> None:
    env = e["envelope"]
    print(f"id:        {e['id']}\nstate:     {e['state']}\nsize:      {e['size']}")
    print(f"received:  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['received_at']))}"
          f" ({_age(e['age'])} ago) from {env.get('client_ip') or '-'}"
          f" user {env.get('auth_user') or '-'}")
    print(f"sender:    <{e['sender']}>\nattempts:  {e['attempts']}")
    for r in e["recipient_status"]:
        reply = f"{r['code'] or ''} {r['enhanced']} {r['text']}".strip()
        print(f"  <{r['recipient']}> {r['status']} {r['host'] or ''} {reply}".rstrip())
    for h in e["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
        print(f"  {when} {h['host'] or '-'} <{h['recipient']}> {h['reply']}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
