"""The itpison-gateway console script, run for real: ``python -m gateway.cli`` in a subprocess."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from gateway import __version__
from gateway.auth_file import load_users, set_user, verify_password

SRC = Path(__file__).resolve().parent.parent / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
CLI = [sys.executable, "-m", "gateway.cli"]


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=60,
                          stdin=subprocess.DEVNULL if stdin is None else None)


# --- general --------------------------------------------------------------------------

def test_version() -> None:
    r = run("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"itpison-gateway {__version__}")


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["passwd"], ["check-config"],
                                  ["passwd", "f", "u", "--bogus"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 2, r
    assert "usage:" in r.stderr


# --- check-config -----------------------------------------------------------------------

def write_config(tmp_path: Path, listener_mode: str = "smtp") -> Path:
    (tmp_path / "smarthost.pw").write_text("Relay-Secret-789\n")
    set_user(tmp_path / "users.toml", "alice", "pw", ["*"])
    path = tmp_path / "gateway.toml"
    path.write_text(f"""\
[gateway]
hostname = "gw.example.test"
state_dir = "{tmp_path / 'var'}"

[[listeners]]
endpoint = "tcp:2525:interface=127.0.0.1"
mode = "{listener_mode}"

[[smarthosts]]
host = "smtp.example.test"
port = 465
username = "relay"
password_file = "smarthost.pw"

[auth]
users_file = "users.toml"
""")
    return path


def test_check_config_ok(tmp_path: Path) -> None:
    r = run("check-config", write_config(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "configuration ok"
    assert "tcp:2525:interface=127.0.0.1" in r.stdout
    assert "smtp.example.test" in r.stdout
    assert "Relay-Secret-789" not in r.stdout + r.stderr


def test_check_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, listener_mode="bogus")
    r = run("check-config", path)
    assert r.returncode == 1
    assert r.stdout == ""
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{path}: listeners[0].mode: ")


@pytest.mark.parametrize("content, expected", [
    (None, "cannot read"),
    ("[gateway\n", "TOML"),
])
def test_check_config_unreadable(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "gateway.toml"
    if content is not None:
        path.write_text(content)
    r = run("check-config", path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{path}: ") and r.stderr.count(str(path)) == 1
    assert expected in r.stderr


# --- passwd -------------------------------------------------------------------------

def test_passwd_from_stdin_creates_user(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    r = run("passwd", users, "alice", "--sender", "Alice@Example.com", "--sender",
            "@sales.example.com", stdin="pw with space \n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"user alice updated in {users}\n"
    record = load_users(users)["alice"]
    assert record.senders == ("alice@example.com", "@sales.example.com")
    assert verify_password(record.password_hash, "pw with space ")
    assert "pw with space" not in r.stdout + r.stderr
    assert record.password_hash not in r.stdout + r.stderr
    assert r.stderr == ""


def test_passwd_changes_password_keeping_senders(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    set_user(users, "alice", "old", ["alice@example.com"])
    set_user(users, "bob", "bob-pw", ["*"])
    r = run("passwd", users, "alice", stdin="new\r\n")
    assert r.returncode == 0, r.stderr
    records = load_users(users)
    assert verify_password(records["alice"].password_hash, "new")
    assert records["alice"].senders == ("alice@example.com",)
    assert verify_password(records["bob"].password_hash, "bob-pw")


def test_passwd_warns_about_a_user_without_senders(tmp_path: Path) -> None:
    r = run("passwd", tmp_path / "users.toml", "carol", stdin="pw\n")
    assert r.returncode == 0
    assert "carol may not send as any address" in r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--sender", "nope"], 2, "bad sender pattern 'nope'"),
    (["--sender", "*@example.com"], 2, "'@example.com'"),
])
def test_passwd_bad_sender_is_a_usage_error(tmp_path: Path, args: list[str], code: int,
                                            message: str) -> None:
    users = tmp_path / "users.toml"
    r = run("passwd", users, "alice", *args, stdin="pw\n")
    assert r.returncode == code
    assert message in r.stderr
    assert not users.exists()


def test_passwd_bad_user_name_is_a_usage_error(tmp_path: Path) -> None:
    r = run("passwd", tmp_path / "users.toml", " alice", stdin="pw\n")
    assert r.returncode == 2 and "bad user name" in r.stderr


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_passwd_refuses_empty_password(tmp_path: Path, stdin: str) -> None:
    users = tmp_path / "users.toml"
    r = run("passwd", users, "alice", stdin=stdin)
    assert r.returncode == 1 and "empty password" in r.stderr
    assert not users.exists()


def test_passwd_corrupt_file_is_a_failure_and_left_alone(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text("[users.alice\n")
    r = run("passwd", users, "bob", stdin="pw\n")
    assert r.returncode == 1 and str(users) in r.stderr and "TOML" in r.stderr
    assert users.read_text() == "[users.alice\n"


def test_passwd_unwritable_directory_is_a_failure(tmp_path: Path) -> None:
    r = run("passwd", tmp_path / "missing-dir" / "users.toml", "bob", stdin="pw\n")
    assert r.returncode == 1 and "No such file or directory" in r.stderr


# --- passwd on a terminal (getpass, asked twice) -----------------------------------

def _as_controlling_tty() -> None:  # runs in the child after setsid (start_new_session)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_on_tty(args: list[str | Path], answers: list[bytes]) -> tuple[int, str, str]:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([*CLI, *map(str, args)], stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV, start_new_session=True,
                                preexec_fn=_as_controlling_tty)
        os.close(slave)
        seen = b""
        for prompt, answer in zip((b"Password: ", b"Repeat password: "), answers, strict=False):
            while not seen.endswith(prompt):
                ready, _, _ = select.select([master], [], [], 30)
                assert ready, f"no prompt {prompt!r}, got {seen!r}"
                seen += os.read(master, 1024)
            os.write(master, answer + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), err.decode()


def test_passwd_on_a_terminal(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    code, out, err = run_on_tty(["passwd", users, "alice", "--sender", "*"],
                                [b"tty-pw", b"tty-pw"])
    assert code == 0, err
    assert "may be echoed" not in err      # getpass used the terminal, not its fallback
    assert out == f"user alice updated in {users}\n"
    assert verify_password(load_users(users)["alice"].password_hash, "tty-pw")


def test_passwd_on_a_terminal_must_match(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    code, _, err = run_on_tty(["passwd", users, "alice"], [b"one", b"two"])
    assert code == 1 and "do not match" in err
    assert not users.exists()


# --- options ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,code,out", [
    (["decode", "X-LinkOption", "192"], 0,
     "64\tNotTrackOpen\tcLKNotTrackOpenMask\n128\tNotTrackAllLink\tcLKNotTrackAllLinkMask\n"),
    (["decode", "x-listoption", "65536"], 0,
     "65536\tBypassAllListProcessFilter\tcLTBypassAllListProcessFilter\n"),
    (["decode", "X-SendOption", "3"], 0, "3\tSendSubListOnly\tcSDSendSubListOnly\n"),
    (["decode", "X-LinkOption", "32832"], 1, "64\tNotTrackOpen\tcLKNotTrackOpenMask\n"),
    (["encode", "X-LinkOption", "NotTrackOpen", "NotTrackAllLink"], 0, "192\n"),
    (["encode", "X-LinkOption", "cLKNotTrackOpenMask", "128"], 0, "192\n"),
    (["encode", "X-SendOption", "sendbothlist"], 0, "4\n"),
    (["encode", "X-LinkOption", "NotTrackOpn"], 1, ""),
])
def test_options_decode_encode(args: list[str], code: int, out: str) -> None:
    r = run("options", *args)
    assert (r.returncode, r.stdout) == (code, out), r


def test_options_unknown_family_is_a_usage_error() -> None:
    r = run("options", "decode", "X-Colour", "1")
    assert r.returncode == 2 and "unknown option family" in r.stderr


def test_options_explain(tmp_path: Path) -> None:
    set_user(tmp_path / "users.toml", "alice", "pw", ["*"], ["bulk"])
    config = tmp_path / "gw.toml"
    config.write_text(f"""\
[[listeners]]
endpoint = "tcp:2525"
mode = "smtp"
[[smarthosts]]
host = "smtp.example.test"
[auth]
users_file = "{tmp_path / 'users.toml'}"
[options.defaults]
link_option = ["NotTrackOpen", "NotTrackAllLink"]
[options.deny]
list_option = ["BypassAllListProcessFilter"]
[options.groups.bulk]
allow = {{ list_option = 65536 }}
""")
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@b\nX-ListOption: 65536\n\nhi\n")
    r = run("options", "explain", "--config", config, "--user", "alice", eml)
    assert r.returncode == 0, r
    assert r.stdout.splitlines() == [
        "as user alice (groups: bulk)",
        "  X-ListOption: 65536 (BypassAllListProcessFilter) from the message",
        "  X-LinkOption: 192 (NotTrackOpen|NotTrackAllLink) default from global",
        "sent:", "  X-ListOption: 65536", "  X-LinkOption: 192"]
    r = run("options", "explain", "--config", config, "--user", "bob", eml)
    assert (r.returncode, r.stdout.splitlines()[-1]) == (
        1, "refused: 550 5.7.1 X-ListOption: bits 65536 not permitted")
