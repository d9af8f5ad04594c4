"""Finding the external programs fleetdns runs, and running them with argument lists (never a shell)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from fleet.errors import EnvironmentProblem, MissingProgram, NotRoot

#: program → the Debian package that provides it, for the "apt-get install …" hint
PACKAGES = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "dnsmasq": "dnsmasq-base",
    "pkill": "procps",
    "bpftrace": "bpftrace",
    "stap": "systemtap",
    "cc": "gcc",
}


def require(program: str) -> str:
    """Absolute path of *program* on PATH, or :class:`MissingProgram`."""
    found = shutil.which(program)
    if not found:
        raise MissingProgram(program, PACKAGES.get(program, program))
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(what)


def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run *argv* (an argument list; argv[0] resolved with :func:`require`), capturing output.

    A non-zero exit with ``check`` raises :class:`EnvironmentProblem` carrying the program's own first stderr line.
    """
    argv = [require(argv[0]), *argv[1:]]
    proc = subprocess.run(argv, input=input, capture_output=True, check=False)
    if check and proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[0] if detail else f"exit status {proc.returncode}"
        raise EnvironmentProblem(f"{os.path.basename(argv[0])} {' '.join(argv[1:4])}…: {reason}")
    return proc
