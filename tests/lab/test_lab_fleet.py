"""The lab fleet, tested for real: sshd hosts in namespaces, Ansible through ansible-runner, the lab DNS server,
per-host libc under a real bpftrace probe, the fault switches, and a second lab that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paramiko
import pytest

from fleet import ansible
from fleet.errors import ExitCode
from fleet.lab import control, lifecycle
from tests.conftest import fleetdns, needs_root

pytestmark = [needs_root, pytest.mark.lab]


def ssh(lab: lifecycle.Lab, index: int, known_hosts: Path | None = None) -> paramiko.SSHClient:
    """A paramiko client to host *index*, verifying its key against the lab's known_hosts (RejectPolicy)."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or lab.layout.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(lab.layout.address(index), username="root", key_filename=str(lab.layout.client_key),
                   look_for_keys=False, allow_agent=False, timeout=5)
    return client


def run_in(lab, host: str, *argv: str) -> subprocess.CompletedProcess:
    return control.exec_in(lab, host, list(argv), capture_output=True, text=True, timeout=30)


def unique_sleep() -> str:
    """A sleep duration no other process has on its command line: a name for ``pgrep -f``."""
    return f"300.{uuid.uuid4().int % 10**12:012d}"


def test_every_host_answers_ansible_ping_through_ansible_runner(lab, tmp_path):
    result = ansible.run_module(lab.layout.inventory, "ping", data_dir=tmp_path)
    assert result.rc == 0
    assert {h: r.status for h, r in result.hosts.items()} == {"lab1": "ok", "lab2": "ok", "lab3": "ok"}
    assert (result.artifacts / "job_events").is_dir()


def test_plain_ansible_with_the_lab_inventory_gets_pong_from_every_host(lab):
    binary = Path(sys.executable).with_name("ansible")
    proc = subprocess.run([str(binary), "-i", str(lab.layout.inventory), "all", "-m", "ping", "-o"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in lab.names():
        assert re.search(rf'^{host} \| SUCCESS => .*"ping": "pong"', proc.stdout, re.M), proc.stdout


def test_a_file_written_over_ssh_stays_on_its_host(lab):
    marker = f"/etc/fleetdns-test-{uuid.uuid4().hex}"
    with ssh(lab, 1) as client, client.open_sftp() as sftp:
        with sftp.open(marker, "w") as f:  # overlay mode: writable anywhere, private to lab1
            f.write("lab1 only\n")
        assert sftp.stat(marker).st_size == 10
    assert run_in(lab, "lab1", "cat", marker).stdout == "lab1 only\n"
    for other in ("lab2", "lab3"):
        assert run_in(lab, other, "test", "-e", marker).returncode == 1
    assert not Path(marker).exists()


def test_each_host_has_its_own_identity_and_private_paths(lab):
    with ssh(lab, 2) as client:
        _, stdout, _ = client.exec_command("hostname; cat /etc/resolv.conf; stat -c %a /var/lib/fleetdns")
        hostname, *rest = stdout.read().decode().splitlines()
    assert hostname == "lab2"
    assert f"nameserver {lab.layout.dns_address}" in rest
    assert rest[-1] == "700"
    # pid 1 is hostinit, exec'd again (--reap) once the host's files are mounted: it maps the host's libc file,
    # the same one as any other process there (the same device and inode in maps)
    assert run_in(lab, "lab2", "cat", "/proc/1/cmdline").stdout.split("\0")[2] == "--reap"
    maps = run_in(lab, "lab2", "sh", "-c", "grep -h 'libc.so.6$' /proc/1/maps /proc/self/maps").stdout
    assert len({tuple(line.split()[3:5]) for line in maps.splitlines()}) == 1, maps


def test_a_process_on_one_host_is_invisible_on_the_others(lab):
    tag = unique_sleep()
    with ssh(lab, 1) as client:
        client.exec_command(f"nohup sleep {tag} >/dev/null 2>&1 &")[1].channel.recv_exit_status()
    time.sleep(0.2)
    found = run_in(lab, "lab1", "pgrep", "-f", tag)
    assert found.returncode == 0 and found.stdout.strip()
    for other in ("lab2", "lab3"):
        assert run_in(lab, other, "pgrep", "-f", tag).returncode == 1
    run_in(lab, "lab1", "pkill", "-f", tag)


def test_a_changed_host_key_is_refused_and_does_not_sink_the_other_hosts(lab, tmp_path):
    lines = lab.layout.known_hosts.read_text().splitlines()
    impostor = lifecycle.new_key()[1]  # a host key lab1 does not have
    lines[0] = f"{lab.layout.address(1)} {impostor}"
    bad = tmp_path / "known_hosts"
    bad.write_text("\n".join(lines) + "\n")

    with pytest.raises(paramiko.BadHostKeyException):
        ssh(lab, 1, known_hosts=bad)

    inventory = tmp_path / "lab.ini"
    inventory.write_text(lab.layout.inventory.read_text().replace(str(lab.layout.known_hosts), str(bad)))
    # No reuse of a master connection that earlier tests opened (and verified) with the right key.
    result = ansible.run_module(inventory, "ping", data_dir=tmp_path / "ansible",
                                env={"ANSIBLE_SSH_ARGS": "-o ControlMaster=no"})
    assert result.hosts["lab1"].status == "unreachable"
    assert "Host key verification failed" in result.hosts["lab1"].message
    assert result.hosts["lab2"].status == "ok" and result.hosts["lab3"].status == "ok"


def test_lab_dns_answers_the_lab_zone_and_never_forwards(lab):
    found = run_in(lab, "lab3", "getent", "ahostsv4", "db.lab")
    assert found.returncode == 0
    assert found.stdout.split()[0] == str(lab.layout.network[230])
    assert run_in(lab, "lab3", "getent", "hosts", "lab1.lab").stdout.split()[0] == lab.layout.address(1)
    assert run_in(lab, "lab3", "getent", "ahosts", "no-such-name.lab").returncode == 2
    assert run_in(lab, "lab3", "getent", "ahosts", "example.com").returncode == 2
    log = (lab.layout.dns_dir / "queries.log").read_text()
    assert f"query[A] db.lab from {lab.layout.address(3)}" in log  # a real lookup on the wire
    assert "config example.com is NXDOMAIN" in log
    assert "forwarded" not in log


def test_each_host_has_a_private_libc_that_a_probe_sees_alone(lab):
    stats = {h: run_in(lab, h, "stat", "-L", "-c", "%d:%i", lab.libc).stdout.strip() for h in lab.names()}
    machine = os.stat(lab.libc)
    assert len(set(stats.values()) | {f"{machine.st_dev}:{machine.st_ino}"}) == 4
    if not shutil.which("bpftrace"):
        pytest.skip("bpftrace is not installed (apt-get install bpftrace)")

    script = f'uprobe:{lab.libc}:getaddrinfo {{ printf("seen %s\\n", str(arg0)); }} interval:s:8 {{ exit(); }}'
    probe = subprocess.Popen(control.nsenter_argv(lab, 1, ["bpftrace", "-e", script]), env=lab.host_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert probe.stdout.readline().startswith("Attaching")
    time.sleep(0.5)
    run_in(lab, "lab1", "getent", "ahosts", "api.lab")
    run_in(lab, "lab2", "getent", "ahosts", "cache.lab")
    subprocess.run(["getent", "ahosts", "localhost"], capture_output=True)  # the machine's own libc
    seen = probe.communicate(timeout=30)[0]
    assert "seen api.lab" in seen
    assert "cache.lab" not in seen and "localhost" not in seen


def test_fault_switches_leave_the_hosts_processes_running(lab):
    tag = unique_sleep()
    run_in(lab, "lab3", "sh", "-c", f"nohup sleep {tag} >/dev/null 2>&1 &")
    address = lab.layout.address(3)

    assert fleetdns("lab", "net", "lab3", "down", home=lab.layout.home).returncode == 0
    assert not lifecycle.ssh_banner(address, timeout=1)
    assert run_in(lab, "lab3", "pgrep", "-f", tag).returncode == 0  # exec works with the network down
    assert fleetdns("lab", "net", "lab3", "up", home=lab.layout.home).returncode == 0
    assert lifecycle.ssh_banner(address, timeout=3)

    assert fleetdns("lab", "sshd", "lab3", "stop", home=lab.layout.home).returncode == 0
    assert not lifecycle.ssh_banner(address)
    status = fleetdns("lab", "status", home=lab.layout.home)
    assert status.returncode == 0 and "stopped" in status.stdout
    assert run_in(lab, "lab3", "pgrep", "-f", tag).returncode == 0
    assert fleetdns("lab", "sshd", "lab3", "start", home=lab.layout.home).returncode == 0
    assert lifecycle.ssh_banner(address)
    run_in(lab, "lab3", "pkill", "-f", tag)


def test_lab_exec_passes_the_exit_status_and_refuses_unknown_hosts(lab):
    assert fleetdns("lab", "exec", "lab2", "--", "sh", "-c", "exit 7", home=lab.layout.home).returncode == 7
    proc = fleetdns("lab", "exec", "lab9", "--", "true", home=lab.layout.home)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert proc.stderr.strip() == "fleetdns: error: unknown lab host 'lab9' (this lab has lab1…lab3)"


def machine_state(tag: str) -> dict:
    """What a lab could leave behind on the machine, restricted to objects carrying *tag*."""
    links = [link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True).stdout)]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return {
        "links": sorted(n for n in links if n.startswith(tag)),
        "netns": sorted(n for n in namespaces if n.startswith(tag)),
        "cgroups": sorted(p.name for p in lifecycle.cgroup2_root().glob(f"fleetdns-lab-{tag}*")),
        "mounts": [line for line in Path("/proc/self/mounts").read_text().splitlines() if tag in line],
    }


def test_a_second_lab_coexists_is_idempotent_and_leaves_nothing_behind(lab, tmp_path):
    home = tmp_path / "second"
    home.mkdir()
    tag = lifecycle.tag_for(home)
    assert tag != lab.layout.tag
    assert machine_state(tag) == {"links": [], "netns": [], "cgroups": [], "mounts": []}

    up = fleetdns("lab", "up", "--hosts", "2", "--mode", "bind", home=home)
    assert up.returncode == 0, up.stderr
    second = lifecycle.load(home)
    assert second.layout.network != lab.layout.network
    assert machine_state(tag)["netns"] == [f"{tag}-dns", f"{tag}-lab1", f"{tag}-lab2"]
    again = fleetdns("lab", "up", "--hosts", "2", "--mode", "bind", home=home)
    assert again.returncode == 0 and "already up" in again.stderr
    assert lifecycle.load(home).pid1(1) == second.pid1(1)
    with ssh(second, 2) as client:
        assert client.exec_command("hostname")[1].read() == b"lab2\n"
    run_in(second, "lab1", "sh", "-c", "nohup sleep 300 >/dev/null 2>&1 &")
    pids = [second.pid1(1), second.pid1(2)]

    down = fleetdns("lab", "down", home=home)
    assert down.returncode == 0, down.stderr
    assert machine_state(tag) == {"links": [], "netns": [], "cgroups": [], "mounts": []}
    assert not (home / ".lab").exists() and not (home / "inventory" / "lab.ini").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert lab.pid1(1)  # the session's lab is untouched
    assert fleetdns("lab", "down", home=home).stderr.strip() == "no lab was up"


def test_lab_up_refuses_with_ip_forwarding_on(tmp_path):
    # In a network namespace of its own, so the machine's forwarding setting is never touched.
    script = "sysctl -qw net.ipv4.ip_forward=1 && exec \"$0\" -m fleet lab up"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable],
                          env={**os.environ, "FLEETDNS_HOME": str(tmp_path)}, capture_output=True, text=True)
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stderr
    assert "net.ipv4.ip_forward=1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".lab").exists()
