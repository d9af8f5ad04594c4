"""`fleetdns deploy` for real: the playbook on the lab fleet (Debian branch), idempotence, --limit, a host that
cannot be reached, and the preflight's host.json."""

from __future__ import annotations

import json
import re
import time

import pytest

from fleet import deploy
from fleet.errors import ExitCode
from fleet.lab import control
from tests.conftest import fleetdns, needs_root

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture(scope="module")
def first_deploy(lab):
    """The CLI's first deploy of the session lab: (completed process, seconds)."""
    started = time.monotonic()
    proc = fleetdns("deploy", str(lab.layout.inventory), home=lab.layout.home, timeout=600)
    return proc, time.monotonic() - started


def test_deploy_makes_every_lab_host_ready(lab, first_deploy):
    proc, _ = first_deploy
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in lab.names():
        assert re.search(rf"│ {host} +│ (ok|changed) +│ yes +│ [^│]*bpftrace", proc.stdout), proc.stdout
    record = json.loads((lab.layout.home / ".fleetdns" / "last-deploy.json").read_text())
    assert record["inventory"] == str(lab.layout.inventory)  # what `capture` defaults to
    assert all(h["ready"] for h in record["hosts"].values())


def test_host_json_describes_the_host(lab, first_deploy):
    for host in lab.names():
        text = control.exec_in(lab, host, ["cat", "/var/lib/fleetdns/host.json"], capture_output=True, text=True)
        info = json.loads(text.stdout)
        assert info["host"] == host
        assert info["libc"] == lab.libc
        assert "bpftrace" in info["ready"] and info["backends"]["bpftrace"]["ok"]
        assert info["backends"]["bpftrace"]["version"].startswith("bpftrace v")
        assert any("stap module runtime unavailable" in p for p in info["problems"])  # no headers for this kernel
        # stap's bpf runtime is only compiled on every host at once, never run live (see fleet/preflight.py)
        assert info["backends"]["stap"]["checked"] == "compile", info["backends"]["stap"]
        modes = control.exec_in(lab, host, ["stat", "-c", "%a", "/var/lib/fleetdns/host.json", "/var/lib/fleetdns"],
                                capture_output=True, text=True).stdout.split()
        assert modes == ["600", "700"]
        launcher = control.exec_in(lab, host, ["/opt/fleetdns/bin/fleetdns-probe", "--help"], capture_output=True)
        assert launcher.returncode == 0


def test_second_deploy_changes_nothing(lab, first_deploy, monkeypatch):
    monkeypatch.setenv("FLEETDNS_HOME", str(lab.layout.home))
    reports, run = deploy.deploy(str(lab.layout.inventory))
    assert {r.host: r.status for r in reports} == {h: "ok" for h in lab.names()}
    assert all(r.ready for r in reports)


def test_limit_deploys_only_matching_hosts(lab, first_deploy, monkeypatch):
    monkeypatch.setenv("FLEETDNS_HOME", str(lab.layout.home))
    reports, run = deploy.deploy(str(lab.layout.inventory), limit="lab2")
    assert [r.host for r in reports] == ["lab2"] and reports[0].ready
    assert set(run.hosts) == {"lab2"}


def test_an_unreachable_host_does_not_sink_the_others(lab, first_deploy):
    assert fleetdns("lab", "sshd", "lab3", "stop", home=lab.layout.home).returncode == 0
    # Also end the sessions of earlier runs: Ansible's ControlPersist master would carry on through them.
    control.exec_in(lab, "lab3", ["pkill", "-x", "sshd"])
    try:
        proc = fleetdns("deploy", str(lab.layout.inventory), home=lab.layout.home, timeout=600)
    finally:
        assert fleetdns("lab", "sshd", "lab3", "start", home=lab.layout.home).returncode == 0
    assert proc.returncode == ExitCode.HOSTS_FAILED, proc.stdout + proc.stderr
    assert re.search(r"│ lab3 +│ unreachable +│ no ", proc.stdout), proc.stdout
    for host in ("lab1", "lab2"):
        assert re.search(rf"│ {host} +│ ok +│ yes ", proc.stdout), proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "fleetdns: error: 1 of 3 hosts not ready: lab3"


def test_check_mode_changes_nothing_and_reports_no_failure(lab, first_deploy):
    proc = fleetdns("deploy", str(lab.layout.inventory), "--check", home=lab.layout.home, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check mode" in proc.stdout
    for host in lab.names():
        assert re.search(rf"│ {host} +│ ok +│ n/a ", proc.stdout), proc.stdout
