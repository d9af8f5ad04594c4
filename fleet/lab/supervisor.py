"""The lab supervisor: a detached, long-lived parent for the lab's DNS server and hosts.

``lab up`` starts it in a session of its own and returns; it outlives that command. It marks itself a child
subreaper, starts each process of the plan inside its cgroup, and reaps whatever ends below it — without it, the
hosts' launchers would be reparented to the machine's PID 1, which reaps slowly and leaves zombies. ``lab down``
ends it (SIGTERM) after killing the hosts through their cgroups.

Usage: ``python -m fleet.lab.supervisor PLAN.json`` where PLAN is
``[{"name": "lab1", "argv": [...], "cgroup": "/sys/fs/cgroup/unified/…/lab1", "log": "/…/init.log"}, …]``.
Standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys

from fleet.lab.hostinit import reap_forever

PR_SET_CHILD_SUBREAPER = 36


def join_cgroup(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def start(entry: dict) -> subprocess.Popen:
    log = open(entry["log"], "ab")
    try:
        return subprocess.Popen(
            entry["argv"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=lambda: join_cgroup(entry["cgroup"]),
        )
    finally:
        log.close()


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for entry in plan:
        start(entry)
    reap_forever()


if __name__ == "__main__":
    main()
