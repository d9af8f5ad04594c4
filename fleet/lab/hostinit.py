"""PID 1 of one lab host: build the host's filesystem view, start its sshd, then reap children forever.

Started by the lab supervisor as
``nsenter --net=/run/netns/NS -- unshare --mount --uts --pid --fork --propagation private -- python3 hostinit.py CFG``
so it runs inside the host's own network, mount, UTS and pid namespaces. It is a minimal init on purpose: sshd is
only its child, so stopping sshd or cutting the network leaves the host's other processes (a running probe) alive,
as on a real machine. Orphans of the host (daemons started by ``lab exec`` or over SSH) are reparented to it and
reaped here. Once sshd runs, it execs itself again (``--reap``) so that it maps the host's libc.

It uses the standard library only and runs under the system ``/usr/bin/python3``: after ``chroot`` the host has
its own ``/root``, so an interpreter living there (pyenv) would lose its lazily imported modules.

``CFG`` is JSON (written by :mod:`fleet.lab.fleet`)::

    {"name": "lab1", "root": "/…/cow/lab1/root" | "/",
     "overlay": {"upper": …, "work": …} | null,
     "binds": [[source, target-inside-host, "file"|"dir"], …],
     "cgroup2_mount": "/sys/fs/cgroup/unified", "pid_file": "/…/hosts/lab1/pid1",
     "sshd": "/usr/sbin/sshd", "env": {"PATH": …}}
"""

import json
import os
import signal
import socket
import subprocess
import sys


def mount(*args):
    subprocess.run(["mount", *args], check=True)


def ensure(path, kind):
    """Create a mount point: a directory, or an empty file for a file bind."""
    if kind == "dir":
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()


def build_root(cfg):
    root = cfg["root"]
    if cfg["overlay"]:
        # Copy-on-write over the machine's root: writes land in this host's upper dir only.
        ov = cfg["overlay"]
        mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={ov['upper']},workdir={ov['work']}", root)
        # Overlay shows only the root filesystem; /dev is a filesystem of its own.
        mount("--rbind", "/dev", root + "/dev")
    mount("-t", "proc", "proc", root + "/proc")  # this pid namespace's processes only
    mount("-t", "sysfs", "sysfs", root + "/sys")  # this network namespace's interfaces
    cg = root + cfg["cgroup2_mount"]
    if cfg["cgroup2_mount"] != "/sys/fs/cgroup":  # hybrid layout: cgroup2 sits below a tmpfs
        mount("-t", "tmpfs", "-o", "mode=755", "cgroup", root + "/sys/fs/cgroup")
        os.makedirs(cg, exist_ok=True)
    mount("-t", "cgroup2", "cgroup2", cg)
    # Probes need both; ip netns exec / unshare start with a fresh /sys that has neither.
    mount("-t", "debugfs", "debugfs", root + "/sys/kernel/debug")
    mount("-t", "tracefs", "tracefs", root + "/sys/kernel/tracing")
    # Binds before the tmpfs mounts: a lab whose state lives under /tmp must still reach its sources.
    for source, target, kind in cfg["binds"]:
        ensure(root + target, kind)
        mount("--bind", source, root + target)
    mount("-t", "tmpfs", "-o", "mode=755", "run", root + "/run")
    mount("-t", "tmpfs", "-o", "mode=1777", "tmp", root + "/tmp")
    os.chroot(root)
    os.chdir("/")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory


def reap_forever():
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so pause() wakes on a child's exit
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            signal.pause()
        except InterruptedError:
            continue


def main():
    if sys.argv[1] == "--reap":
        reap_forever()
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    # kept open across the chroot, to exec this file again from inside the host (the path may be hidden there)
    me = os.open(__file__, os.O_RDONLY)
    # /proc is still the machine's here, so /proc/self names this process as the machine sees it.
    with open(cfg["pid_file"] + ".tmp", "w") as f:
        f.write(os.readlink("/proc/self"))
    os.rename(cfg["pid_file"] + ".tmp", cfg["pid_file"])
    socket.sethostname(cfg["name"])
    build_root(cfg)
    os.environ.clear()
    os.environ.update(cfg["env"])
    subprocess.run([cfg["sshd"]], check=False)  # daemonises; the daemon is reparented to us
    print(f"{cfg['name']}: up", flush=True)
    # pid 1 started on the machine's libc; exec'd again it maps the host's own (bind-mounted) copy, like every
    # other process of the host, so the host's probe and its scan see no stranger in its init
    os.set_inheritable(me, True)
    os.execv(sys.executable, [sys.executable, f"/proc/self/fd/{me}", "--reap"])


if __name__ == "__main__":
    main()
