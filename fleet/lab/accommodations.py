"""What this sandboxed kernel needs before probes can run on lab hosts — made by ``lab up``, never by the product.

The machine has no kprobes, no loadable modules and no kernel headers; stap 4.8 runs only with ``--runtime=bpf``,
which still wants a kernel build tree, a ``System.map`` for return probes, and a raise of RLIMIT_MEMLOCK that this
sandbox refuses. On real RHEL/Arch/Debian hosts the deploy playbooks install kernel-devel / linux-headers instead.

- :func:`kernel_build_stub` — ``/lib/modules/$(uname -r)/build`` with ``.config`` (from ``/proc/config.gz``), an
  empty ``Module.symvers``, ``System.map`` (from ``/proc/kallsyms``) and an empty ``include/linux/kconfig.h``
  (once the stub exists, bpftrace looks there for kernel headers and its pointer casts fail without that file;
  types still come from BTF). It lies on the machine's root filesystem, outside every host-private path, so all
  hosts see it; it is shared by every lab and left in place by ``lab down`` (a marker file says who made it).
- :func:`memlock_shim` — an LD_PRELOAD library (``memlock_shim.c``) that lab hosts load through their sshd's
  ``SetEnv`` and ``lab exec``'s environment.
"""

from __future__ import annotations

import gzip
import os
import platform
from importlib import resources
from pathlib import Path

from fleet.errors import MissingProgram
from fleet.tools import require, run

ACCOMMODATIONS = Path("/usr/local/lib/fleetdns-lab")
MARKER = ".made-by-fleetdns-lab"


def kernel_build_stub() -> Path:
    """Create the stub build tree if it is missing; return its path."""
    build = Path("/lib/modules") / platform.release() / "build"
    if (build / MARKER).exists() or (build / "Makefile").exists():  # ours, or real headers
        return build
    (build / "include" / "linux").mkdir(parents=True, exist_ok=True)
    (build / "include" / "linux" / "kconfig.h").touch()
    (build / "Module.symvers").touch()
    config = Path("/proc/config.gz")
    if config.exists():
        (build / ".config").write_bytes(gzip.decompress(config.read_bytes()))
    # System.map has kallsyms' first three columns; drop the [module] column.
    with open("/proc/kallsyms") as src, open(build / "System.map", "w") as dst:
        os.fchmod(dst.fileno(), 0o600)
        for line in src:
            dst.write(" ".join(line.split()[:3]) + "\n")
    (build / MARKER).touch()
    return build


def memlock_shim() -> Path | None:
    """Build the memlock shim once; None when no C compiler is available (stap's bpf runtime then won't start)."""
    target = ACCOMMODATIONS / "libmemlock_shim.so"
    source = resources.files("fleet.lab").joinpath("memlock_shim.c")
    if target.exists() and target.stat().st_mtime >= os.stat(str(source)).st_mtime:
        return target
    try:
        cc = require("cc")
    except MissingProgram:
        return None
    ACCOMMODATIONS.mkdir(parents=True, exist_ok=True)
    run([cc, "-shared", "-fPIC", "-O2", "-o", str(target), str(source), "-ldl"])
    return target
