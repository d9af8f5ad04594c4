"""``lab up`` and ``lab down``: build a fleet of real SSH hosts on this machine, and remove every trace of it.

A host is a set of namespaces (network, mount, UTS, pid) whose PID 1 is :mod:`fleet.lab.hostinit`, joined to the
other hosts by a private bridge, with its own sshd and host key, its own ``/etc/hosts``, ``/etc/resolv.conf``,
``/etc/ssh``, ``/root``, ``/var/lib/fleetdns`` and a private copy of libc (uprobes attach to one libc *file*, so a
probe started inside a host sees only that host's processes). In ``overlay`` mode (the default) the host's root is
a copy-on-write overlay of ``/``; in ``bind`` mode it is the machine's own root with only those paths private.
A lab DNS server (dnsmasq in a namespace of its own) answers the ``.lab`` zone and NXDOMAIN for everything else; it
never forwards. Layout and names: :mod:`fleet.lab.layout`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.errors import EnvironmentProblem, InputError, LabError, UsageError
from fleet.home import home as lab_home
from fleet.lab import accommodations
from fleet.lab.layout import (
    MAX_HOSTS,
    MODES,
    SERVICE_NAMES,
    Layout,
    host_name,
    preferred_octet,
    tag_for,
)
from fleet.tools import require, require_root, run

SYSTEM_PYTHON = "/usr/bin/python3"  # runs hostinit inside hosts, and Ansible's modules there
READY_TIMEOUT = 30.0


@dataclass
class Lab:
    """A lab that ``up`` built, as recorded in ``.lab/lab.json``."""

    layout: Layout
    hosts: int
    mode: str
    cgroup2_root: Path
    libc: str
    shim: str | None

    @property
    def cgroup(self) -> Path:
        return self.layout.cgroup(self.cgroup2_root)

    def host_cgroup(self, index: int) -> Path:
        return self.cgroup / host_name(index)

    def names(self) -> list[str]:
        return [host_name(i) for i in range(1, self.hosts + 1)]

    def index(self, name: str) -> int:
        """The index of host *name*; :class:`InputError` for a host this lab does not have."""
        if name not in self.names():
            raise InputError(f"unknown lab host '{name}'", hint=f"this lab has lab1…lab{self.hosts}")
        return int(name[3:])

    def pid1(self, index: int) -> int:
        """The machine's pid of host *index*'s init; :class:`LabError` when the host is not running."""
        try:
            pid = int((self.layout.host_dir(index) / "pid1").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError) as exc:
            raise LabError(f"{host_name(index)} is not running", hint="fleetdns lab up") from exc
        return pid

    def host_env(self) -> dict[str, str]:
        """The environment of a host's init, and so of its sshd and of ``lab exec``."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8"}
        if self.shim:
            env["LD_PRELOAD"] = self.shim
        return env

    def save(self) -> None:
        data = {
            "subnet_octet": self.layout.subnet_octet,
            "hosts": self.hosts,
            "mode": self.mode,
            "cgroup2_root": str(self.cgroup2_root),
            "libc": self.libc,
            "shim": self.shim,
        }
        tmp = self.layout.description.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(self.layout.description)


def load(home: Path | None = None) -> Lab:
    """The lab recorded under *home*; :class:`LabError` when there is none."""
    home = home or lab_home()
    path = home / ".lab" / "lab.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab is up in {home}", hint="fleetdns lab up") from None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {path}: {exc}", hint="fleetdns lab down") from exc
    try:
        return Lab(
            layout=Layout(home, int(data["subnet_octet"])),
            hosts=int(data["hosts"]),
            mode=data["mode"],
            cgroup2_root=Path(data["cgroup2_root"]),
            libc=data["libc"],
            shim=data["shim"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LabError(f"{path} is damaged ({type(exc).__name__}: {exc})", hint="fleetdns lab down") from exc


# ---- checks ---------------------------------------------------------------------------------------------------


def check_request(hosts: int, mode: str) -> None:
    if not 1 <= hosts <= MAX_HOSTS:
        raise UsageError(f"--hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")


def check_machine() -> None:
    require_root("fleetdns lab")
    for program in ("ip", "nsenter", "unshare", "mount", "umount", "sshd", "dnsmasq"):
        require(program)
    if not Path(SYSTEM_PYTHON).exists():
        raise EnvironmentProblem(f"{SYSTEM_PYTHON} not found", hint="apt-get install python3")
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
        raise EnvironmentProblem(
            "net.ipv4.ip_forward=1: lab traffic could be routed off this machine",
            hint="sysctl -w net.ipv4.ip_forward=0",
        )


def cgroup2_root() -> Path:
    """Where this machine mounts cgroup v2: ``/sys/fs/cgroup`` (pure v2) or ``/sys/fs/cgroup/unified`` (hybrid)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    raise EnvironmentProblem("no cgroup v2 hierarchy is mounted", hint="mount -t cgroup2 none /sys/fs/cgroup")


def machine_libc() -> str:
    """The libc file this machine's processes map (ours included): the file each host gets a private copy of."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if "/libc.so" in path or "/libc-" in path:
            return os.path.realpath(path)
    raise EnvironmentProblem("cannot find the libc this process maps in /proc/self/maps")


def free_octet(home: Path) -> int:
    """A 10.213.X.0/24 that overlaps no address or route of this machine."""
    used = []
    for what in ("route", "addr"):
        for entry in json.loads(run(["ip", "-j", what]).stdout or b"[]"):
            prefix = entry.get("dst") if what == "route" else None
            for info in entry.get("addr_info", []):
                if info.get("family") == "inet":
                    used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
            if prefix and prefix != "default" and ":" not in prefix:
                used.append(ipaddress.IPv4Network(prefix, strict=False))
    first = preferred_octet(home)
    for step in range(250):
        octet = (first - 1 + step) % 250 + 1
        net = ipaddress.IPv4Network(f"10.213.{octet}.0/24")
        if not any(net.overlaps(u) for u in used):
            return octet
    raise EnvironmentProblem("no free /24 left in 10.213.0.0/16 for a lab network")


# ---- files ----------------------------------------------------------------------------------------------------


def new_key() -> tuple[bytes, str]:
    """A fresh Ed25519 key: (OpenSSH private key bytes, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def sshd_config(shim: str | None) -> str:
    lines = [
        "# fleetdns lab host: key-only root login",
        "Port 22",
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "PidFile /run/sshd.pid",
        "MaxStartups 200:30:400",
        "MaxSessions 100",
        "Subsystem sftp internal-sftp",
    ]
    if shim:
        lines.append(f"SetEnv LD_PRELOAD={shim}")
    return "\n".join(lines) + "\n"


def service_records(layout: Layout) -> list[tuple[str, str]]:
    """(address, name) lines of the lab zone: one per host, plus the service names, each with A and AAAA."""
    records = [(layout.dns_address, "dns.lab")]
    for i, name in enumerate(SERVICE_NAMES):
        records.append((str(layout.network[230 + i]), name))
        records.append((f"fd00:213:{layout.subnet_octet}::{230 + i}", name))
    return records


def write_dns(layout: Layout, hosts: int) -> None:
    lines = [f"{layout.address(i)} {host_name(i)}.lab" for i in range(1, hosts + 1)]
    lines += [f"{address} {name}" for address, name in service_records(layout)]
    write_private(layout.dns_dir / "hosts", "\n".join(lines) + "\n", 0o644)


def write_host(lab: Lab, index: int, client_public: str) -> tuple[str, dict]:
    """Write host *index*'s private files; return (its known_hosts line, its hostinit config)."""
    layout, name = lab.layout, host_name(index)
    hdir = layout.host_dir(index)
    if hdir.exists():
        shutil.rmtree(hdir)
    etc_ssh = hdir / "etc-ssh"
    shutil.copytree("/etc/ssh", etc_ssh, ignore=shutil.ignore_patterns("ssh_host_*", "sshd_config*"))
    private, public = new_key()
    write_private(etc_ssh / "ssh_host_ed25519_key", private)
    write_private(etc_ssh / "ssh_host_ed25519_key.pub", public + "\n", 0o644)
    write_private(etc_ssh / "sshd_config", sshd_config(lab.shim), 0o644)
    (hdir / "root").mkdir(mode=0o700)
    write_private(hdir / "root" / ".ssh" / "authorized_keys", client_public + "\n")
    os.chmod(hdir / "root" / ".ssh", 0o700)
    (hdir / "var-lib-fleetdns").mkdir(mode=0o700)
    write_private(
        hdir / "hosts",
        f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{layout.address(index)} {name}.lab {name}\n",
        0o644,
    )
    write_private(
        hdir / "resolv.conf", f"nameserver {layout.dns_address}\nsearch lab\noptions timeout:1 attempts:2\n", 0o644
    )
    write_private(hdir / "hostname", name + "\n", 0o644)
    shutil.copy2(lab.libc, hdir / "libc.so.6")  # a file of its own: a uprobe on it sees this host only
    binds = [
        [str(etc_ssh), "/etc/ssh", "dir"],
        [str(hdir / "root"), "/root", "dir"],
        [str(hdir / "var-lib-fleetdns"), "/var/lib/fleetdns", "dir"],
        [str(hdir / "hosts"), "/etc/hosts", "file"],
        [str(hdir / "resolv.conf"), "/etc/resolv.conf", "file"],
        [str(hdir / "hostname"), "/etc/hostname", "file"],
        [str(hdir / "libc.so.6"), lab.libc, "file"],
    ]
    overlay = None
    root = "/"
    if lab.mode == "overlay":
        cow = layout.cow / name
        for sub in ("upper", "work", "root"):
            (cow / sub).mkdir(parents=True)
        overlay = {"upper": str(cow / "upper"), "work": str(cow / "work")}
        root = str(cow / "root")
    config = {
        "name": name,
        "root": root,
        "overlay": overlay,
        "binds": binds,
        "cgroup2_mount": str(lab.cgroup2_root),
        "pid_file": str(hdir / "pid1"),
        "sshd": require("sshd"),
        "env": lab.host_env(),
    }
    write_private(hdir / "init.json", json.dumps(config, indent=2))
    return f"{layout.address(index)} {public}", config


def write_inventory(lab: Lab) -> None:
    layout = lab.layout
    args = f"-o UserKnownHostsFile={layout.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
    lines = ["# written by `fleetdns lab up`; removed by `fleetdns lab down`", "[lab]"]
    lines += [f"{host_name(i)} ansible_host={layout.address(i)}" for i in range(1, lab.hosts + 1)]
    lines += [
        "",
        "[lab:vars]",
        "ansible_user=root",
        f"ansible_ssh_private_key_file={layout.client_key}",
        f"ansible_ssh_common_args='{args}'",
        f"ansible_python_interpreter={SYSTEM_PYTHON}",
        "",
    ]
    write_private(layout.inventory, "\n".join(lines), 0o600)


# ---- network --------------------------------------------------------------------------------------------------


def ip_batch(commands: list[str], netns: str | None = None, force: bool = False) -> None:
    if not commands:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    run(argv, input=("\n".join(commands) + "\n").encode(), check=not force)


def build_network(layout: Layout, hosts: int) -> None:
    prefix = layout.network.prefixlen
    outer = [
        f"link add {layout.bridge} type bridge",
        f"addr add {layout.bridge_address}/{prefix} dev {layout.bridge}",
        f"link set {layout.bridge} up",
    ]
    members = [(layout.dns_netns, layout.dns_veth, layout.dns_address)]
    members += [(layout.netns(i), layout.veth(i), layout.address(i)) for i in range(1, hosts + 1)]
    for netns, veth, _ in members:
        outer += [
            f"netns add {netns}",
            f"link add {veth} type veth peer name eth0 netns {netns}",
            f"link set {veth} master {layout.bridge} up",
        ]
    ip_batch(outer)
    for netns, _, address in members:
        # No default route: the /24 is all a host can reach.
        ip_batch([f"addr add {address}/{prefix} dev eth0", "link set eth0 up", "link set lo up"], netns)


def remove_network(tag: str) -> bool:
    """Delete every link and network namespace carrying *tag* (veths first: netns deletion is asynchronous).

    Returns whether there was any."""
    links = [link["ifname"] for link in json.loads(run(["ip", "-j", "link"]).stdout or b"[]")]
    links = [name for name in links if name.startswith(tag)]
    namespaces = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.decode().splitlines() if line]
    namespaces = [name for name in namespaces if name.startswith(tag + "-")]
    ip_batch([f"link del {name}" for name in links], force=True)
    ip_batch([f"netns del {name}" for name in namespaces], force=True)
    return bool(links or namespaces)


# ---- cgroups --------------------------------------------------------------------------------------------------


def kill_cgroups(cgroups: list[Path], timeout: float = 10.0) -> None:
    """Kill every process in *cgroups* (and below) and wait until all of them are empty."""
    cgroups = [c for c in cgroups if c.exists()]
    for cgroup in cgroups:
        (cgroup / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + timeout
    for cgroup in cgroups:
        # cgroup.procs of a populated tree can look empty; cgroup.events says when the whole subtree is.
        while "populated 1" in (cgroup / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise LabError(f"processes in {cgroup} did not end within {timeout:.0f}s")
            time.sleep(0.02)


def wait_reaped(pid: int, timeout: float = 5.0) -> None:
    """Wait until process *pid* has reaped all its children (dead ones linger as zombies until it does)."""
    deadline = time.monotonic() + timeout
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        try:
            if not children.read_text().strip():
                return
        except OSError:  # it has ended itself
            return
        time.sleep(0.02)


def remove_cgroups(top: Path) -> None:
    """Stop the lab's processes and remove its cgroups: hosts and DNS server first, while the supervisor still
    reaps them, then the supervisor itself (whose own exit the machine's init reaps)."""
    if not top.exists():
        return
    supervisor = top / "supervisor"
    pids = supervisor.joinpath("cgroup.procs").read_text().split() if supervisor.exists() else []
    kill_cgroups([child for child in top.iterdir() if child.is_dir() and child != supervisor])
    for pid in pids:
        wait_reaped(int(pid))
    kill_cgroups([top])
    for child in top.iterdir():
        if child.is_dir():
            child.rmdir()
    top.rmdir()


# ---- up / down ------------------------------------------------------------------------------------------------


def is_healthy(lab: Lab) -> bool:
    try:
        for i in range(1, lab.hosts + 1):
            lab.pid1(i)
    except LabError:
        return False
    return True


def up(hosts: int = 3, mode: str = "overlay", home: Path | None = None) -> tuple[Lab, bool]:
    """Bring a lab of *hosts* hosts up; returns (lab, True) or (lab, False) when an identical one was already up.

    Cleans stale leftovers of a previous lab at the same *home* first. Raises :class:`LabError` when hosts do not
    come up within :data:`READY_TIMEOUT`; the lab is then left as it is, for ``lab status`` and ``lab down``.
    """
    check_request(hosts, mode)
    check_machine()
    home = home or lab_home()
    try:
        current = load(home)
    except LabError:
        current = None
    if current and current.hosts == hosts and current.mode == mode and is_healthy(current):
        return current, False
    down(home)

    layout = Layout(home, free_octet(home))
    layout.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(layout.state, 0o700)
    shim = accommodations.memlock_shim()
    accommodations.kernel_build_stub()
    lab = Lab(layout, hosts, mode, cgroup2_root(), machine_libc(), str(shim) if shim else None)
    lab.save()

    private, public = new_key()
    write_private(layout.client_key, private)
    write_private(layout.client_key.with_suffix(".pub"), public + "\n", 0o644)
    write_dns(layout, hosts)
    if mode == "overlay":
        layout.cow.mkdir(exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=700", "fleetdns-lab-cow", str(layout.cow)])
    known, plan = [], []
    lab.cgroup.mkdir(exist_ok=True)
    for i in range(1, hosts + 1):
        line, _ = write_host(lab, i, public)
        known.append(line)
        lab.host_cgroup(i).mkdir()
        plan.append(
            {
                "name": host_name(i),
                "argv": [
                    require("nsenter"), f"--net=/run/netns/{layout.netns(i)}", "--",
                    require("unshare"), "--mount", "--uts", "--pid", "--fork", "--propagation", "private", "--",
                    SYSTEM_PYTHON, str(Path(__file__).with_name("hostinit.py")), str(layout.host_dir(i) / "init.json"),
                ],
                "cgroup": str(lab.host_cgroup(i)),
                "log": str(layout.host_dir(i) / "init.log"),
            }
        )
    write_private(layout.known_hosts, "\n".join(known) + "\n", 0o644)
    (lab.cgroup / "dns").mkdir()
    plan.append(
        {
            "name": "dns",
            "argv": [
                require("nsenter"), f"--net=/run/netns/{layout.dns_netns}", "--",
                require("dnsmasq"), "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                "--bind-interfaces", f"--listen-address={layout.dns_address}", "--local=/#/",
                f"--addn-hosts={layout.dns_dir / 'hosts'}", "--user=root", "--cache-size=0",
                "--log-queries", f"--log-facility={layout.dns_dir / 'queries.log'}",
                f"--pid-file={layout.dns_dir / 'dnsmasq.pid'}",
            ],
            "cgroup": str(lab.cgroup / "dns"),
            "log": str(layout.dns_dir / "dnsmasq.log"),
        }
    )
    build_network(layout, hosts)
    (lab.cgroup / "supervisor").mkdir()
    write_private(layout.state / "plan.json", json.dumps(plan, indent=2))
    with open(layout.state / "supervisor.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "fleet.lab.supervisor", str(layout.state / "plan.json")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=lambda: (lab.cgroup / "supervisor" / "cgroup.procs").write_text(str(os.getpid())),
        )
    wait_ready(lab)
    write_inventory(lab)
    return lab, True


def ssh_banner(address: str, timeout: float = 0.5) -> bool:
    """True when an SSH server answers on *address*:22 with its banner."""
    try:
        with socket.create_connection((address, 22), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(lab: Lab) -> None:
    pending = set(range(1, lab.hosts + 1))
    deadline = time.monotonic() + READY_TIMEOUT + 0.2 * lab.hosts
    while pending and time.monotonic() < deadline:
        pending = {i for i in pending if not ssh_banner(lab.layout.address(i))}
        if pending:
            time.sleep(0.05)
    if pending:
        names = ", ".join(host_name(i) for i in sorted(pending))
        raise LabError(
            f"hosts not answering SSH after {READY_TIMEOUT:.0f}s: {names}",
            hint=f"see {lab.layout.state}/hosts/<host>/init.log, then fleetdns lab down",
        )


def down(home: Path | None = None) -> bool:
    """Remove the lab at *home* and any stale leftovers with its tag; True when there was something to remove."""
    require_root("fleetdns lab")
    home = home or lab_home()
    layout = Layout(home, 0)  # the octet does not matter for removal: names and paths carry the tag
    found = False
    cgroup = layout.cgroup(cgroup2_root())
    if cgroup.exists():
        remove_cgroups(cgroup)  # hosts, DNS server, supervisor, and anything `lab exec` started
        found = True
    if layout.cow.is_mount():
        run(["umount", "--lazy", str(layout.cow)])
        found = True
    found = remove_network(tag_for(home)) or found
    if layout.state.exists():
        shutil.rmtree(layout.state)
        found = True
    layout.inventory.unlink(missing_ok=True)
    return found
