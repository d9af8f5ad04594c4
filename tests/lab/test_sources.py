"""Issue 7 end to end on the lab: what the libc probe cannot see is seen on the wire, listed as a blind spot, or
shown as pre-capture evidence — real dig, a real pure-Go binary, a real static glibc binary, real python, a real
TCP connection opened before the capture.

Needs root, bpftrace, gcc (static), go (golang-go) and dig (bind9-dnsutils); each missing tool skips with its
reason. Lookups go to the lab's DNS server from inside lab1, or to lab1's /etc/hosts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import time
from collections import Counter

import pytest

from fleet.errors import ExitCode
from fleet.lab import control
from fleet.lab.layout import SERVICE_NAMES
from tests.conftest import fleetdns, needs_root

pytestmark = [needs_root, pytest.mark.lab]

GO_LOOKUP = """package main

import (
\t"net"
\t"os"
\t"time"
)

// go_lookup NAME TRIGGER: wait until the file TRIGGER exists, then resolve NAME with Go's own resolver.
func main() {
\tfor {
\t\tif _, err := os.Stat(os.Args[2]); err == nil {
\t\t\tbreak
\t\t}
\t\ttime.Sleep(100 * time.Millisecond)
\t}
\tnet.LookupHost(os.Args[1])
}
"""

STATIC_LOOKUP = r"""
#include <netdb.h>
#include <string.h>
#include <unistd.h>
/* static_lookup NAME TRIGGER: wait until TRIGGER exists, then getaddrinfo(NAME) from a statically linked glibc */
int main(int argc, char **argv) {
  while (access(argv[2], F_OK) != 0) usleep(100000);
  struct addrinfo hints, *res;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  if (getaddrinfo(argv[1], NULL, &hints, &res) == 0) freeaddrinfo(res);
  return 0;
}
"""

#: holds one TCP connection to old-db.lab:5432, resolved and opened before the capture starts
POOL = """
import socket, time
conn = socket.create_connection(("old-db.lab", 5432), timeout=10)
open("/var/lib/fleetdns/pool.ready", "w").close()
time.sleep(600)
"""
SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5432)); s.listen(); conns = []
while True:
    conns.append(s.accept())
"""


def _build(tmp_path) -> tuple[str, str]:
    for tool, package in (("gcc", "gcc"), ("go", "golang-go"), ("dig", "bind9-dnsutils")):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} ({package})")
    (tmp_path / "static_lookup.c").write_text(STATIC_LOOKUP)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp_path / "static_lookup"), str(tmp_path / "static_lookup.c")],
                   check=True, capture_output=True)
    (tmp_path / "main.go").write_text(GO_LOOKUP)
    env = {**os.environ, "HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"),
           "GOPATH": str(tmp_path / "gopath"), "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", str(tmp_path / "go_lookup"), str(tmp_path / "main.go")], check=True,
                   capture_output=True, env=env, cwd=tmp_path)
    return str(tmp_path / "static_lookup"), str(tmp_path / "go_lookup")


def _background(lab, host: str, argv: list[str]) -> None:
    """Start *argv* inside *host* in its own session, detached from this test's pipes."""
    control.exec_in(lab, host, ["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, timeout=30)


def _sh(lab, host: str, script: str) -> subprocess.CompletedProcess:
    return control.exec_in(lab, host, ["sh", "-c", script], capture_output=True, text=True, timeout=60)


def _wait_for(lab, host: str, path: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while _sh(lab, host, f"test -e {path}").returncode != 0:
        assert time.monotonic() < deadline, f"{path} never appeared on {host}"
        time.sleep(0.2)


def test_wire_blind_spots_and_pre_capture_evidence(deployed, tmp_path):
    lab = deployed
    static, golang = _build(tmp_path)
    var = lab.layout.host_dir(1) / "var-lib-fleetdns"  # lab1's /var/lib/fleetdns
    for program in (static, golang):
        shutil.copy(program, var)
    old_db = str(lab.layout.network[230 + SERVICE_NAMES.index("old-db.lab")])
    # old-db's server: lab2 answers for old-db.lab's address (on its loopback; it answers ARP on the bridge)
    assert _sh(lab, "lab2", f"ip addr add {old_db}/32 dev lo").returncode == 0
    try:
        _background(lab, "lab2", ["python3", "-c", SERVER, old_db])
        time.sleep(1)
        # before the capture: the pool resolves old-db.lab and connects; the Go and static programs start waiting
        _background(lab, "lab1", ["python3", "-c", POOL])
        _wait_for(lab, "lab1", "/var/lib/fleetdns/pool.ready")
        _background(lab, "lab1", ["/var/lib/fleetdns/go_lookup", "api.lab", "/var/lib/fleetdns/go.trigger"])
        _background(lab, "lab1", ["/var/lib/fleetdns/static_lookup", "cache.lab", "/var/lib/fleetdns/static.trigger"])

        proc = fleetdns("capture", "--duration", "20s", "--detach", "--limit", "lab1", "--watch", "old-db.lab",
                        home=lab.layout.home, timeout=150)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = proc.stdout.split()[-1]
        _sh(lab, "lab1", "touch /var/lib/fleetdns/go.trigger /var/lib/fleetdns/static.trigger")
        assert _sh(lab, "lab1", "dig +tries=1 +time=2 queue.lab").returncode == 0
        _sh(lab, "lab1", "python3 -c 'import socket; socket.getaddrinfo(\"db.lab\", None)'")
        _sh(lab, "lab1", "python3 -c 'import socket; socket.getaddrinfo(\"localhost\", None)'")
        gathered = fleetdns("gather", run_id, home=lab.layout.home, timeout=180)
        assert gathered.returncode == 0, gathered.stdout + gathered.stderr
    finally:
        _sh(lab, "lab1", "pkill -f pool.ready; pkill go_lookup; pkill static_lookup; "
                         "rm -f /var/lib/fleetdns/*.trigger /var/lib/fleetdns/pool.ready")
        _sh(lab, "lab2", f"pkill -f 'bind\\(\\(sys.argv'; ip addr del {old_db}/32 dev lo")

    run_dir = lab.layout.home / "reports" / run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hosts"]["lab1"]["status"] == "captured"
    scan = json.loads((run_dir / "raw" / "lab1.scan.json").read_text())
    blind = {(b["comm"], b["reason"]) for b in scan["blind_spots"]}
    assert {("go_lookup", "go"), ("static_lookup", "static")} <= blind
    assert manifest["hosts"]["lab1"]["scan"]["blind_spots"] == len(scan["blind_spots"])

    report = fleetdns("report", run_id, "--csv", "-", home=lab.layout.home, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = [r for r in csv.DictReader(io.StringIO(report.stdout)) if r["process"] not in ("sshd", "sudo")]
    sources = Counter((r["process"], r["name"], r["source"]) for r in rows)
    assert sources[("dig", "queue.lab", "wire")] == 1
    assert sources[("go_lookup", "api.lab", "wire")] == 1
    assert sources[("static_lookup", "cache.lab", "wire")] == 1
    assert sources[("python3", "db.lab", "both")] == 1
    assert sources[("python3", "localhost", "libc")] == 1
    assert list(csv.DictReader(io.StringIO(report.stdout)).fieldnames)[-1] == "source"

    check = fleetdns("check", run_id, "--absent", "old-db.lab", home=lab.layout.home, timeout=120)
    out = check.stdout + check.stderr
    assert check.returncode == ExitCode.UNPROVEN, out
    assert f"{old_db}:5432" in out and "old-db.lab" in out and "before the capture" in out
    assert "go_lookup" in out and "static_lookup" in out  # the blind spots, next to the verdict
