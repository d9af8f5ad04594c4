"""The real stap probe on this machine: real lookups, the capture parsed back. Opt-in: FLEETDNS_TEST_STAP=1.

Opt-in because stap's bpf runtime has oopsed this sandbox's kernel when several ran at once: every test here
holds ``/tmp/fleetdns-stap.lock`` while its probe runs (run these tests alone, never with ``-n``). On this
machine stap runs its bpf runtime (no loadable modules); it needs the lab's accommodations (kernel build stub,
memlock shim: ``fleet.lab.accommodations``) and debugfs. Lookups are answered from /etc/hosts only (the
``files_only`` fixture of tests/probe/conftest.py).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from fleet.capture_format import parse_capture
from fleet.errors import FleetError
from fleet.lab import accommodations
from fleet.probes import render, runner
from tests.probe import test_probe_local as local
from tests.probe.test_probe_local import ODD_NAMES, PY_LOOKUPS, Probe, spawn

# the bpftrace tests' C workloads, registered here too (files_only comes from conftest.py)
cprogs = local.cprogs

LOCK = "/tmp/fleetdns-stap.lock"


def _skip_reason() -> str | None:
    if os.environ.get("FLEETDNS_TEST_STAP") != "1":
        return "live stap tests are opt-in: set FLEETDNS_TEST_STAP=1 (and run them alone)"
    if os.geteuid() != 0:
        return "live stap tests need root"
    try:
        runner.check_environment(render.ProbeOptions(backend="stap"))
    except FleetError as e:
        return f"live stap tests need stap and its runtime's environment: {e}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(autouse=True)
def one_stap_at_a_time(monkeypatch):
    """Hold the machine-wide stap lock for the test; give the bpf runtime the lab's memlock shim."""
    if render.stap_runtime() == "bpf":
        accommodations.kernel_build_stub()
        shim = accommodations.memlock_shim()
        if shim is None:
            pytest.skip("stap's bpf runtime needs the memlock shim here, and no C compiler is installed")
        monkeypatch.setenv("LD_PRELOAD", str(shim))
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_each_lookup_once_with_function_result_latency_time(tmp_path, files_only, cprogs):
    probe = Probe(render.ProbeOptions(backend="stap"), tmp_path / "c.capture")
    t_start = time.time_ns()
    py = spawn(files_only, sys.executable, "-c", PY_LOOKUPS)
    ahosts = spawn(files_only, "getent", "ahosts", "localhost")
    hosts = spawn(files_only, "getent", "hosts", "vm")
    c_ok = spawn(files_only, cprogs["lookups"], "vm")
    c_fail = spawn(files_only, cprogs["lookups"], "no-such-host.fleetdns.test")
    t_end = time.time_ns()
    cap = probe.finish()
    assert cap.lost == 0 and cap.damage == {}
    assert cap.trailer["stop_reason"] == "stopped" and cap.trailer["exit_status"] == 0
    assert cap.header["backend"] == "stap" and cap.header["backend_runtime"] == render.stap_runtime()
    ev = cap.events

    def seen(pid):
        rows = ev[ev["pid"] == pid]
        return [(r.function, r.name, r.result) for r in rows.itertuples()]

    assert seen(py) == [("getaddrinfo", "localhost", "OK"),
                        ("getaddrinfo", "no-such-host.fleetdns.test", "EAI_NONAME"),
                        ("getaddrinfo", "vm", "OK"),
                        ("gethostbyaddr_r", "127.0.0.1", "OK")]
    assert seen(ahosts) == [("getaddrinfo", "localhost", "OK")]
    assert seen(hosts) == [("gethostbyname2", "vm", "HOST_NOT_FOUND"), ("gethostbyname2", "vm", "OK")]
    funcs = ["gethostbyname_r", "gethostbyname2_r", "gethostbyname", "gethostbyname2"]
    assert seen(c_ok) == [(f, "vm", "OK") for f in funcs] + [("gethostbyaddr", "127.0.0.1", "OK"),
                                                             ("getnameinfo", "127.0.0.1", "OK")]
    assert seen(c_fail)[:4] == [(f, "no-such-host.fleetdns.test", "HOST_NOT_FOUND") for f in funcs]
    mine = ev[ev["pid"].isin([py, ahosts, hosts, c_ok, c_fail])]
    assert (mine["latency_ns"] > 0).all()
    assert mine["time"].min().value >= t_start and mine["time"].max().value <= t_end
    assert {"getent", "lookups"} <= set(mine["comm"])


def test_odd_names_round_trip_within_the_runtime_limit(tmp_path, files_only):
    """Every odd name up to the runtime's exact length comes through byte-exactly; one longer is flagged
    truncated (module runtime: 255 exact; bpf runtime: 63 exact, first 64 bytes kept)."""
    exact = render.NAME_MAX - 1 if render.stap_runtime() == "module" else render.STAP_BPF_NAME_MAX - 1
    kept = render.NAME_MAX if render.stap_runtime() == "module" else render.STAP_BPF_NAME_MAX
    names = [n for n in ODD_NAMES if len(n) <= exact] + [b"a" * exact]
    probe = Probe(render.ProbeOptions(backend="stap"), tmp_path / "c.capture")
    script = ("import socket, sys\n"
              "for n in eval(sys.argv[1]):\n"
              "    try: socket.getaddrinfo(n, None)\n"
              "    except OSError: pass\n")
    pid = spawn(files_only, sys.executable, "-c", script, repr(names + [b"b" * 300]))
    cap = probe.finish()
    rows = cap.events[cap.events["pid"] == pid]
    assert list(rows["name_bytes"]) == names + [b"b" * kept]
    assert list(rows["name_truncated"]) == [False] * len(names) + [True]
    assert cap.damage == {} and cap.lost == 0


def test_ipv6_reverse_lookups_and_threads(tmp_path, files_only):
    """16-byte addresses (getnameinfo, gethostbyaddr_r of ::1) and lookups from several threads at once: each
    thread's lookups keep their own name, depth and result."""
    script = ("import socket, threading\n"
              "socket.getnameinfo(('::1', 0), 0)\n"
              "try: socket.gethostbyaddr('::1')\n"
              "except OSError: pass\n"
              "def work(n):\n"
              "    for _ in range(20): socket.getaddrinfo(n, None)\n"
              "ts = [threading.Thread(target=work, args=(n,)) for n in ('localhost', 'vm', 'localhost', 'vm')]\n"
              "[t.start() for t in ts]; [t.join() for t in ts]\n")
    probe = Probe(render.ProbeOptions(backend="stap"), tmp_path / "c.capture")
    pid = spawn(files_only, sys.executable, "-c", script)
    cap = probe.finish()
    rows = cap.events[cap.events["pid"] == pid]
    reverse = [(r.function, r.name) for r in rows.itertuples() if r.reverse]
    assert reverse == [("getnameinfo", "::1"), ("gethostbyaddr_r", "::1")]
    threads = rows[rows["tid"] != pid]
    assert len(threads) == 80 and set(threads["result"]) == {"OK"} and threads["tid"].nunique() == 4
    assert threads.groupby("tid")["name"].nunique().eq(1).all()
    assert cap.lost == 0 and cap.damage == {}


def test_runner_command_ends_cleanly_on_sigint(tmp_path, files_only):
    out = tmp_path / "c.capture"
    proc = subprocess.Popen([sys.executable, "-m", "fleet.probes.runner", "--backend", "stap", "--output", str(out)],
                            cwd=local.ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while b"\nB " not in (out.read_bytes() if out.exists() else b"") and time.time() < deadline:
        time.sleep(0.2)
    pid = spawn(files_only, "getent", "ahosts", "localhost")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, proc.stderr.read()
    cap = parse_capture(out)
    assert cap.trailer["stop_reason"] == "signal" and cap.trailer["exit_status"] == 0 and cap.damage == {}
    assert list(cap.events[cap.events["pid"] == pid]["name"]) == ["localhost"]
