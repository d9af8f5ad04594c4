"""The probe inside a lab host, as on a real server: real bpftrace on the host's own libc, real lookups
answered by the host's /etc/hosts and by the lab's DNS server (names, NXDOMAIN, a reverse lookup), each seen once
with the right function, result, a positive latency and a time inside the test's wall-clock window.

The host runs the probe the way deployed hosts do (``python3 -m fleet.probes.runner``, stdlib only, the
code ``fleetdns probe`` runs), from a copy of this checkout's ``fleet/`` package put into the host's private
/var/lib/fleetdns. The probe reports the machine's pids, not the host's (the host has its own pid
namespace), so lookups are told apart by name and process name here.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from fleet.capture_format import parse_capture
from fleet.lab import control
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.lab,
              pytest.mark.skipif(shutil.which("bpftrace") is None, reason="needs bpftrace (apt-get install bpftrace)")]

CAPTURE = "/var/lib/fleetdns/probe-in-host.capture"
SRC = "/var/lib/fleetdns/probe-test-src"
PACKAGE = Path(__file__).resolve().parents[2] / "fleet"

# the lookups, run inside the host; getent covers getaddrinfo and gethostbyname2, python gethostbyname_r
LOOKUPS = [
    ("getent", "ahosts", "db.lab"),                   # getaddrinfo, lab DNS
    ("getent", "ahosts", "gone.lab"),                 # getaddrinfo, lab DNS NXDOMAIN
    ("getent", "hosts", "api.lab"),                   # gethostbyname2, lab DNS
    ("getent", "ahosts", "lab1.lab"),                 # getaddrinfo, lab DNS (the host's own name)
    ("python3", "-c", "import socket; socket.gethostbyname_ex('cache.lab')"),  # gethostbyname_r
]


def host_file(lab, host: str, path: str) -> bytes:
    return control.exec_in(lab, host, ["cat", path], capture_output=True, timeout=30).stdout


def copy_package(lab, host: str) -> None:
    """This checkout's ``fleet/`` package into the host's SRC (the host cannot see the checkout)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(PACKAGE, arcname="fleet", filter=lambda t: None if "__pycache__" in t.name else t)
    assert control.exec_in(lab, host, ["mkdir", "-p", SRC], timeout=30).returncode == 0
    assert control.exec_in(lab, host, ["tar", "-C", SRC, "-x"], input=data.getvalue(), timeout=30).returncode == 0


def test_probe_in_a_lab_host_sees_each_lookup_once(lab):
    copy_package(lab, "lab1")
    start_ns = time.time_ns()
    probe = subprocess.Popen(control.nsenter_argv(lab, 1, ["python3", "-m", "fleet.probes.runner", "--duration",
                                                           "15", "--output", CAPTURE]),
                             env={**lab.host_env(), "PYTHONPATH": SRC}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while b"\nB " not in host_file(lab, "lab1", CAPTURE):
        assert probe.poll() is None, probe.stderr.read().decode()
        assert time.monotonic() < deadline, "probe did not attach in 120 s"
        time.sleep(0.2)
    for argv in LOOKUPS:
        control.exec_in(lab, "lab1", list(argv), capture_output=True, timeout=30)
    reverse = control.exec_in(lab, "lab1", ["getent", "hosts", lab.layout.address(2)], capture_output=True,
                              timeout=30)
    control.exec_in(lab, "lab2", ["getent", "ahosts", "queue.lab"], capture_output=True, timeout=30)
    assert probe.wait(60) == 0, probe.stderr.read().decode()
    end_ns = time.time_ns()

    cap = parse_capture(host_file(lab, "lab1", CAPTURE))
    ev = cap.events
    got = sorted(zip(ev.name.astype(str), ev.function.astype(str), ev.result.astype(str), strict=True))
    # CPython's gethostbyname_ex makes two libc calls: getaddrinfo (to parse the name), then gethostbyname_r
    expected = [("api.lab", "gethostbyname2", "OK"), ("cache.lab", "getaddrinfo", "OK"),
                ("cache.lab", "gethostbyname_r", "OK"),
                ("db.lab", "getaddrinfo", "OK"), ("gone.lab", "getaddrinfo", "EAI_NONAME"),
                ("lab1.lab", "getaddrinfo", "OK")]
    forward = [g for g in got if g[1] != "gethostbyaddr"]
    assert forward == expected                                  # each once; lab2's queue.lab is not here
    rev = ev[ev.function == "gethostbyaddr"]
    assert list(rev.name.astype(str)) == [lab.layout.address(2)]  # the reverse lookup, its address as name
    assert (rev.result == "OK").all() == (reverse.returncode == 0)
    assert (ev.latency_ns > 0).all()
    times = ev.time.astype("int64")
    assert ((times >= start_ns) & (times <= end_ns)).all()
    assert set(ev.comm.astype(str)) == {"getent", "python3"}
    assert cap.trailer["stop_reason"] == "duration" and cap.trailer["lost"] == 0
    assert cap.header["host"] == "lab1"
