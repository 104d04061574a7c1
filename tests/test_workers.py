"""``[service] workers = 2`` end to end: a real twistd supervisor and two worker processes
on one listening socket and one spool, a TLS fake smarthost, smtplib clients."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from gatewayrig import send_unix
from twistdrig import PORT_RE, SRC, TwistdProcess, gateway_toml, tls_smarthost


def write_config(tmp_path: Path, smarthost_port: int, ca: Path, extra: str = "") -> Path:
    """Two workers, the TLS fake smarthost, quick retries, metrics on a free port."""
    return gateway_toml(tmp_path, smarthost=tls_smarthost(smarthost_port, ca), extra=f"""
[relay]
breaker_failures = 1000

[queue]
retry_min = 1
retry_max = 2

[service]
workers = 2
stop_timeout = "5s"

[metrics]
endpoint = "tcp:0:interface=127.0.0.1"
{extra}""")


def plain_config(tmp_path: Path, server_cert, service: str = "") -> Path:
    """Two workers, one smtp listener, a smarthost that is never reached (port 9)."""
    return gateway_toml(tmp_path, server_cert=server_cert,
                        extra=f"[service]\nworkers = 2\n{service}\n")


def send(port: int, n: int) -> str:
    mid = f"<w-{n}@corp.example>"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail("app@corp.example", ["bob@example.net"],
                   f"Message-ID: {mid}\r\nSubject: {n}\r\n\r\nbody {n}\r\n")
    return mid


def send_many(port: int, count: int, start: int = 0) -> list[str]:
    with ThreadPoolExecutor(8) as pool:  # 8 connections at once: both workers accept
        return list(pool.map(lambda n: send(port, n), range(start, start + count)))


def message_ids(fs: FakeSmarthost) -> list[str]:
    return [m.message_id for m in fs.messages]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str, name: str) -> dict[str, float]:
    """``{worker label (or ""): value}`` of one sample name."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("worker", "")] = s.value
    return out


def queue_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "queue", "--state-dir",
                           str(tmp_path / "state"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, killed, cannot reap it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest_twisted.ensureDeferred
async def test_two_workers_both_serve_and_no_message_is_delivered_twice(tmp_path, test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("w-sh", "localhost"))
    await fs.start()
    unix = f'[[listeners]]\nendpoint = "unix:{tmp_path / "smtp.sock"}"\nmode = "smtp"\n'
    gw = TwistdProcess(write_config(tmp_path, fs.port, test_ca.ca_pem, unix), tmp_path)
    try:
        await threads.deferToThread(gw.wait_for, "all 2 workers ready")
        assert len({pids[0] for pids in gw.pids.values()}) == 2
        sent = await threads.deferToThread(send_many, gw.port, 80)
        for n in range(4):  # and the listener all workers share (unix: no SO_REUSEPORT)
            sent.append(await threads.deferToThread(send_unix, tmp_path / "smtp.sock", n))
        await fs.wait_for_messages(84, timeout=60)
        await threads.deferToThread(time.sleep, 1.0)  # a duplicate would arrive meanwhile
        delivered = message_ids(fs)
        assert sorted(delivered) == sorted(sent)  # every one, and none twice
        # Both processes accepted and delivered a share of the mail.
        for index in (0, 1):
            assert gw.count(rf"\[worker {index} gateway\.mail#info\] \S+ queued") > 0
            assert gw.count(rf"\[worker {index} gateway\.mail#info\] \S+ delivered") > 0
        assert gw.count(r"queued from=") == 84
        status, text = await threads.deferToThread(scrape, gw.metrics_port)
        assert status == 200
        accepted = samples(text, "itpison_gateway_messages_accepted_total")
        assert set(accepted) == {"0", "1"} and sum(accepted.values()) == 84, accepted
        assert all(v > 0 for v in accepted.values())
        assert samples(text, "itpison_gateway_workers_running") == {"": 2.0}
        # The census, counted once by the supervisor: no worker label on it.
        assert set(samples(text, "itpison_gateway_queue_messages")) == {""}
        assert (await threads.deferToThread(scrape, gw.metrics_port, "/readyz"))[0] == 200
        assert not os.listdir(tmp_path / "state" / "spool" / "queue")
    finally:
        code = await threads.deferToThread(gw.stop)
        await fs.stop()
    assert code in (0, -signal.SIGTERM), "".join(gw.lines[-30:])
    assert gw.count(r"worker [01] stopped \(exit status 0\)") == 2


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_restarted_and_its_queued_mail_delivered_once(tmp_path, test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("w-sh", "localhost"),
                       responses={"greeting": "421 4.3.2 down"})  # everything stays queued
    await fs.start()
    gw = TwistdProcess(write_config(tmp_path, fs.port, test_ca.ca_pem), tmp_path)
    try:
        await threads.deferToThread(gw.wait_for, "all 2 workers ready")
        sent = await threads.deferToThread(send_many, gw.port, 30)
        await threads.deferToThread(gw.wait_for, "queued from=", 30)  # the log read so far
        queued = {i: gw.count(rf"\[worker {i} gateway\.mail#info\] \S+ queued") for i in (0, 1)}
        assert all(queued.values()), queued
        victim = gw.pids[1][0]
        os.kill(victim, signal.SIGKILL)
        await threads.deferToThread(gw.wait_for, "worker 1 started", 2)
        assert gw.pids[1][1] != victim
        await threads.deferToThread(gw.wait_for, "spool loaded", 3)
        # The successor found the dead worker's mail: its own slots, nothing of worker 0's.
        loaded = [line for line in gw.lines if "[worker 1" in line and "spool loaded" in line]
        assert f"spool loaded: {queued[1]} messages queued" in loaded[-1], loaded
        status, text = await threads.deferToThread(scrape, gw.metrics_port)
        assert samples(text, "itpison_gateway_worker_restarts_total") == {"": 1.0}
        fs.responses.pop("greeting")
        await fs.wait_for_messages(30, timeout=60)
        await threads.deferToThread(time.sleep, 1.5)
        assert sorted(message_ids(fs)) == sorted(sent)
    finally:
        code = await threads.deferToThread(gw.stop)
        await fs.stop()
    assert code in (0, -signal.SIGTERM), "".join(gw.lines[-30:])


@pytest_twisted.ensureDeferred
async def test_queue_commands_reach_the_worker_that_owns_each_message(tmp_path, test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("w-sh", "localhost"),
                       responses={"greeting": "421 4.3.2 down"})
    await fs.start()
    gw = TwistdProcess(write_config(tmp_path, fs.port, test_ca.ca_pem), tmp_path)
    try:
        await threads.deferToThread(gw.wait_for, "all 2 workers ready")
        await threads.deferToThread(send_many, gw.port, 12)
        listed = await threads.deferToThread(queue_cli, tmp_path, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        ids = [e["id"] for e in json.loads(listed.stdout)]
        assert len(ids) == 12
        from gateway.ownership import owner_of
        by_owner = {i: [q for q in ids if owner_of(q, 2) == i] for i in (0, 1)}
        assert by_owner[0] and by_owner[1]
        pair = [by_owner[0][0], by_owner[1][0]]
        held = await threads.deferToThread(queue_cli, tmp_path, "hold", *pair)
        assert held.returncode == 0, held.stderr
        assert all(f"{q}: held" in held.stdout for q in pair), held.stdout
        assert sorted(os.listdir(tmp_path / "state" / "spool" / "hold")) == sorted(pair)
        summary = await threads.deferToThread(queue_cli, tmp_path, "summary", "--json")
        states = json.loads(summary.stdout)["states"]
        assert states["hold"]["T"] == 2, states
        assert states["deferred"]["T"] + states["active"]["T"] + states["incoming"]["T"] == 10
        deleted = await threads.deferToThread(queue_cli, tmp_path, "delete", pair[1])
        assert f"{pair[1]}: deleted" in deleted.stdout, deleted.stdout + deleted.stderr
        released = await threads.deferToThread(queue_cli, tmp_path, "release", pair[0])
        assert f"{pair[0]}: released" in released.stdout, released.stdout
        fs.responses.pop("greeting")
        flushed = await threads.deferToThread(queue_cli, tmp_path, "flush")
        assert flushed.returncode == 0, flushed.stderr
        await fs.wait_for_messages(11, timeout=60)
        await threads.deferToThread(time.sleep, 1.0)
        assert len(fs.messages) == 11
        assert pair[1] not in b"".join(m.data for m in fs.messages).decode()
    finally:
        code = await threads.deferToThread(gw.stop)
        await fs.stop()
    assert code in (0, -signal.SIGTERM), "".join(gw.lines[-30:])


def test_sd_notify_reload_and_stop_with_workers(tmp_path, server_cert):
    conf = plain_config(tmp_path, server_cert)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)

    def datagram() -> dict[str, str]:
        return dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())

    gw = TwistdProcess(conf, tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        ready = datagram()
        assert ready["READY"] == "1" and "2 of 2 workers ready" in ready["STATUS"], ready
        gw.wait_for("all 2 workers ready")
        # A valid reload reaches both workers; READY=1 once both have answered.
        gw.proc.send_signal(signal.SIGHUP)
        assert datagram()["RELOADING"] == "1"
        assert datagram()["READY"] == "1"
        gw.wait_for("reload forwarded to 2 workers")
        gw.wait_for("configuration reloaded", 2)
        assert gw.count(r"\[worker 0 gateway\.reload#info\] configuration reloaded") == 1
        assert gw.count(r"\[worker 1 gateway\.reload#info\] configuration reloaded") == 1
        # An invalid one is refused by the supervisor; the workers never see it.
        conf.write_text(conf.read_text().replace("port = 9", "port = 0"))
        gw.proc.send_signal(signal.SIGHUP)
        assert datagram()["RELOADING"] == "1"
        assert "refused" in datagram()["STATUS"]
        gw.wait_for("reload refused")
        assert gw.count("configuration reloaded") == 2
        # A changed worker count is kept until a restart.
        conf.write_text(conf.read_text().replace("port = 0", "port = 9")
                        .replace("workers = 2", "workers = 3"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for("service.workers changed (2 -> 3) and needs a restart")
        gw.wait_for("configuration reloaded", 4)
        # The workers got no NOTIFY_SOCKET: only the supervisor speaks to systemd.
        for index in (0, 1):
            environ = Path(f"/proc/{gw.pids[index][0]}/environ").read_bytes()
            assert b"NOTIFY_SOCKET" not in environ
    finally:
        code = gw.stop()
    messages = []
    notify.settimeout(2)
    try:
        while True:
            messages.append(datagram())
    except TimeoutError:
        pass
    assert any(m.get("STOPPING") == "1" for m in messages), messages
    assert code in (0, -signal.SIGTERM), "".join(gw.lines[-30:])
    notify.close()


def test_workers_stop_when_the_supervisor_is_killed_and_a_new_one_takes_over(tmp_path,
                                                                             server_cert):
    conf = plain_config(tmp_path, server_cert, 'stop_timeout = "2s"')
    first = TwistdProcess(conf, tmp_path)
    first.wait_for("all 2 workers ready")
    sent = send_many(first.port, 6)
    workers = [first.pids[0][0], first.pids[1][0]]
    first.kill()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "orphaned workers kept running"
    # The orphans drained and released their queue slots: a new generation (here a single
    # process) owns the whole spool again, with every message still queued.
    conf.write_text(conf.read_text().replace("workers = 2", "workers = 1"))
    second = TwistdProcess(conf, tmp_path)
    try:
        second.wait_for("spool loaded")
        assert second.count(rf"spool loaded: {len(sent)} messages queued") == 1
        assert second.count("waiting up to") == 0
    finally:
        second.stop()


def test_with_a_log_file_the_workers_log_through_the_supervisor(tmp_path, server_cert):
    conf = plain_config(tmp_path, server_cert)
    logfile = tmp_path / "gateway.log"
    gw = TwistdProcess(conf, tmp_path, args=("--logfile", str(logfile)))

    def wait_in_log(needle: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = logfile.read_text() if logfile.exists() else ""
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in the log:\n{text[-3000:]}")

    try:
        text = wait_in_log("all 2 workers ready")
        port = int(PORT_RE.search(text).group(1))
        send(port, 1)
        text = wait_in_log("queued from=<app@corp.example>")
        assert re.search(r"\[worker [01] gateway\.mail#info\] \S+ queued from=", text)
        assert "[worker 0 gateway.service#info] worker 0 of 2" in text
        assert "[worker 1 gateway.service#info] worker 1 of 2" in text
    finally:
        code = gw.stop()
    assert gw.count("worker") == 0  # nothing of theirs went around the log file
    assert code in (0, -signal.SIGTERM)
    assert logfile.read_text().count("stopped (exit status 0)") == 2


def test_sigterm_lets_a_transaction_in_progress_finish_in_its_worker(tmp_path, server_cert):
    conf = plain_config(tmp_path, server_cert, 'stop_timeout = "20s"')
    gw = TwistdProcess(conf, tmp_path)
    gw.wait_for("all 2 workers ready")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        for command in (b"EHLO app.corp.example", b"MAIL FROM:<app@corp.example>",
                        b"RCPT TO:<bob@example.net>", b"DATA"):
            s.sendall(command + b"\r\n")
            while (line := f.readline())[3:4] == b"-":
                pass
        assert line.startswith(b"354")
        s.sendall(b"Subject: half\r\n\r\nfirst half\r\n")
        gw.proc.send_signal(signal.SIGTERM)
        gw.wait_for("stopping: waiting up to 20.0s for 1 sessions")
        s.sendall(b"second half\r\n.\r\n")
        reply = f.readline()
        assert reply.startswith(b"250 2.0.0"), reply
        s.sendall(b"NOOP\r\n")
        assert f.readline().startswith(b"421 4.3.2")
    assert gw.proc.wait(60) in (0, -signal.SIGTERM)
    assert len(os.listdir(tmp_path / "state" / "spool" / "queue")) == 1


def send_until(port: int, tag: str, accepted: list[str], stop: threading.Event) -> None:
    """New connections one after another; each Message-ID that got a 250 is recorded.
    Refusals and resets (the killed worker's sessions) are expected and not counted."""
    n = 0
    while not stop.is_set():
        n += 1
        mid = f"<{tag}-{n}@corp.example>"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("app@corp.example", ["bob@example.net"],
                           f"Message-ID: {mid}\r\n\r\n" + ("x" * 98 + "\r\n") * 20)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.01)
            continue
        accepted.append(mid)


@pytest_twisted.ensureDeferred
async def test_sigkill_of_a_worker_under_load_loses_no_accepted_message(tmp_path, test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("w-sh", "localhost"))
    await fs.start()
    gw = TwistdProcess(write_config(tmp_path, fs.port, test_ca.ca_pem), tmp_path)
    stop = threading.Event()
    accepted: list[str] = []
    senders: list[threading.Thread] = []
    try:
        await threads.deferToThread(gw.wait_for, "all 2 workers ready")
        senders = [threading.Thread(target=send_until, args=(gw.port, f"s{i}", accepted, stop))
                   for i in range(4)]
        for sender in senders:
            sender.start()

        def until(condition, what: str) -> None:
            deadline = time.monotonic() + 60
            while not condition():
                assert time.monotonic() < deadline and gw.proc.poll() is None, (
                    f"{what}: {len(accepted)} accepted\n" + "".join(gw.lines[-40:]))
                time.sleep(0.005)

        def kill_mid_stream() -> int:
            until(lambda: len(accepted) >= 40, "load")
            os.kill(gw.pids[1][0], signal.SIGKILL)
            before = len(accepted)
            gw.wait_for("worker 1 started", 2)
            # and mail keeps flowing through both
            until(lambda: len(accepted) >= before + 40, "after the restart")
            stop.set()
            return before

        before = await threads.deferToThread(kill_mid_stream)
        for sender in senders:
            await threads.deferToThread(sender.join, 60)
        await fs.wait_for_messages(len(accepted), timeout=60)
        await threads.deferToThread(time.sleep, 1.5)
        delivered = message_ids(fs)
        assert set(accepted) <= set(delivered), "an accepted message was lost"
        duplicates = len(delivered) - len(set(delivered))
        print(f"accepted {len(accepted)} ({before} before the kill), delivered"
              f" {len(delivered)}, duplicates {duplicates}")
        # At least once: only a delivery in flight at the kill may go out again (the
        # worker's share of [queue] concurrency is 10).
        assert duplicates <= 10, duplicates
        assert before >= 40 and len(accepted) >= before + 40
        assert not os.listdir(tmp_path / "state" / "spool" / "corrupt")
    finally:
        stop.set()
        code = await threads.deferToThread(gw.stop)
        await fs.stop()
    assert code in (0, -signal.SIGTERM), "".join(gw.lines[-30:])
