"""The host scan for real: `capture --watch` on a lab host with a static program running, then gather — the scan
file in the run store, its summary in the manifest, and none of the scan's own lookups in the capture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fleet.lab import control
from fleet.lab.lifecycle import service_records
from tests.conftest import fleetdns, needs_root
from tests.lab.test_capture import host_sh, lookups_in, manifest, mode

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture
def static_sleeper(deployed, tmp_path):
    """A statically linked program sleeping inside lab1 (copied into lab1's own /root); killed afterwards."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt: see scripts/setup)")
    (tmp_path / "s.c").write_text("#include <unistd.h>\nint main(void) { sleep(600); return 0; }\n")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp_path / "static-sleeper"), str(tmp_path / "s.c")],
                   check=True, timeout=120)
    lab = deployed
    copy = control.exec_in(lab, "lab1", ["sh", "-c", "cat > /root/static-sleeper && chmod 755 /root/static-sleeper"],
                           input=(tmp_path / "static-sleeper").read_bytes(), capture_output=True, timeout=30)
    assert copy.returncode == 0, copy.stderr
    pid = host_sh(lab, "lab1", "setsid /root/static-sleeper </dev/null >/dev/null 2>&1 & echo $!").strip()
    yield int(pid)
    host_sh(lab, "lab1", f"kill {pid}; rm -f /root/static-sleeper")


def test_capture_watch_gathers_the_scan_with_the_lab_dns_answer(deployed, static_sleeper):
    lab = deployed
    proc = fleetdns("capture", "--limit", "lab1", "--duration", "4s", "--watch", "old-db.lab", "--watch",
                    "gone-db.lab", home=lab.layout.home, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.split()[0]
    entry = manifest(lab, run_id)["hosts"]["lab1"]
    run_dir = lab.layout.home / "reports" / run_id
    path = run_dir / "raw" / "lab1.scan.json"
    assert mode(path) == "600"
    scan = json.loads(path.read_text())
    assert scan["format"] == "fleetdns-scan/1" and scan["host"] == "lab1" and scan["errors"] == []
    assert entry["scan"] == {"blind_spots": len(scan["blind_spots"]), "connections": len(scan["connections"]),
                             "watch": 2, "error": None}
    assert manifest(lab, run_id)["options"]["watch"] == ["old-db.lab", "gone-db.lab"]

    # what the lab DNS answers for old-db.lab, asked on lab1 before its recorder started
    watch = {w["name"]: w for w in scan["watch"]}
    old_db = {address for address, name in service_records(lab.layout) if name == "old-db.lab"}
    assert watch["old-db.lab"]["error"] is None and set(watch["old-db.lab"]["addresses"]) <= old_db
    assert {a for a in old_db if ":" not in a} <= set(watch["old-db.lab"]["addresses"])
    assert watch["gone-db.lab"]["addresses"] == [] and watch["gone-db.lab"]["error"].startswith("EAI_NONAME")
    # the scan resolved both names before the probe attached: neither is in the capture
    names = {name for name, _ in lookups_in(run_dir / entry["file"], entry["marker"])}
    assert not names & {"old-db.lab", "gone-db.lab"}

    # the static program is a blind spot; the hooked libc is lab1's private copy (host.json's)
    spots = {b["pid"]: b for b in scan["blind_spots"]}
    assert spots[static_sleeper]["reason"] == "static" and spots[static_sleeper]["comm"] == "static-sleeper"
    assert spots[static_sleeper]["exe"] == "/root/static-sleeper"
    assert scan["hooked_libc"]["path"] == entry["libc"] and scan["hooked_libc"]["ino"]
    # the host's init (pid 1, python3) started before lab1's private libc was bound over the machine's: it still
    # maps the machine's file, which the probe (on lab1's copy) does not see. sshd maps the copy: not listed.
    others = {(b["pid"], b["comm"], b["reason"]) for b in scan["blind_spots"] if b["pid"] != static_sleeper}
    assert others <= {(1, "python3", "other-libc")}
    # the controller's own SSH session was established when the scan ran: owned by sshd, on port 22
    assert any(c["comm"] == "sshd" and c["local"].endswith(":22") for c in scan["connections"]), scan["connections"]
    assert "nameserver" in (scan["resolver"]["resolv_conf"] or "")
    assert (scan["resolver"]["nsswitch_hosts"] or "hosts:").startswith("hosts:")
    assert os.stat(run_dir / "raw").st_mode & 0o777 == 0o700
