"""The durable queue on disk: a message is accepted only once it is fsync'd and renamed.

Layout under ``root`` (state_dir/"spool"), queue states as directories::

    tmp/      files being written (leftovers of a crash are removed by scan())
    queue/    accepted messages, waiting or in delivery
    hold/     messages held by an admin
    corrupt/  unreadable files moved aside, never deleted
    state/    <qid>.json: per-message delivery state (gateway.queuestate)

A message file is self-validating::

    ITPQ1 <header_len> <body_len>\\n  <envelope JSON>  <message bytes>  \\nITPQ-END\\n

so a half-written file can never be mistaken for a message.  Every disk operation runs in
the caller's thread pool, never on the reactor thread.  Writing a file, fsyncing it and
fsyncing its directory are separate small functions so that a later group commit can
share one directory fsync between many submits.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.envelope import Envelope, new_queue_id
from gateway.ownership import QueueOwnership
from gateway.queuestate import QueueState

__all__ = ["CorruptMessage", "NoSuchMessage", "QueueState", "Spool", "SpoolError", "SpoolFull",
           "format_header", "parse_message"]

log = Logger(namespace="gateway.spool")
T = TypeVar("T")

MAGIC = b"ITPQ1"
END_MARKER = b"\nITPQ-END\n"
MAX_FIRST_LINE = 64
MAX_ENVELOPE = 16 * 1024 * 1024
_QID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DIRS = ("tmp", "queue", "hold", "corrupt", "state")


class SpoolError(Exception):
    """The spool could not do what was asked (the listener answers 451 4.3.0)."""


class SpoolFull(SpoolError):
    """No space or quota left (the listener answers 452 4.3.1)."""


class NoSuchMessage(SpoolError):
    """No message with that queue id in queue/ or hold/."""


class CorruptMessage(SpoolError):
    """The message file failed validation and was moved to corrupt/."""


# --- the file format ---------------------------------------------------------------------
def format_header(envelope: Envelope, body_len: int) -> tuple[bytes, bytes]:
    """The first line and the envelope JSON of a message file."""
    env = json.dumps(envelope.to_json(), separators=(",", ":"), sort_keys=True).encode() + b"\n"
    return b"%s %d %d\n" % (MAGIC, len(env), body_len), env


def _parse_first_line(line: bytes) -> tuple[int, int]:
    parts = line.rstrip(b"\n").split(b" ")
    if (len(parts) != 3 or parts[0] != MAGIC or not line.endswith(b"\n")
            or not parts[1].isdigit() or not parts[2].isdigit()):
        raise ValueError("bad first line")
    return int(parts[1]), int(parts[2])


def _parse_envelope(data: bytes, qid: str) -> Envelope:
    try:
        envelope = Envelope.from_json(json.loads(data))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"bad envelope: {e}") from None
    if envelope.queue_id != qid:
        raise ValueError(f"envelope is for {envelope.queue_id!r}")
    return envelope


def parse_message(data: bytes, qid: str) -> tuple[Envelope, bytes]:
    """Validate a whole message file; raises ValueError naming what is wrong."""
    nl = data.find(b"\n", 0, MAX_FIRST_LINE)
    if nl < 0:
        raise ValueError("no first line")
    hlen, blen = _parse_first_line(data[: nl + 1])
    start = nl + 1
    if len(data) != start + hlen + blen + len(END_MARKER):
        raise ValueError(f"length {len(data)} does not match the header")
    if not data.endswith(END_MARKER):
        raise ValueError("no end marker")
    envelope = _parse_envelope(data[start: start + hlen], qid)
    return envelope, data[start + hlen: start + hlen + blen]


def check_file(path: Path, qid: str) -> None:
    """Validate a message file without reading its body (for scan)."""
    with open(path, "rb") as f:
        line = f.readline(MAX_FIRST_LINE)
        hlen, blen = _parse_first_line(line)
        if hlen > MAX_ENVELOPE:
            raise ValueError("envelope too large")
        size = os.fstat(f.fileno()).st_size
        if size != len(line) + hlen + blen + len(END_MARKER):
            raise ValueError(f"length {size} does not match the header")
        _parse_envelope(f.read(hlen), qid)
        f.seek(size - len(END_MARKER))
        if f.read() != END_MARKER:
            raise ValueError("no end marker")


# --- durable file primitives (module functions: tests and a group commit can swap them) ---
def _write_all(fd: int, parts: Iterable[bytes]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, parts: Iterable[bytes]) -> None:
    """Create ``path`` (which must not exist), write ``parts`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, parts)
        _fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class Spool:
    """The queue directory.  All methods but ``open`` return Deferreds and do their disk
    work in ``threadpool`` (a started ThreadPool owned by the caller)."""

    def __init__(self, root: Path, reactor: Any, threadpool: ThreadPool,
                 ownership: QueueOwnership | None = None) -> None:
        self.root = Path(root)
        # Which messages are this process's to deliver and clean up (gateway.ownership);
        # None: all of them (one process, or a tool that only reads).
        self.ownership = ownership
        self._reactor = reactor
        self._pool = threadpool
        self._writing: set[str] = set()  # tmp/ names in use, which scan() must not remove
        self._lock = threading.Lock()
        self._serial = itertools.count()
        self._tmp = self.root / "tmp"
        self._queue = self.root / "queue"
        self._hold = self.root / "hold"
        self._corrupt = self.root / "corrupt"
        self._state = self.root / "state"

    def open(self) -> None:
        """Create the directories (mode 0700).  Synchronous: call once at start."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in DIRS:
            (self.root / name).mkdir(mode=0o700, exist_ok=True)

    def owns(self, qid: str) -> bool:
        return self.ownership is None or self.ownership.owns(qid)

    def new_id(self, now: float | None = None) -> str:
        """A queue id for a new message, in this process's slots."""
        return new_queue_id(now) if self.ownership is None else self.ownership.new_id(now)

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args)

    # --- messages -----------------------------------------------------------------------
    def submit(self, envelope: Envelope, message: bytes) -> Deferred[None]:
        """Make the message durable in queue/.  Fires once it is on disk; errbacks with
        SpoolFull or SpoolError, leaving nothing behind."""
        return self._run(self._submit, envelope, message)

    def _submit(self, envelope: Envelope, message: bytes) -> None:
        qid = _checked(envelope.queue_id)
        first, env = format_header(envelope, len(message))
        tmp = self._tmp_path(qid)
        dest = self._queue / qid
        try:
            try:
                _write_synced(tmp, (first, env, message, END_MARKER))
                os.rename(tmp, dest)
            finally:
                self._done_writing(tmp)
            try:
                _fsync_dir(self._queue)
            except OSError:
                _unlink_quietly(dest)  # not durable: we answer 4xx, so never deliver it
                raise
        except OSError as e:
            _unlink_quietly(tmp)
            if e.errno in _FULL_ERRNOS:
                raise SpoolFull(f"{qid}: {e}") from e
            raise SpoolError(f"{qid}: {e}") from e

    def read(self, qid: str) -> Deferred[tuple[Envelope, bytes]]:
        """The envelope and message bytes of a queued (or held) message.  Errbacks with
        NoSuchMessage, or CorruptMessage after moving the file to corrupt/."""
        return self._run(self._read, qid)

    def _read(self, qid: str) -> tuple[Envelope, bytes]:
        path = self._locate(_checked(qid))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NoSuchMessage(qid) from None
        except OSError as e:
            raise SpoolError(f"{qid}: {e}") from e
        try:
            return parse_message(data, qid)
        except ValueError as e:
            self._move_corrupt(path, qid, str(e))
            raise CorruptMessage(f"{qid}: {e}") from None

    def _locate(self, qid: str) -> Path:
        for directory in (self._queue, self._hold):
            if (directory / qid).exists():
                return directory / qid
        raise NoSuchMessage(qid)

    def remove(self, qid: str, *, durable: bool = True) -> Deferred[None]:
        """Forget a message: its message file, then its state file (see _remove).

        ``durable=False`` skips the directory fsyncs.  That is for mail just delivered: a
        crash before the unlink reaches the disk can only deliver it again, never lose it
        (Postfix deletes delivered queue files the same way).  Admin removals stay durable.
        """
        return self._run(self._remove, qid, durable)

    def _remove(self, qid: str, durable: bool = True) -> None:
        # Message first: a crash in between leaves an orphan state file that scan() deletes,
        # where the other order would leave a stateless message that is delivered again.
        qid = _checked(qid)
        for directory in (self._queue, self._hold):
            try:
                (directory / qid).unlink()
            except FileNotFoundError:
                continue
            if durable:
                _fsync_dir(directory)
            break
        self._unlink_state(qid, durable)

    def hold(self, qid: str) -> Deferred[None]:
        """Move a message from queue/ to hold/ (NoSuchMessage if it is not in queue/)."""
        return self._run(self._move, _checked(qid), self._queue, self._hold)

    def release(self, qid: str) -> Deferred[None]:
        """Move a held message back to queue/."""
        return self._run(self._move, _checked(qid), self._hold, self._queue)

    def _move(self, qid: str, src: Path, dst: Path) -> None:
        try:
            os.rename(src / qid, dst / qid)
        except FileNotFoundError:
            raise NoSuchMessage(qid) from None
        _fsync_dir(dst)
        _fsync_dir(src)

    def held(self) -> Deferred[list[str]]:
        """This process's queue ids in hold/."""
        return self._run(lambda: sorted(p.name for p in self._hold.iterdir()
                                        if self.owns(p.name)))

    def scan(self) -> Deferred[list[str]]:
        """This process's queue ids in queue/, oldest first.  Moves its invalid files to
        corrupt/, removes its leftovers in tmp/ and state files whose message is gone.
        Files of other workers' slots are never touched (they may be mid-write)."""
        return self._run(self._scan)

    def _scan(self) -> list[str]:
        with self._lock:
            writing = set(self._writing)
        for path in self._tmp.iterdir():
            if path.name not in writing and self.owns(path.name.partition(".")[0]):
                log.info("removing leftover {path}", path=str(path))
                _unlink_quietly(path)
        good = []
        for path in sorted(self._queue.iterdir()):
            if not self.owns(path.name):
                continue
            try:
                check_file(path, _checked(path.name))
            except (ValueError, OSError) as e:
                self._move_corrupt(path, path.name, str(e))
            else:
                good.append(path.name)
        known = set(good) | {p.name for p in self._hold.iterdir()}
        for path in self._state.glob("*.json"):
            if path.stem not in known and self.owns(path.stem):
                log.info("removing orphan state {path}", path=str(path))
                _unlink_quietly(path)
        return good

    def _move_corrupt(self, path: Path, qid: str, reason: str) -> None:
        dest = self._corrupt / path.name
        if dest.exists():
            dest = self._corrupt / f"{path.name}.{os.getpid()}.{next(self._serial)}"
        try:
            os.rename(path, dest)
        except OSError as e:
            log.error("{queue_id} corrupt file {path} could not be moved aside: {error}",
                      queue_id=qid, path=str(path), error=str(e))
            return
        log.error("{queue_id} corrupt queue file moved to {dest}: {reason}",
                  queue_id=qid, dest=str(dest), reason=reason)

    # --- delivery state -----------------------------------------------------------------
    def load_state(self, qid: str) -> Deferred[QueueState | None]:
        """The saved delivery state, or None for a message never attempted (an unreadable
        state file is moved to corrupt/ and also gives None)."""
        return self._run(self._load_state, qid)

    def _load_state(self, qid: str) -> QueueState | None:
        path = self._state / f"{_checked(qid)}.json"
        try:
            return QueueState.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            self._move_corrupt(path, qid, f"bad state file: {e}")
            return None
        except OSError as e:
            raise SpoolError(f"{qid}: {e}") from e

    def save_state(self, state: QueueState) -> Deferred[None]:
        """Replace the state file atomically (tmp, fsync, rename, directory fsync)."""
        return self._run(self._save_state, state)

    def _save_state(self, state: QueueState) -> None:
        qid = _checked(state.queue_id)
        data = json.dumps(state.to_json(), separators=(",", ":")).encode() + b"\n"
        tmp = self._tmp_path(qid)
        try:
            try:
                _write_synced(tmp, (data,))
                os.rename(tmp, self._state / f"{qid}.json")
            finally:
                self._done_writing(tmp)
            _fsync_dir(self._state)
        except OSError as e:
            _unlink_quietly(tmp)
            if e.errno in _FULL_ERRNOS:
                raise SpoolFull(f"{qid}: {e}") from e
            raise SpoolError(f"{qid}: {e}") from e

    def _unlink_state(self, qid: str, durable: bool = True) -> None:
        try:
            (self._state / f"{qid}.json").unlink()
        except FileNotFoundError:
            return
        if durable:
            _fsync_dir(self._state)

    # --- tmp/ names ---------------------------------------------------------------------
    def _tmp_path(self, qid: str) -> Path:
        name = f"{qid}.{os.getpid()}.{next(self._serial)}"
        with self._lock:
            self._writing.add(name)
        return self._tmp / name

    def _done_writing(self, tmp: Path) -> None:
        with self._lock:
            self._writing.discard(tmp.name)


def _checked(qid: str) -> str:
    """A queue id is also a file name: refuse anything that could leave the directory."""
    if not isinstance(qid, str) or not _QID_RE.match(qid):
        raise ValueError(f"bad queue id {qid!r}")
    return qid
