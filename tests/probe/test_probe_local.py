"""The real probe on this machine: bpftrace on libc, real lookups, the capture parsed back.

Needs root, bpftrace and tracefs (skipped with the reason otherwise); the C workloads need gcc.

No lookup here may reach the machine's nameserver: every workload runs in a private mount namespace whose
/etc/nsswitch.conf says ``hosts: files``, so a name missing from /etc/hosts fails locally (HOST_NOT_FOUND /
EAI_NONAME). Names that succeed are the ones /etc/hosts holds (``localhost``, ``vm``) and 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.capture_format import parse_capture
from fleet.errors import InputError, UsageError
from fleet.probes import render, runner
from tests.probe.conftest import needs_probe

ROOT = Path(__file__).resolve().parents[2]


pytestmark = needs_probe

LOOKUPS_C = r"""
#define _GNU_SOURCE
#include <netdb.h>
#include <stdio.h>
#include <arpa/inet.h>
#include <sys/socket.h>
/* one call of each resolver function on argv[1] (and a reverse lookup of 127.0.0.1) */
int main(int argc, char **argv) {
  const char *name = argv[1];
  struct hostent h, *res; char buf[8192]; int herr = 0;
  gethostbyname_r(name, &h, buf, sizeof buf, &res, &herr);
  gethostbyname2_r(name, AF_INET, &h, buf, sizeof buf, &res, &herr);
  gethostbyname(name);
  gethostbyname2(name, AF_INET);
  struct in_addr a; inet_pton(AF_INET, "127.0.0.1", &a);
  gethostbyaddr(&a, 4, AF_INET);
  struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr = a };
  char host[256];
  getnameinfo((struct sockaddr *)&sin, sizeof sin, host, sizeof host, NULL, 0, NI_NAMEREQD);
  return 0;
}
"""

LOOP_C = r"""
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
/* argv[2] getaddrinfo(argv[1]) calls, AF_INET, as fast as possible */
int main(int argc, char **argv) {
  long n = atol(argv[2]);
  struct addrinfo hints, *res;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  for (long i = 0; i < n; i++)
    if (getaddrinfo(argv[1], NULL, &hints, &res) == 0) freeaddrinfo(res);
  return 0;
}
"""


@pytest.fixture(scope="module")
def cprogs(tmp_path_factory) -> dict[str, str]:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the C workloads")
    out = tmp_path_factory.mktemp("cprogs")
    progs = {}
    for name, source in (("lookups", LOOKUPS_C), ("gai_loop", LOOP_C)):
        (out / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-O2", "-o", str(out / name), str(out / f"{name}.c")], check=True)
        progs[name] = str(out / name)
    return progs


@pytest.fixture
def cgroup_dir():
    """A fresh cgroup v2 directory (removed afterwards) for workloads the probe filters on."""
    base = Path("/sys/fs/cgroup/unified")
    if not (base / "cgroup.procs").exists():
        base = Path("/sys/fs/cgroup")
    if not (base / "cgroup.subtree_control").exists():
        pytest.skip("needs a cgroup v2 hierarchy")
    group = base / f"fleetdns-test-{os.getpid()}"
    group.mkdir()
    yield group
    group.rmdir()


class Probe:
    """A probe running in a thread until :meth:`finish`; ``pids`` collects the workload's processes."""

    def __init__(self, opts: render.ProbeOptions, path: Path, table=None) -> None:
        self.path, self.stop, self.ready, self.table = path, threading.Event(), threading.Event(), table
        self.trailer: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(opts,), daemon=True)
        self.thread.start()
        if not self.ready.wait(120):
            raise AssertionError(f"probe did not attach: {self.error}")

    def _run(self, opts: render.ProbeOptions) -> None:
        try:
            self.trailer = runner.run_probe(opts, str(self.path), ready_callback=self.ready.set, stop=self.stop,
                                            table_callback=self.table)
        except BaseException as e:  # reported by finish()
            self.error = e
            self.ready.set()

    def finish(self):
        self.stop.set()
        self.thread.join(120)
        if self.error is not None:
            raise self.error
        return parse_capture(self.path)


def spawn(files_only: list[str], *argv: str) -> int:
    """Run one workload to completion; return its pid (unshare and sh exec, so it is the Popen pid)."""
    proc = subprocess.Popen([*files_only, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(300)
    return proc.pid


PY_LOOKUPS = r"""
import socket, sys
socket.getaddrinfo("localhost", None)
try:
    socket.getaddrinfo("no-such-host.fleetdns.test", None)
except OSError:
    pass
socket.gethostbyname("vm")
socket.gethostbyaddr("127.0.0.1")
"""


def test_each_lookup_once_with_function_result_latency_time(tmp_path, files_only, cprogs):
    probe = Probe(render.ProbeOptions(), tmp_path / "c.capture")
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
    ev = cap.events

    def seen(pid):
        rows = ev[ev["pid"] == pid]
        return [(r.function, r.name, r.result) for r in rows.itertuples()]

    assert seen(py) == [("getaddrinfo", "localhost", "OK"),
                        ("getaddrinfo", "no-such-host.fleetdns.test", "EAI_NONAME"),
                        ("getaddrinfo", "vm", "OK"),  # Python's gethostbyname() uses getaddrinfo()
                        ("gethostbyaddr_r", "127.0.0.1", "OK")]
    assert seen(ahosts) == [("getaddrinfo", "localhost", "OK")]
    # getent hosts asks for AF_INET6 first (not in /etc/hosts), then AF_INET
    assert seen(hosts) == [("gethostbyname2", "vm", "HOST_NOT_FOUND"), ("gethostbyname2", "vm", "OK")]
    funcs = ["gethostbyname_r", "gethostbyname2_r", "gethostbyname", "gethostbyname2"]
    assert seen(c_ok) == [(f, "vm", "OK") for f in funcs] + [("gethostbyaddr", "127.0.0.1", "OK"),
                                                             ("getnameinfo", "127.0.0.1", "OK")]
    assert seen(c_fail)[:4] == [(f, "no-such-host.fleetdns.test", "HOST_NOT_FOUND") for f in funcs]
    mine = ev[ev["pid"].isin([py, ahosts, hosts, c_ok, c_fail])]
    assert (mine["latency_ns"] > 0).all()
    assert mine["time"].min().value >= t_start and mine["time"].max().value <= t_end
    assert {"getent", "lookups"} <= set(mine["comm"])


ODD_NAMES = [b"new\nline", b"tab\there", b"com,ma", b"quo\"te's", b"=cmd|calc", b"esc\x1b[1m", b"\xff\xfe\x80bad",
             "bücher.例え".encode(), b"a" * 253]


def test_odd_names_round_trip_and_long_name_is_flagged(tmp_path, files_only):
    probe = Probe(render.ProbeOptions(), tmp_path / "c.capture")
    script = ("import socket, sys\n"
              "for n in eval(sys.argv[1]):\n"
              "    try: socket.getaddrinfo(n, None)\n"
              "    except OSError: pass\n")
    pid = spawn(files_only, sys.executable, "-c", script, repr(ODD_NAMES + [b"b" * 300]))
    cap = probe.finish()
    rows = cap.events[cap.events["pid"] == pid]
    assert list(rows["name_bytes"]) == ODD_NAMES + [b"b" * 256]
    assert list(rows["name_truncated"]) == [False] * len(ODD_NAMES) + [True]
    assert cap.damage == {}


def test_summary_counts_equal_events_counts(tmp_path, files_only, cprogs):
    events = Probe(render.ProbeOptions(mode="events"), tmp_path / "e.capture")
    summary = Probe(render.ProbeOptions(mode="summary"), tmp_path / "s.capture")
    pids = [spawn(files_only, cprogs["gai_loop"], "localhost", "300"),
            spawn(files_only, cprogs["lookups"], "vm"),
            spawn(files_only, cprogs["lookups"], "no-such-host.fleetdns.test"),
            spawn(files_only, "getent", "hosts", "vm")]
    ev, su = events.finish(), summary.finish()
    assert ev.lost == 0 and su.lost == 0 and su.damage == {}

    def table(df):
        df = df[df["pid"].isin(pids)]
        return sorted((r.pid, r.function, r.name_bytes, r.lookups, r.failures) for r in df.itertuples())

    assert table(su.summary) == table(ev.summary)
    assert len(table(su.summary)) == 1 + 6 + 6 + 1
    assert su.minutes[su.minutes["pid"].isin(pids)]["count"].sum() == 300 + 6 + 6 + 2
    assert su.histogram[su.histogram["pid"].isin(pids)]["count"].sum() == 300 + 6 + 6 + 2


def test_summary_burst_of_100k_loses_nothing(tmp_path, files_only, cprogs):
    probe = Probe(render.ProbeOptions(mode="summary"), tmp_path / "s.capture")
    pid = spawn(files_only, cprogs["gai_loop"], "localhost", "100000")
    cap = probe.finish()
    rows = cap.summary[cap.summary["pid"] == pid]
    assert cap.lost == 0
    assert list(rows["lookups"]) == [100_000] and list(rows["failures"]) == [0]
    # size is bounded by distinct keys (this machine's other resolving processes add a few)
    assert os.path.getsize(tmp_path / "s.capture") < 100_000


def test_events_loss_is_counted_exactly(tmp_path, files_only, cprogs, cgroup_dir):
    """A flood faster than bpftrace can format, alone in a cgroup the probe filters on: every lookup is
    either an E record or counted as lost, exactly."""
    probe = Probe(render.ProbeOptions(mode="events", cgroup=str(cgroup_dir)), tmp_path / "e.capture")
    pid = spawn(files_only, "sh", "-c", f'echo $$ > {cgroup_dir}/cgroup.procs && exec "$@"', "sh",
                cprogs["gai_loop"], "localhost", "200000")
    cap = probe.finish()
    assert set(cap.events["pid"]) == {pid}
    assert len(cap.events) + cap.lost == 200_000
    assert cap.trailer["lost"] == cap.lost


def test_name_globs_filter_in_kernel_and_live_table(tmp_path, files_only):
    table: list[dict] = []
    probe = Probe(render.ProbeOptions(names=("LOCAL*", "*.fleetdns.test")), tmp_path / "c.capture", table.append)
    pid = spawn(files_only, sys.executable, "-c", PY_LOOKUPS)
    cap = probe.finish()
    rows = cap.events[cap.events["pid"] == pid]
    assert list(rows["name"]) == ["localhost", "no-such-host.fleetdns.test"]
    live = [(r["function"], r["name"], r["result"]) for r in table if r["pid"] == pid]
    assert live == [("getaddrinfo", "localhost", "OK"), ("getaddrinfo", "no-such-host.fleetdns.test", "EAI_NONAME")]
    assert all(r["latency_ns"] > 0 and r["time"].tzinfo is not None for r in table)
    assert all(render.name_matches(n, ("LOCAL*", "*.fleetdns.test")) for n in cap.events["name_bytes"])


def test_cgroup_filter(tmp_path, files_only, cgroup_dir):
    probe = Probe(render.ProbeOptions(cgroup=str(cgroup_dir)), tmp_path / "c.capture")
    inside = spawn(files_only, "sh", "-c", f"echo $$ > {cgroup_dir}/cgroup.procs && exec getent ahosts localhost")
    outside = spawn(files_only, "getent", "ahosts", "localhost")
    cap = probe.finish()
    assert list(cap.events["pid"]) == [inside] and outside not in set(cap.events["pid"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_runner_command_ends_cleanly_on_signal(tmp_path, files_only, sig):
    out = tmp_path / "c.capture"
    proc = subprocess.Popen([sys.executable, "-m", "fleet.probes.runner", "--mode", "summary", "--output", str(out)],
                            cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while b"\nB " not in (out.read_bytes() if out.exists() else b"") and time.time() < deadline:
        time.sleep(0.2)
    pid = spawn(files_only, "getent", "ahosts", "localhost")
    proc.send_signal(sig)
    assert proc.wait(60) == 0, proc.stderr.read()
    cap = parse_capture(out)
    assert cap.trailer["stop_reason"] == "signal" and cap.damage == {}
    assert list(cap.summary[cap.summary["pid"] == pid]["lookups"]) == [1]


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        runner.run_probe(render.ProbeOptions(libc=str(tmp_path / "nope.so")), str(tmp_path / "c"))
    (tmp_path / "text").write_text("not elf")
    with pytest.raises(InputError, match="not a 64-bit"):
        runner.run_probe(render.ProbeOptions(libc=str(tmp_path / "text")), str(tmp_path / "c"))
    with pytest.raises(InputError, match="defines none"):
        runner.run_probe(render.ProbeOptions(libc=sys.executable if not os.path.islink(sys.executable)
                                             else os.path.realpath(sys.executable)), str(tmp_path / "c"))
    with pytest.raises(UsageError):
        runner.run_probe(render.ProbeOptions(mode="nope"), str(tmp_path / "c"))
