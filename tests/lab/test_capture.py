"""`fleetdns capture` / `gather` / `runs` for real: real bpftrace on the lab's hosts, real lookups made inside them,
SSH with pinned host keys. Every wait is bounded (subprocess timeouts, polling loops with deadlines)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from fleet import capture_format
from fleet.errors import ExitCode
from fleet.lab import control
from fleet.private import sha256_file
from tests.conftest import fleetdns, needs_root

pytestmark = [needs_root, pytest.mark.lab]

LOOKUP = "import socket, sys; socket.getaddrinfo(sys.argv[1], None)"


def lookup(lab, host: str, name: str) -> None:
    """One real getaddrinfo() of *name* by a python3 process inside *host* (NXDOMAIN names fail, as they should)."""
    control.exec_in(lab, host, ["python3", "-c", LOOKUP, name], capture_output=True, timeout=30)


def manifest(lab, run_id: str) -> dict:
    return json.loads((lab.layout.home / "reports" / run_id / "manifest.json").read_text())


def lookups_in(path: Path, marker: str) -> Counter:
    """(name, ok) of every lookup in a capture file, without the self-test and sshd's own reverse lookups."""
    events = capture_format.parse_capture(path).events
    events = events[(events["name"].astype(str) != marker) & (events["comm"].astype(str) != "sshd")]
    return Counter(zip(events["name"].astype(str), events["ok"].astype(bool), strict=True))


def host_sh(lab, host: str, script: str) -> str:
    return control.exec_in(lab, host, ["sh", "-c", script], capture_output=True, text=True, timeout=30).stdout


def probe_processes(lab, host: str) -> list[str]:
    out = host_sh(lab, host, "ps -eo args")
    return [line for line in out.splitlines() if "bpftrace" in line or "fleet.hostrun" in line]


def mode(path: Path) -> str:
    return oct(os.stat(path).st_mode & 0o777)[2:]


def test_detached_capture_then_gather_puts_each_lookup_in_its_hosts_file(deployed):
    lab = deployed
    proc = fleetdns("capture", "--duration", "12s", "--detach", "--label", "t1", home=lab.layout.home, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    run_id = lines[-1]
    assert lines[0] == run_id
    nx = f"nosuch-{uuid.uuid4().hex[:8]}.lab"
    lookup(lab, "lab1", "db.lab")
    lookup(lab, "lab1", "old-db.lab")
    control.exec_in(lab, "lab2", ["getent", "ahosts", "api.lab"], capture_output=True, timeout=30)
    lookup(lab, "lab3", nx)
    remote = f"/var/lib/fleetdns/runs/{run_id}"
    modes = host_sh(lab, "lab2", f"stat -c %a /var/lib/fleetdns/runs {remote} {remote}/capture {remote}/status.json")
    assert modes.split() == ["700", "700", "600", "600"]

    proc = fleetdns("gather", run_id, home=lab.layout.home, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = manifest(lab, run_id)
    expected = {"lab1": Counter({("db.lab", True): 1, ("old-db.lab", True): 1}),
                "lab2": Counter({("api.lab", True): 1}), "lab3": Counter({(nx, False): 1})}
    run_dir = lab.layout.home / "reports" / run_id
    for host, want in expected.items():
        entry = m["hosts"][host]
        assert entry["status"] == "captured" and entry["reason"] is None, entry
        path = run_dir / entry["file"]
        assert lookups_in(path, entry["marker"]) == want, host
        assert capture_format.parse_capture(path).header["host"] == host
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert entry["window"]["start"] < entry["window"]["end"] and entry["lost"] == 0
        assert mode(path) == "600"
        assert host_sh(lab, host, f"ls -d {remote} 2>/dev/null") == ""  # removed after the verified gather
    assert mode(run_dir) == mode(run_dir / "raw") == "700" and mode(run_dir / "manifest.json") == "600"
    assert m["options"]["label"] == "t1" and m["requested"]["start"] <= m["hosts"]["lab1"]["window"]["start"]

    again = fleetdns("gather", run_id, home=lab.layout.home, timeout=60)  # idempotent: nothing left to do
    assert again.returncode == 0 and manifest(lab, run_id)["hosts"] == m["hosts"]
    runs = fleetdns("runs", home=lab.layout.home, timeout=60)
    assert run_id in runs.stdout and "3 captured" in runs.stdout

    # the next stages read what gather wrote: the merged report and the check of a change
    report = fleetdns("report", run_id, "--csv", "-", home=lab.layout.home, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(io.StringIO(report.stdout)))
    seen = Counter((r["host"], r["name"], int(r["lookups"]), int(r["failed"])) for r in rows if r["process"] != "sshd")
    assert seen == Counter({("lab1", "db.lab", 1, 0): 1, ("lab1", "old-db.lab", 1, 0): 1,
                            ("lab2", "api.lab", 1, 0): 1, ("lab3", nx, 1, 1): 1})  # the self-tests are left out
    assert all(float(r["p50_ms"]) > 0 and r["first_seen"].endswith("Z") for r in rows)
    violated = fleetdns("check", run_id, "--absent", "old-db.*", home=lab.layout.home, timeout=120)
    assert violated.returncode == ExitCode.HOSTS_FAILED and "lab1" in violated.stdout + violated.stderr
    proven = fleetdns("check", run_id, "--absent", "gone-db.*", "--present", "db.lab", home=lab.layout.home,
                      timeout=120)
    assert proven.returncode == ExitCode.OK, proven.stdout + proven.stderr


def test_a_host_without_network_is_unreachable_and_the_others_are_captured_compressed(deployed):
    lab = deployed
    assert fleetdns("lab", "net", "lab3", "down", home=lab.layout.home).returncode == 0
    try:
        proc = fleetdns("capture", "--duration", "4s", "--compress", home=lab.layout.home, timeout=180)
    finally:
        assert fleetdns("lab", "net", "lab3", "up", home=lab.layout.home).returncode == 0
    assert proc.returncode == ExitCode.HOSTS_FAILED, proc.stdout + proc.stderr
    run_id = proc.stdout.split()[0]
    hosts = manifest(lab, run_id)["hosts"]
    assert hosts["lab3"]["status"] == "unreachable" and "cannot connect" in hosts["lab3"]["reason"]
    assert {hosts["lab1"]["status"], hosts["lab2"]["status"]} <= {"captured", "empty"}
    for host in ("lab1", "lab2"):  # --compress: gzip'd locally; the checksum is the host's, of the plain capture
        assert hosts[host]["file"] == f"raw/{host}.capture.gz"
        plain = gzip.decompress((lab.layout.home / "reports" / run_id / hosts[host]["file"]).read_bytes())
        assert hashlib.sha256(plain).hexdigest() == hosts[host]["sha256"]
    assert proc.stderr.strip().splitlines()[-1] == "fleetdns: error: 1 of 3 hosts not captured: lab3 (unreachable)"
    assert run_id in fleetdns("runs", home=lab.layout.home).stdout  # the run and its data are kept


def test_max_bytes_caps_the_file_and_an_interrupted_gather_resumes(deployed):
    lab = deployed
    proc = fleetdns("capture", "--limit", "lab1", "--duration", "30s", "--max-bytes", "8K", "--detach",
                    home=lab.layout.home, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.split()[-1]
    burst = "import socket\nfor i in range(200): socket.getaddrinfo('db.lab', None)"
    control.exec_in(lab, "lab1", ["python3", "-c", burst], capture_output=True, timeout=60)
    probe = ["/opt/fleetdns/bin/fleetdns-probe", "run", "finish", run_id, "--wait", "20"]
    status = json.loads(control.exec_in(lab, "lab1", probe, capture_output=True, timeout=60).stdout)
    assert status["state"] == "finished" and status["stop_reason"] == "max-bytes" and status["capped"]
    assert status["bytes"] <= 8192 and status["dropped"] > 0
    # An earlier gather that died half way left a .part: the next one continues it.
    whole = control.exec_in(lab, "lab1", ["cat", f"/var/lib/fleetdns/runs/{run_id}/capture"], capture_output=True,
                            timeout=30).stdout
    part = lab.layout.home / "reports" / run_id / "raw" / "lab1.capture.part"
    part.write_bytes(whole[: len(whole) // 2])
    proc = fleetdns("gather", run_id, "--keep-remote", home=lab.layout.home, timeout=120)
    assert proc.returncode == ExitCode.HOSTS_FAILED, proc.stdout + proc.stderr  # partial counts as not captured
    entry = manifest(lab, run_id)["hosts"]["lab1"]
    assert entry["status"] == "partial" and "--max-bytes reached" in entry["reason"]
    assert entry["resumed_from"] == len(whole) // 2
    local = lab.layout.home / "reports" / run_id / entry["file"]
    assert local.read_bytes() == whole and not part.exists()
    parsed = capture_format.parse_capture(local)
    assert parsed.trailer is not None and parsed.lost >= status["dropped"]
    assert host_sh(lab, "lab1", f"ls /var/lib/fleetdns/runs/{run_id}").split() == [
        "capture", "recorder.log", "scan.json", "status.json"]  # --keep-remote


def test_a_changed_host_key_is_refused(deployed, tmp_path):
    lab = deployed
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True,
                   timeout=30)
    address = lab.layout.inventory.read_text().split("lab1 ansible_host=")[1].split()[0]
    known = tmp_path / "known_hosts"
    known.write_text(f"{address} {' '.join((tmp_path / 'other.pub').read_text().split()[:2])}\n")
    text = lab.layout.inventory.read_text()
    real_known = text.split("UserKnownHostsFile=")[1].split()[0]
    inventory = tmp_path / "bad.ini"
    inventory.write_text(text.replace(real_known, str(known)))
    proc = fleetdns("capture", "-i", str(inventory), "--limit", "lab1", "--duration", "5s", home=lab.layout.home,
                    timeout=120)
    assert proc.returncode == ExitCode.HOSTS_FAILED, proc.stdout + proc.stderr
    entry = manifest(lab, proc.stdout.split()[0])["hosts"]["lab1"]
    assert entry["status"] == "failed" and "host key mismatch" in entry["reason"]
    assert probe_processes(lab, "lab1") == []  # nothing was started


def test_killed_controller_and_restarted_sshd_lose_nothing(deployed):
    lab = deployed
    env = {**os.environ, "FLEETDNS_HOME": str(lab.layout.home)}
    controller = subprocess.Popen([sys.executable, "-m", "fleet", "capture", "--duration", "10s"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        run_id = controller.stdout.readline().strip()  # the run id comes first, before any host is contacted
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            hosts = manifest(lab, run_id)["hosts"]
            if all(e["status"] == "running" for e in hosts.values()):
                break
            assert controller.poll() is None, "the capture ended early"
            time.sleep(0.2)
        else:
            pytest.fail(f"hosts never all recording: {hosts}")
        lookup(lab, "lab2", "cache.lab")
    finally:
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=10)
    assert fleetdns("lab", "sshd", "lab2", "stop", home=lab.layout.home).returncode == 0
    control.exec_in(lab, "lab2", ["pkill", "-x", "sshd"], timeout=30)  # the open sessions too
    try:
        lookup(lab, "lab2", "queue.lab")
    finally:
        assert fleetdns("lab", "sshd", "lab2", "start", home=lab.layout.home).returncode == 0
    deadline = time.monotonic() + 60  # each host ends on its own deadline, with nobody watching
    while any(probe_processes(lab, h) for h in lab.names()):
        assert time.monotonic() < deadline, {h: probe_processes(lab, h) for h in lab.names()}
        time.sleep(1)
    proc = fleetdns("gather", run_id, home=lab.layout.home, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = manifest(lab, run_id)["hosts"]["lab2"]
    assert entry["status"] == "captured"
    path = lab.layout.home / "reports" / run_id / entry["file"]
    assert lookups_in(path, entry["marker"]) == Counter({("cache.lab", True): 1, ("queue.lab", True): 1})


def test_gather_of_an_unknown_run_is_one_clear_line(deployed):
    proc = fleetdns("gather", "20200101T000000Z", home=deployed.layout.home)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert proc.stderr.strip() == f"fleetdns: error: no run 20200101T000000Z in {deployed.layout.home / 'reports'}"



def test_ctrl_c_and_gather_now_stop_early_and_keep_what_was_recorded(deployed):
    lab = deployed
    detached = fleetdns("capture", "--limit", "lab2", "--duration", "5m", "--detach", home=lab.layout.home,
                        timeout=150)
    assert detached.returncode == 0, detached.stdout + detached.stderr
    env = {**os.environ, "FLEETDNS_HOME": str(lab.layout.home)}
    controller = subprocess.Popen([sys.executable, "-m", "fleet", "capture", "--limit", "lab1", "--duration", "5m"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = controller.stdout.readline().strip()
        deadline = time.monotonic() + 90
        while manifest(lab, run_id)["hosts"]["lab1"]["status"] != "running":
            assert time.monotonic() < deadline and controller.poll() is None, "lab1 never started recording"
            time.sleep(0.2)
        lookup(lab, "lab1", "db.lab")
        now = fleetdns("gather", detached.stdout.split()[-1], "--now", home=lab.layout.home, timeout=120)
        controller.send_signal(signal.SIGINT)
        out, err = controller.communicate(timeout=120)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(timeout=10)
    assert controller.returncode == ExitCode.INTERRUPTED, out + err
    entry = manifest(lab, run_id)["hosts"]["lab1"]
    assert entry["status"] == "partial" and "stopped early" in entry["reason"]
    path = lab.layout.home / "reports" / run_id / entry["file"]
    assert lookups_in(path, entry["marker"]) == Counter({("db.lab", True): 1})
    assert capture_format.parse_capture(path).trailer is not None
    assert now.returncode == ExitCode.HOSTS_FAILED, now.stdout + now.stderr
    entry = manifest(lab, detached.stdout.split()[-1])["hosts"]["lab2"]
    assert entry["status"] == "partial" and "stopped early" in entry["reason"] and entry["file"]
    assert probe_processes(lab, "lab1") == [] and probe_processes(lab, "lab2") == []


BECOME_USER = "fleetops"


@pytest.fixture
def become_user(deployed):
    """lab2 gets a non-root SSH user with passwordless sudo (in lab2's own copy-on-write /etc and /home)."""
    lab = deployed
    assert lab.mode == "overlay"  # in bind mode these files would be the machine's own
    host_sh(lab, "lab2", f"""set -e
        useradd -m -s /bin/sh {BECOME_USER}
        usermod -p '*' {BECOME_USER}     # no password, but not locked: sshd (without PAM) refuses locked users
        install -d -m 700 -o {BECOME_USER} /home/{BECOME_USER}/.ssh
        install -m 600 -o {BECOME_USER} /root/.ssh/authorized_keys /home/{BECOME_USER}/.ssh/authorized_keys
        echo '{BECOME_USER} ALL=(root) NOPASSWD: ALL' > /etc/sudoers.d/{BECOME_USER}
        chmod 440 /etc/sudoers.d/{BECOME_USER}""")
    yield BECOME_USER
    host_sh(lab, "lab2", f"userdel -r {BECOME_USER}; rm -f /etc/sudoers.d/{BECOME_USER}")


def test_a_non_root_ssh_user_becomes_root_with_sudo(deployed, become_user, tmp_path):
    lab = deployed
    inventory = tmp_path / "become.ini"
    lines = lab.layout.inventory.read_text().replace("ansible_user=root", f"ansible_user={become_user}")
    inventory.write_text(lines.replace("[lab:vars]", "[lab:vars]\nansible_become=true"))
    proc = fleetdns("capture", "-i", str(inventory), "--limit", "lab2", "--duration", "8s", "--detach",
                    home=lab.layout.home, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.split()[-1]
    lookup(lab, "lab2", "db.lab")
    remote = f"/var/lib/fleetdns/runs/{run_id}"
    assert host_sh(lab, "lab2", f"stat -c %U:%a {remote}/capture").split() == ["root:600"]
    proc = fleetdns("gather", run_id, home=lab.layout.home, timeout=180)  # the inventory of the run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = manifest(lab, run_id)["hosts"]["lab2"]
    assert entry["status"] == "captured", entry
    path = lab.layout.home / "reports" / run_id / entry["file"]
    events = capture_format.parse_capture(path).events
    assert set(events[events["name"] == "db.lab"]["comm"]) == {"python3"}
    assert set(events["comm"]) <= {"python3", "sshd", "sudo"}  # sudo resolves the host's own name: real lookups
    assert entry["sha256"] == sha256_file(path)
    scan = path.with_name("lab2.scan.json")  # root's on the host (0600): read through sudo too
    assert mode(scan) == "600" and json.loads(scan.read_text())["host"] == "lab2" and entry["scan"]["error"] is None
    assert host_sh(lab, "lab2", f"ls -d {remote} 2>/dev/null") == ""  # removed as root after the verified gather

    su = inventory.read_text().replace("ansible_become=true", "ansible_become=true\nansible_become_method=su")
    inventory.write_text(su)
    bad = fleetdns("capture", "-i", str(inventory), "--limit", "lab2", "--duration", "5s", home=lab.layout.home)
    assert bad.returncode == ExitCode.BAD_INPUT and "sudo only" in bad.stderr
