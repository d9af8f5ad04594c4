"""Acting on the hosts of a running lab: status, ``exec`` inside a host, and the fault switches for tests.

``lab exec`` enters the host's namespaces and root through its init (``nsenter --target PID1``) and joins the host's
cgroup, so the command runs the way an application on that host would — and keeps working while the host's network
or sshd is down. ``lab net HOST down`` pulls the host's cable (the bridge side of its veth goes down: packets are
dropped, connections time out); ``lab sshd HOST stop`` stops only the listening sshd, as ``systemctl stop ssh``
does, leaving the host's other processes and open sessions alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import LabError, UsageError
from fleet.lab.layout import host_name
from fleet.lab.lifecycle import Lab, ssh_banner
from fleet.tools import require, run


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    init_pid: int | None  #: the machine's pid of the host's PID 1, None when the host is not running
    network: str  #: "up" | "down"
    sshd: str  #: "listening" | "stopped" | "unknown"
    ssh_answers: bool  #: an SSH banner came back from this machine


def status(lab: Lab) -> list[HostStatus]:
    rows = []
    for i in range(1, lab.hosts + 1):
        try:
            pid1 = lab.pid1(i)
        except LabError:
            pid1 = None
        operstate = Path(f"/sys/class/net/{lab.layout.veth(i)}/operstate")
        network = "up" if operstate.exists() and operstate.read_text().strip() != "down" else "down"
        sshd = "unknown" if pid1 is None else ("listening" if sshd_pid(lab, i) else "stopped")
        rows.append(HostStatus(host_name(i), lab.layout.address(i), pid1, network, sshd,
                               pid1 is not None and ssh_banner(lab.layout.address(i))))
    return rows


def nsenter_argv(lab: Lab, index: int, argv: Sequence[str]) -> list[str]:
    return [require("nsenter"), "--target", str(lab.pid1(index)), "--mount", "--uts", "--net", "--pid",
            "--root", "--wd", "--", *argv]


def exec_in(lab: Lab, name: str, argv: Sequence[str], **popen) -> subprocess.CompletedProcess:
    """Run *argv* as a process inside host *name* (stdio inherited unless given in *popen*); returns when it ends."""
    if not argv:
        raise UsageError("lab exec needs a command", hint="fleetdns lab exec lab1 -- getent hosts db.lab")
    index = lab.index(name)
    cgroup = lab.host_cgroup(index) / "cgroup.procs"
    return subprocess.run(
        nsenter_argv(lab, index, argv),
        env={**lab.host_env(), "TERM": os.environ.get("TERM", "dumb")},
        preexec_fn=lambda: cgroup.write_text(str(os.getpid())),
        check=False,
        **popen,
    )


def host_pids(lab: Lab, index: int) -> dict[int, int]:
    """{pid inside the host: pid on the machine} for every process of host *index*."""
    pids = {}
    for pid in (lab.host_cgroup(index) / "cgroup.procs").read_text().split():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended meanwhile
            continue
        nspid = next(line.split()[1:] for line in text.splitlines() if line.startswith("NSpid:"))
        if len(nspid) >= 2:
            pids[int(nspid[-1])] = int(pid)
    return pids


def sshd_pid(lab: Lab, index: int) -> int | None:
    """The machine's pid of host *index*'s listening sshd, from its own pid file; None when it is not running."""
    root = Path(f"/proc/{lab.pid1(index)}/root")
    try:
        inner = int((root / "run/sshd.pid").read_text())
    except (OSError, ValueError):
        return None
    outer = host_pids(lab, index).get(inner)
    if outer is None or Path(f"/proc/{outer}/comm").read_text().strip() != "sshd":
        return None
    return outer


def set_sshd(lab: Lab, name: str, running: bool) -> None:
    index = lab.index(name)
    pid = sshd_pid(lab, index)
    if running and pid is None:
        proc = exec_in(lab, name, ["/usr/sbin/sshd"], capture_output=True)
        if proc.returncode != 0:
            raise LabError(f"{name}: sshd did not start: {proc.stderr.decode(errors='replace').strip()}")
    elif not running and pid is not None:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (sshd_pid(lab, index) is not None) != running:
        if time.monotonic() > deadline:
            raise LabError(f"{name}: sshd did not {'start' if running else 'stop'} within 5s")
        time.sleep(0.02)


def set_network(lab: Lab, name: str, up: bool) -> None:
    index = lab.index(name)
    run(["ip", "link", "set", "dev", lab.layout.veth(index), "up" if up else "down"])
