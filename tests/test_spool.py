"""The durable queue: format, crash safety, full disks, state files, hold/release/remove."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

import gateway
from gateway import spool as spool_mod
from gateway.delivery import Outcome, RecipientResult
from gateway.envelope import Envelope, new_queue_id
from gateway.queuestate import BOUNCED, DELIVERED, HISTORY_LIMIT, PENDING, QueueState
from gateway.spool import (
    CorruptMessage,
    NoSuchMessage,
    Spool,
    SpoolError,
    SpoolFull,
    format_header,
    parse_message,
)

MESSAGE = b"Received: from client\r\nSubject: test\r\n\r\nHello\r\n.leading dot\r\n"


def envelope(qid: str | None = None, recipients: tuple[str, ...] = ("b@example.test",),
             sender: str = "a@example.test") -> Envelope:
    return Envelope(queue_id=new_queue_id() if qid is None else qid, sender=sender, recipients=recipients,
                    received_at=1700000000.5, client_ip="192.0.2.1", client_helo="client.test",
                    auth_user="alice", listener="submission", size=len(MESSAGE),
                    extra={"note": "ü"})


def files(spool: Spool, directory: str) -> list[str]:
    return sorted(p.name for p in (spool.root / directory).iterdir())


def message_file(env: Envelope, message: bytes = MESSAGE) -> bytes:
    first, header = format_header(env, len(message))
    return first + header + message + spool_mod.END_MARKER


# --- format ------------------------------------------------------------------------------
def test_open_creates_private_directories(spool: Spool) -> None:
    for name in spool_mod.DIRS:
        assert (spool.root / name).stat().st_mode & 0o777 == 0o700


def test_parse_message_round_trip_and_rejects_damage() -> None:
    env = envelope()
    data = message_file(env)
    assert parse_message(data, env.queue_id) == (env, MESSAGE)
    damaged = {
        "truncated": data[:-1],
        "truncated body": data[:-20] + spool_mod.END_MARKER,
        "no marker": data[: -len(spool_mod.END_MARKER)] + b"\nITPQ-EN?\n",
        "extra bytes": data + b"x",
        "bad magic": b"ITPQ2" + data[5:],
        "empty": b"",
        "wrong queue id": message_file(envelope("OTHER")),
    }
    for name, bad in damaged.items():
        with pytest.raises(ValueError):
            parse_message(bad, env.queue_id)
            pytest.fail(name)


@pytest_twisted.ensureDeferred
async def test_round_trip(spool: Spool) -> None:
    env = envelope(recipients=("b@example.test", "c@example.test"))
    await spool.submit(env, MESSAGE)
    assert files(spool, "queue") == [env.queue_id]
    assert files(spool, "tmp") == []
    assert (spool.root / "queue" / env.queue_id).stat().st_mode & 0o777 == 0o600
    read_env, read_msg = await spool.read(env.queue_id)
    assert read_env == env
    assert read_msg == MESSAGE
    assert await spool.scan() == [env.queue_id]


@pytest_twisted.ensureDeferred
async def test_read_unknown_message(spool: Spool) -> None:
    with pytest.raises(NoSuchMessage):
        await spool.read("NOSUCHMESSAGE")


@pytest_twisted.ensureDeferred
async def test_queue_id_must_be_a_plain_file_name(spool: Spool) -> None:
    for bad in ("../escape", "a/b", "", "."):
        with pytest.raises(ValueError):
            await spool.submit(envelope(bad), MESSAGE)
        with pytest.raises(ValueError):
            await spool.read(bad)
    assert list((spool.root).parent.glob("escape*")) == []


# --- crashes -----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_crash_leftovers_are_cleaned_and_truncated_file_never_read(spool: Spool) -> None:
    good = envelope()
    await spool.submit(good, MESSAGE)
    torn = envelope()
    (spool.root / "tmp" / f"{torn.queue_id}.123.0").write_bytes(message_file(torn)[:40])
    truncated = envelope()
    (spool.root / "queue" / truncated.queue_id).write_bytes(message_file(truncated)[:-5])
    no_marker = envelope()
    (spool.root / "queue" / no_marker.queue_id).write_bytes(
        message_file(no_marker)[: -len(spool_mod.END_MARKER)])
    (spool.root / "queue" / "junk.swp").write_bytes(b"not ours")

    assert await spool.scan() == [good.queue_id]
    assert files(spool, "tmp") == []
    assert files(spool, "queue") == [good.queue_id]
    assert files(spool, "corrupt") == sorted([truncated.queue_id, no_marker.queue_id, "junk.swp"])


@pytest_twisted.ensureDeferred
async def test_read_of_corrupt_file_moves_it_aside(spool: Spool) -> None:
    env = envelope()
    (spool.root / "queue" / env.queue_id).write_bytes(message_file(env)[:-1])
    with pytest.raises(CorruptMessage):
        await spool.read(env.queue_id)
    assert files(spool, "queue") == []
    assert files(spool, "corrupt") == [env.queue_id]
    # The same name again is kept beside the first, never overwritten.
    (spool.root / "queue" / env.queue_id).write_bytes(b"garbage")
    with pytest.raises(CorruptMessage):
        await spool.read(env.queue_id)
    assert len(files(spool, "corrupt")) == 2


# --- full disks and other errors ---------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest_twisted.ensureDeferred
async def test_disk_full_gives_spool_full_and_leaves_nothing(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def full(fd: int, parts: object) -> None:
        os.write(fd, b"ITPQ1 partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spool_mod, "_write_all", full)
    with pytest.raises(SpoolFull):
        await spool.submit(envelope(), MESSAGE)
    assert files(spool, "queue") == []
    assert files(spool, "tmp") == []


@pytest_twisted.ensureDeferred
async def test_fsync_error_gives_spool_error(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_mod, "_fsync", broken)
    with pytest.raises(SpoolError) as info:
        await spool.submit(envelope(), MESSAGE)
    assert not isinstance(info.value, SpoolFull)
    assert files(spool, "queue") == []
    assert files(spool, "tmp") == []


@pytest_twisted.ensureDeferred
async def test_directory_fsync_error_withdraws_the_message(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client gets a 4xx and will send again, so the file must not be delivered."""
    def broken(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_mod, "_fsync_dir", broken)
    with pytest.raises(SpoolError):
        await spool.submit(envelope(), MESSAGE)
    assert files(spool, "queue") == []


@pytest_twisted.ensureDeferred
async def test_unusable_spool_gives_spool_error(spool: Spool) -> None:
    (spool.root / "tmp").rmdir()
    (spool.root / "tmp").write_bytes(b"")  # works even for root, unlike chmod
    with pytest.raises(SpoolError) as info:
        await spool.submit(envelope(), MESSAGE)
    assert not isinstance(info.value, SpoolFull)
    assert files(spool, "queue") == []


# --- delivery state ----------------------------------------------------------------------
def sample_state(env: Envelope) -> QueueState:
    state = QueueState.new(env)
    state.begin_attempt(100.0)
    state.record(RecipientResult("b@example.test", Outcome.DELIVERED, 250, "2.0.0", "Ok",
                                 "smtp.test:465"), DELIVERED, 100.0)
    state.record(RecipientResult("c@example.test", Outcome.TEMPFAIL, 451, "4.3.0",
                                 "try later", "smtp.test:465"), PENDING, 100.0)
    state.record(RecipientResult("d@example.test", Outcome.PERMFAIL, 550, "5.1.1",
                                 "no such user", "smtp.test:465"), BOUNCED, 100.0)
    state.next_attempt = 160.0
    return state


def test_queue_state_new_and_history_cap() -> None:
    env = envelope(recipients=("b@example.test", "c@example.test", "b@example.test"))
    state = QueueState.new(env)
    assert state.pending() == ["b@example.test", "c@example.test"]
    assert state.attempts == 0 and state.first_attempt is None
    result = RecipientResult("c@example.test", Outcome.TEMPFAIL, 451, "", "later")
    for i in range(HISTORY_LIMIT + 5):
        state.begin_attempt(float(i))
        state.record(result, PENDING, float(i))
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].time == HISTORY_LIMIT + 4
    assert state.first_attempt == 0.0 and state.last_attempt == HISTORY_LIMIT + 4
    assert state.get("c@example.test").attempts == HISTORY_LIMIT + 5
    with pytest.raises(KeyError):
        state.record(RecipientResult("x@example.test", Outcome.DELIVERED, 250, "", ""),
                     DELIVERED, 0.0)


@pytest_twisted.ensureDeferred
async def test_state_round_trip(spool: Spool) -> None:
    env = envelope(recipients=("b@example.test", "c@example.test", "d@example.test"))
    await spool.submit(env, MESSAGE)
    assert await spool.load_state(env.queue_id) is None
    state = sample_state(env)
    await spool.save_state(state)
    loaded = await spool.load_state(env.queue_id)
    assert loaded == state
    assert loaded.pending() == ["c@example.test"]
    assert [r.recipient for r in loaded.bounced()] == ["d@example.test"]
    assert loaded.get("d@example.test").result().outcome is Outcome.PERMFAIL
    assert files(spool, "tmp") == []
    state.next_attempt = 999.0  # saving again replaces the file
    await spool.save_state(state)
    assert (await spool.load_state(env.queue_id)).next_attempt == 999.0


@pytest_twisted.ensureDeferred
async def test_unreadable_state_is_moved_aside(spool: Spool) -> None:
    env = envelope()
    await spool.submit(env, MESSAGE)
    (spool.root / "state" / f"{env.queue_id}.json").write_text("{not json")
    assert await spool.load_state(env.queue_id) is None
    assert files(spool, "corrupt") == [f"{env.queue_id}.json"]


# --- hold, release, remove, orphans ------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_hold_release_remove(spool: Spool) -> None:
    env = envelope(recipients=("b@example.test", "c@example.test", "d@example.test"))
    await spool.submit(env, MESSAGE)
    await spool.save_state(sample_state(env))
    await spool.hold(env.queue_id)
    assert files(spool, "queue") == [] and files(spool, "hold") == [env.queue_id]
    assert await spool.scan() == []  # held mail is not scheduled, its state is kept
    assert await spool.load_state(env.queue_id) is not None
    assert await spool.held() == [env.queue_id]
    assert (await spool.read(env.queue_id))[1] == MESSAGE  # an admin may still bounce it
    with pytest.raises(NoSuchMessage):
        await spool.hold(env.queue_id)
    await spool.release(env.queue_id)
    assert files(spool, "queue") == [env.queue_id] and files(spool, "hold") == []
    with pytest.raises(NoSuchMessage):
        await spool.release(env.queue_id)
    await spool.remove(env.queue_id)
    assert files(spool, "queue") == [] and files(spool, "state") == []
    await spool.remove(env.queue_id)  # removing twice is harmless


@pytest_twisted.ensureDeferred
async def test_remove_held_message(spool: Spool) -> None:
    env = envelope()
    await spool.submit(env, MESSAGE)
    await spool.hold(env.queue_id)
    await spool.remove(env.queue_id)
    assert files(spool, "hold") == []


@pytest_twisted.ensureDeferred
async def test_scan_removes_orphan_state(spool: Spool) -> None:
    live = envelope()
    await spool.submit(live, MESSAGE)
    await spool.save_state(QueueState.new(live))
    orphan = envelope()
    await spool.save_state(QueueState.new(orphan))
    assert await spool.scan() == [live.queue_id]
    assert files(spool, "state") == [f"{live.queue_id}.json"]


@pytest_twisted.ensureDeferred
async def test_scan_keeps_tmp_files_being_written(spool: Spool) -> None:
    """scan() during a submit must not pull the file from under the writer."""
    tmp = spool._tmp_path("BUSY")
    tmp.write_bytes(b"ITPQ1 ")
    try:
        await spool.scan()
        assert tmp.exists()
    finally:
        spool._done_writing(tmp)
    await spool.scan()
    assert not tmp.exists()


# --- SIGKILL in a loop of submits --------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    from pathlib import Path
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool
    from gateway.envelope import Envelope, new_queue_id
    from gateway.spool import Spool

    root, die_after, seed = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    pool = ThreadPool(2, 4)
    pool.start()
    spool = Spool(root, reactor, pool)
    spool.open()

    def body(qid, size):
        return ((qid + " ").encode() * (size // 17 + 1))[:size]

    def one():
        qid = new_queue_id()
        msg = body(qid, rng.choice([10, 2000, 50000, 200000]))
        env = Envelope(qid, "a@x.test", ("b@y.test",), time.time(), size=len(msg))
        d = spool.submit(env, msg)
        def done(_):
            os.write(1, f"{qid} {len(msg)}\\n".encode())
            one()
        def failed(f):
            os.write(2, f.getTraceback().encode())
            os._exit(3)
        d.addCallbacks(done, failed)

    for _ in range(4):
        reactor.callWhenRunning(one)
    threading.Timer(die_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
    reactor.run()
""")


def expected_body(qid: str, size: int) -> bytes:
    return ((qid + " ").encode() * (size // 17 + 1))[:size]


def run_child(root: Path, die_after: float, seed: int) -> tuple[int, list[tuple[str, int]]]:
    env = dict(os.environ, PYTHONPATH=str(Path(gateway.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(die_after), str(seed)],
                          capture_output=True, env=env, timeout=120)
    lines = proc.stdout.decode().split("\n")[:-1]  # a torn last line has no newline
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    return proc.returncode, [(q, int(n)) for q, n in (line.split() for line in lines)]


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_sigkill_never_loses_or_tears_an_accepted_message(spool: Spool) -> None:
    reported: list[tuple[str, int]] = []
    for round_, die_after in enumerate((0.6, 0.8, 1.0)):
        _, done = await threads.deferToThread(run_child, spool.root, die_after, round_)
        assert done, "the child reported no completed submit before it was killed"
        reported += done
    queued = set(await spool.scan())
    assert files(spool, "corrupt") == []
    assert files(spool, "tmp") == []
    for qid, size in reported:
        assert qid in queued
        env, message = await spool.read(qid)
        assert env.queue_id == qid
        assert message == expected_body(qid, size)
