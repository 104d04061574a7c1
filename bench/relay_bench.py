"""Relay benchmark: N messages from C concurrent sessions, end to end to a local sink.

    python bench/relay_bench.py                         # the gateway: 10000 x 5 KB, 20 sessions
    python bench/relay_bench.py -n 2000 -c 10 --json
    python bench/relay_bench.py --target postfix --port 2526 --pid MASTER_PID --sink-port S

Target "gateway" (the default): starts a counting sink (bench/sink.py) on a free port,
writes a gateway configuration into a temporary directory (one smtp listener on a free
127.0.0.1 port, the sink as the only smarthost with security "none", the spool in the
temporary directory, default trusted networks, queue and limits), starts
``twistd -n --pidfile= itpison-gateway --config ...`` and learns its port from the log.

Target "postfix": the server already runs (bench/postfix_bench.sh starts it, relaying to
``--sink-port``); ``--pid`` is its master process, whose tree is measured.

Then the load generator (bench/loadgen.py, its own process) sends the messages, and the
run ends when the sink has every accepted message (or at ``--timeout``).  Everything this
script started is stopped when it exits.  Reported: messages/s end to end (first connect
to the last message at the sink), accept rate (first connect to the last 250), latency
from end of DATA to the reply (p50/p99/max), relay delay (250 to arrival at the sink),
errors, the server's peak RSS and CPU time, and the sink's counts.  The summary is also
written to bench/results/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procstat import (  # noqa: E402
    MemorySampler,
    cpu_seconds,
    cpu_user_sys,
    machine_busy_seconds,
    schedstat,
    status_kb,
    thread_cpu,
    tree_cpu,
    tree_hwm_kb,
)

LISTENING = re.compile(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)")
_libc = ctypes.CDLL(None, use_errno=True)
# twistd in this interpreter, with its own pid (a launcher script could fork or re-exec)
# (printing where the gateway package was imported from, so a result says what it measured)
TWISTD = ("import sys, gateway; print('gateway package:', gateway.__file__, flush=True); "
          "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
GATEWAY_FROM = re.compile(r"gateway package: (\S+)")


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: nothing outlives a killed bench


class Children:
    """Every process the bench starts; ``stop_all`` ends them (TERM, then KILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw: object) -> subprocess.Popen:
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


class Sink:
    """bench/sink.py in a child process; its progress lines are read by a thread."""

    def __init__(self, children: Children, run_id: str, port: int) -> None:
        self.proc = children.start(
            [sys.executable, str(HERE / "sink.py"), "--port", str(port), "--run-id", run_id],
            stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        if not first.startswith("listening "):
            raise RuntimeError(f"sink did not start: {first!r}")
        self.port = int(first.split()[1])
        self.count = 0
        self.final: dict | None = None
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, _, rest = line.partition(" ")
            with self.changed:
                if kind == "progress":
                    self.count = int(rest)
                elif kind == "final":
                    self.final = json.loads(rest)
                self.changed.notify_all()

    def wait_count(self, n: int, deadline: float) -> bool:
        with self.changed:
            while self.count < n and self.proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
            return self.count >= n

    def finish(self, children: Children) -> dict:
        children.stop(self.proc)
        with self.changed:
            self.changed.wait_for(lambda: self.final is not None, timeout=10)
        if self.final is None:
            raise RuntimeError("the sink gave no final report")
        return self.final


def gateway_config(tmp: Path, sink_port: int, extra: str) -> Path:
    config = tmp / "gateway.toml"
    config.write_text(f"""\
[gateway]
hostname = "gw.bench.test"
state_dir = "{tmp / 'state'}"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
mode = "smtp"

[[smarthosts]]
host = "127.0.0.1"
port = {sink_port}
security = "none"
{extra}
""")
    return config


def start_gateway(children: Children, tmp: Path, sink_port: int, extra: str, preamble: str,
                  src: Path | None, wait: float = 60.0) -> tuple[subprocess.Popen, int, Path]:
    config = gateway_config(tmp, sink_port, extra)
    logfile = tmp / "gateway.log"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src.resolve()),
                                                          env.get("PYTHONPATH")]))
    # The log on stdout, as under systemd (journald): with workers, each writes its own
    # lines there (a --logfile would route them through the supervisor instead).
    proc = children.start(
        [sys.executable, "-c", preamble + "\n" + TWISTD, "-n", "--pidfile=",
         "itpison-gateway", "--config", str(config)],
        cwd=tmp, env=env, stdout=open(logfile, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        match = LISTENING.search(text)
        if match:
            return proc, int(match.group(1)), logfile
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the gateway did not start listening:\n{text[-3000:]}")


def describe_source(src: Path) -> str:
    """The git commit of a source tree (with "+dirty" for local changes), or its path."""
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(src)
    return f"{commit}{'+dirty' if dirty else ''} ({src})"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of unsorted ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(args: argparse.Namespace, load: dict, sink: dict, server: dict) -> dict:
    arrivals = {int(k): v for k, v in sink["arrivals"].items()}
    accepted_at = {int(k): v for k, v in load["accepted_at"].items()}
    delivered = [arrivals[i] for i in accepted_at if i in arrivals]
    start = load["first_connect"]
    complete = len(delivered) == len(accepted_at) and bool(accepted_at)
    e2e = (max(delivered) - start) if delivered else 0.0
    accept = load["last_reply"] - start
    lat = load["latency"]
    delay = [arrivals[i] - t for i, t in accepted_at.items() if i in arrivals]
    ms = 1000.0
    timeline: list[list[int]] = []  # per second since the first connect: [250s, at the sink]
    for times, column in ((accepted_at.values(), 0), (delivered, 1)):
        for t in times:
            second = int(t - start)
            while len(timeline) <= second:
                timeline.append([0, 0])
            timeline[second][column] += 1
    return {
        "target": args.target, "n": args.n, "c": args.c, "size": args.size,
        "message_bytes": round(load["message_bytes"]), "nproc": os.cpu_count(),
        "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "accepted": load["accepted"], "answered": load["answered"],
        "errors": load["errors"], "error_count": sum(load["errors"].values()),
        "delivered": len(delivered), "complete": complete,
        "e2e_seconds": round(e2e, 3),
        "e2e_msgs_per_s": round(len(delivered) / e2e, 1) if e2e > 0 else 0.0,
        "accept_seconds": round(accept, 3),
        "accept_msgs_per_s": round(load["accepted"] / accept, 1) if accept > 0 else 0.0,
        "latency_ms": {"p50": round(percentile(lat, 50) * ms, 2),
                       "p90": round(percentile(lat, 90) * ms, 2),
                       "p99": round(percentile(lat, 99) * ms, 2),
                       "max": round(max(lat, default=0) * ms, 2),
                       "mean": round(sum(lat) / len(lat) * ms, 2) if lat else 0.0},
        "relay_delay_ms": {"p50": round(percentile(delay, 50) * ms, 1),
                           "p99": round(percentile(delay, 99) * ms, 1),
                           "max": round(max(delay, default=0) * ms, 1)},
        "server": server,
        "sink": {k: sink[k] for k in ("count", "unique", "duplicates", "foreign", "connections")},
        "loadgen_cpu_s": round(load["cpu"], 2), "sink_cpu_s": round(sink["cpu"], 2),
        "connects": load["connects"], "timeline": timeline,
    }


def report_text(s: dict) -> str:
    lat, delay, srv = s["latency_ms"], s["relay_delay_ms"], s["server"]
    lines = [
        f"target {s['target']}: {s['n']} messages of {s['message_bytes']} bytes, "
        f"{s['c']} sessions ({s['connects']} connects)",
        f"  accepted {s['accepted']}/{s['n']}, errors {s['error_count']} {s['errors'] or ''}",
        f"  end to end  {s['e2e_msgs_per_s']:>8} msg/s  ({s['delivered']} at the sink after "
        f"{s['e2e_seconds']} s{'' if s['complete'] else ', INCOMPLETE'})",
        f"  accept rate {s['accept_msgs_per_s']:>8} msg/s  (last 250 after {s['accept_seconds']} s)",
        f"  end of DATA -> reply: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms",
        f"  250 -> sink: p50 {delay['p50']} ms, p99 {delay['p99']} ms, max {delay['max']} ms",
        f"  server: peak RSS {srv['peak_rss_mb']} MB ({srv['rss_note']}), sampled peak PSS "
        f"{srv['sampled_pss_mb']} MB over {srv['max_processes']} processes; CPU "
        f"{srv['cpu_run_s']} s during the run ({srv['cpu_cores']} cores busy), "
        f"{srv['cpu_total_s']} s in all",
        f"  loadgen CPU {s['loadgen_cpu_s']} s, sink CPU {s['sink_cpu_s']} s; sink: {s['sink']}",
        f"  machine: {srv['machine_busy_cores']} of {s['nproc']} cores busy during the run, "
        f"{srv['other_cores']} of them by other processes (not server, loadgen, sink or "
        f"this script, which used {srv['bench_cpu_s']} s)",
    ]
    if "spool_left" in srv:
        lines.append(f"  gateway from {srv['gateway_source']}")
        lines.append(f"  gateway: {srv['spool_left']} files left in spool/queue, "
                     f"{srv['log_tracebacks']} tracebacks in the log; CPU in all: user "
                     f"{srv['cpu_user_s']} s, system {srv['cpu_sys_s']} s; reactor thread "
                     f"{srv['cpu_main_thread_s']} s, {srv['threads'] - 1} other threads "
                     f"{srv['cpu_other_threads_s']} s")
        rt = srv["reactor_thread"]
        lines.append(f"  reactor thread during the run: {rt['wall_s']} s wall = {rt['on_cpu_s']} s "
                     f"on a CPU + {rt['waiting_for_cpu_s']} s runnable, waiting for a CPU + "
                     f"{rt['sleeping_s']} s sleeping (idle in epoll, or waiting for the GIL)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=("gateway", "postfix"), default="gateway")
    p.add_argument("--port", type=int, help="the server's port (--target postfix)")
    p.add_argument("--pid", type=int, help="the server's root pid (--target postfix)")
    p.add_argument("--sink-port", type=int, default=0, help="the sink's port (default: free)")
    p.add_argument("-n", type=int, default=10000, help="messages in total (default 10000)")
    p.add_argument("-c", type=int, default=20, help="concurrent sessions (default 20)")
    p.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="global deadline in seconds (default 1800)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--label", default="", help="a label stored with the results")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--extra-toml", default="", help="appended to the gateway configuration")
    p.add_argument("--workers", type=int, default=None,
                   help="[service] workers for the gateway (default: its default, 1)")
    p.add_argument("--src", type=Path,
                   help="run the gateway from this source directory (one holding gateway/), "
                        "e.g. an exported commit; default: the installed gateway")
    p.add_argument("--preamble", default="",
                   help="Python code run in the gateway process before twistd (experiments "
                        "only, e.g. a monkeypatch; the figures are then not the gateway's)")
    p.add_argument("--profile", type=Path,
                   help="record the gateway with py-spy (collapsed stacks) into this file")
    p.add_argument("--py-spy-option", action="append", default=[],
                   help="passed to py-spy record, e.g. --py-spy-option=--gil")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.target == "postfix" and (args.port is None or args.pid is None):
        p.error("--target postfix needs --port and --pid")
    return args


def run(args: argparse.Namespace, children: Children, tmp: Path) -> dict:
    deadline = time.monotonic() + args.timeout
    run_id = f"b{int(time.time())}{os.getpid()}"
    sink = Sink(children, run_id, args.sink_port)
    server: dict = {}
    if args.target == "gateway":
        extra = args.extra_toml
        if args.workers is not None:
            extra = f"[service]\nworkers = {args.workers}\n{extra}"
        gateway, port, logfile = start_gateway(children, tmp, sink.port, extra,
                                                 args.preamble, args.src)
        root = gateway.pid
    else:
        port, root, logfile = args.port, args.pid, None
    sampler = MemorySampler(root).start()
    cpu_before = tree_cpu(root)
    busy_before = machine_busy_seconds()
    self_before = time.process_time()
    main_before, main_wall_before = schedstat(root), time.monotonic()
    profiler = None
    if args.profile:
        profiler = children.start(["py-spy", "record", "--pid", str(root), "--format", "raw",
                                   "--rate", "100", "--nonblocking", *args.py_spy_option,
                                   "-o", str(args.profile)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loadgen = children.start(
        [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "-n", str(args.n),
         "-c", str(args.c), "--size", str(args.size), "--run-id", run_id],
        stdout=subprocess.PIPE)
    try:
        out, _ = loadgen.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        raise RuntimeError("the load generator did not finish before --timeout") from None
    if loadgen.returncode != 0:
        raise RuntimeError(f"the load generator failed ({loadgen.returncode})")
    load = json.loads(out)
    sink.wait_count(load["accepted"], deadline)
    time.sleep(0.3)  # a last progress tick: anything beyond (duplicates, bounces) shows up
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(30)
    peak = sampler.stop()
    cpu_after = tree_cpu(root)
    main_after, main_wall = schedstat(root), time.monotonic() - main_wall_before
    busy = machine_busy_seconds() - busy_before
    wall = max(time.monotonic() - load["first_connect"], 1e-9)
    if args.target == "gateway":
        hwm, note = status_kb(root, "VmHWM"), "VmHWM of the twistd process"
        found = GATEWAY_FROM.search((tmp / "gateway.log").read_text(errors="replace"))
        server["gateway_package"] = found.group(1) if found else "?"
        server["gateway_source"] = describe_source(Path(server["gateway_package"]).parent.parent)
        server["spool_left"] = len(list((tmp / "state" / "spool" / "queue").iterdir()))
        text = "".join(p.read_text(errors="replace") for p in logfile.parent.glob("gateway.log*"))
        server["log_tracebacks"] = text.count("Traceback (most recent call last)")
        server["cpu_total_s"] = round(cpu_seconds(root), 2)
        server["cpu_user_s"], server["cpu_sys_s"] = (round(x, 2) for x in cpu_user_sys(root))
        threads = thread_cpu(root)
        server["cpu_main_thread_s"] = threads.pop(next(k for k in threads
                                                       if k.split()[0] == str(root)))
        server["cpu_other_threads_s"] = round(sum(threads.values()), 2)
        server["threads"] = len(threads) + 1
        on_cpu, runnable = (b - a for a, b in zip(main_before, main_after, strict=True))
        server["reactor_thread"] = {  # during the run: where its wall-clock time went
            "wall_s": round(main_wall, 2), "on_cpu_s": round(on_cpu, 2),
            "waiting_for_cpu_s": round(runnable, 2),
            "sleeping_s": round(main_wall - on_cpu - runnable, 2)}
    else:
        hwm, note = tree_hwm_kb(root), "sum of VmHWM over the live processes"
        server["cpu_total_s"] = round(cpu_after, 2)
    server.update(peak_rss_mb=round(hwm / 1024, 1), rss_note=note,
                  sampled_rss_mb=round(peak.rss_kb / 1024, 1),
                  sampled_pss_mb=round(peak.pss_kb / 1024, 1), max_processes=peak.processes,
                  cpu_run_s=round(cpu_after - cpu_before, 2),
                  cpu_cores=round((cpu_after - cpu_before) / wall, 2),
                  machine_busy_cores=round(busy / wall, 2),
                  loadavg=Path("/proc/loadavg").read_text().split()[0])
    final = sink.finish(children)
    bench_cpu = time.process_time() - self_before  # this script: sampler, sink reader
    ours = server["cpu_run_s"] + load["cpu"] + final["cpu"] + bench_cpu
    server["bench_cpu_s"] = round(bench_cpu, 2)
    server["other_cores"] = round(max(busy - ours, 0.0) / wall, 2)
    return summarize(args, load, final, server)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy (pip install py-spy)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    try:
        summary = run(args, children, tmp)
    finally:
        children.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["label"] = args.label
    if args.preamble:
        summary["preamble"] = args.preamble
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = f"{summary['target']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.results_dir / name).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary) if args.json else report_text(summary))
    return 0 if summary["complete"] and not summary["error_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
