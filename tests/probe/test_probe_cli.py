"""``fleetdns probe``, the real command on this machine: real bpftrace, real lookups, the capture parsed back.

Needs root, bpftrace and tracefs (skipped with the reason otherwise). Lookups run with ``hosts: files`` (the
``files_only`` prefix), so none reaches the machine's nameserver. Other processes on the machine may resolve
names while a test runs, so assertions pick the test's own lookups by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.capture_format import parse_capture
from fleet.errors import ExitCode
from tests.probe.conftest import needs_probe

pytestmark = needs_probe

FLEETDNS = [sys.executable, "-m", "fleet"]


def start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*FLEETDNS, "probe", *args], stdout=kwargs.pop("stdout", subprocess.DEVNULL),
                            stderr=subprocess.PIPE, **kwargs)


def wait_attached(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the capture file holds the ``B`` record (the runner flushes it at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and b"\nB " in path.read_bytes():
            return
        if proc.poll() is not None:
            raise AssertionError(f"probe exited {proc.returncode}: {proc.stderr.read().decode()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("probe did not attach")


def lookup(files_only: list[str], name: str) -> int:
    """One getaddrinfo of *name* by a fresh process; its pid."""
    proc = subprocess.Popen([*files_only, "getent", "ahosts", name], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc.wait(60)
    return proc.pid


def test_duration_output_file_private_and_complete(tmp_path, files_only):
    out = tmp_path / "dns.capture"
    proc = start("--duration", "6s", "--output", str(out))
    wait_attached(out, proc)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    pid_ok, pid_fail = lookup(files_only, "localhost"), lookup(files_only, "no-such.fleetdns.test")
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    cap = parse_capture(out)
    mine = cap.events[cap.events.pid.isin([pid_ok, pid_fail])]
    assert sorted(zip(mine.pid, mine.name, mine.result, strict=True)) == sorted(
        [(pid_ok, "localhost", "OK"), (pid_fail, "no-such.fleetdns.test", "EAI_NONAME")])
    assert cap.trailer["stop_reason"] == "duration" and cap.trailer["lost"] == 0


def test_ctrl_c_ends_cleanly_with_the_trailer(tmp_path, files_only):
    out = tmp_path / "dns.capture"
    proc = start("--output", str(out))
    wait_attached(out, proc)
    pid = lookup(files_only, "localhost")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    cap = parse_capture(out)
    assert cap.trailer["stop_reason"] == "signal"
    assert list(cap.events[cap.events.pid == pid].name) == ["localhost"]


def test_capture_to_stdout_and_names_filter(tmp_path, files_only):
    proc = start("--duration", "6s", "--names", "*.wanted.test", stdout=subprocess.PIPE)
    head = [proc.stdout.readline(), proc.stdout.readline()]  # the header, then B: the probes are attached
    assert head[1].startswith(b"B "), head
    pids = [lookup(files_only, n) for n in ("a.wanted.test", "localhost", "b.WANTED.test")]
    data, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0, errors.decode()
    cap = parse_capture(b"".join(head) + data)
    mine = cap.events[cap.events.pid.isin(pids)]
    assert sorted(mine.name) == ["a.wanted.test", "b.WANTED.test"]
    assert cap.header["filters"]["names"] == ["*.wanted.test"]


def test_live_table_shows_lookups_with_names_escaped(tmp_path, files_only):
    out = tmp_path / "dns.capture"
    proc = start("--duration", "6s", "--table", "--output", str(out), env={**os.environ, "COLUMNS": "200"})
    wait_attached(out, proc)
    pid = lookup(files_only, "esc\x1b[31mape.test")
    _, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0
    text = errors.decode()
    assert "esc\\x1b[31mape.test" in text and "\x1b[31mape" not in text  # the ESC cannot reach the terminal
    assert str(pid) in text and "EAI_NONAME" in text and "Process" in text


def test_tracer_that_dies_gives_exit_1_and_keeps_the_capture(tmp_path, files_only):
    out = tmp_path / "dns.capture"
    proc = start("--output", str(out))
    wait_attached(out, proc)
    pid = lookup(files_only, "localhost")
    time.sleep(1)
    tracer = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "bpftrace"], capture_output=True, text=True)
    os.kill(int(tracer.stdout.split()[0]), signal.SIGKILL)
    assert proc.wait(60) == ExitCode.HOSTS_FAILED
    assert "stopped by itself" in proc.stderr.read().decode()
    cap = parse_capture(out)
    assert cap.trailer["stop_reason"] == "backend-exit"
    assert list(cap.events[cap.events.pid == pid].name) == ["localhost"]


@pytest.mark.parametrize("args, code, message", [
    (["--duration", "10 minutes"], ExitCode.USAGE, "bad duration"),
    (["--libc", "/etc/passwd"], ExitCode.BAD_INPUT, "not a 64-bit little-endian ELF"),
    (["--libc", "/nonexistent/libc.so.6"], ExitCode.BAD_INPUT, "/nonexistent/libc.so.6 does not exist"),
    (["--mode", "summary", "--table"], ExitCode.USAGE, "--mode events"),
    (["--names", "a*b*c"], ExitCode.USAGE, "glob"),
    (["--output", "/nonexistent/dir/x.capture", "--duration", "1s"], ExitCode.BAD_INPUT, "cannot write"),
])
def test_bad_options_are_one_line_errors(args, code, message):
    done = subprocess.run([*FLEETDNS, "probe", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_tracer_names_its_package(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    done = subprocess.run([*FLEETDNS, "probe", "--duration", "1s"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(bindir)})
    assert done.returncode == ExitCode.ENVIRONMENT
    assert "'bpftrace' not found" in done.stderr and "apt-get install bpftrace" in done.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop root")
def test_not_root_is_a_clear_error(tmp_path):
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *FLEETDNS, "probe"],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if "No module named" in done.stderr or "Permission denied" in done.stderr:
        pytest.skip(f"the unprivileged user cannot run this checkout's python: {done.stderr.strip()[:120]}")
    assert done.returncode == ExitCode.ENVIRONMENT, done.stderr
    assert "needs root" in done.stderr
