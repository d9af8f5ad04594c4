"""Shared fixtures: the lab fleet every lab test runs against, and a way to run the real ``fleetdns`` command.

Lab tests need root (namespaces, mounts, cgroups); without it they are skipped with that reason. One lab of three
overlay hosts serves the whole session; it lives under its own FLEETDNS_HOME in pytest's temp dir, so a developer's
own lab (in the checkout) is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root: namespaces, mounts and cgroups")


def fleetdns(*args: str, home: Path | None = None, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real ``fleetdns`` CLI (``python -m fleet``) and capture its output as text."""
    environ = {**os.environ, **(env or {})}
    if home is not None:
        environ["FLEETDNS_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "fleet", *args], env=environ, capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 120), **kwargs)


@pytest.fixture(scope="session")
def lab_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab-home")


@pytest.fixture(scope="session")
def lab(lab_home):
    """A running lab of 3 overlay hosts (fleet.lab.lifecycle.Lab); brought down after the session."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root: namespaces, mounts and cgroups")
    from fleet.lab import lifecycle

    built, _ = lifecycle.up(3, "overlay", home=lab_home)
    yield built
    lifecycle.down(lab_home)


@pytest.fixture(scope="session")
def deployed(lab):
    """The session lab with the probe deployed once (``fleetdns deploy INVENTORY --backend bpftrace``)."""
    proc = fleetdns("deploy", str(lab.layout.inventory), "--backend", "bpftrace", home=lab.layout.home, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lab
