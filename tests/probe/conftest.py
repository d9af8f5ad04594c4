"""Fixtures of the real-probe tests, and the skip every one of them shares."""

from __future__ import annotations

import shutil

import pytest

from fleet.errors import FleetError
from fleet.probes import render, runner


def _environment_problem() -> str | None:
    try:
        runner.check_environment(render.ProbeOptions())
    except FleetError as e:
        return f"real probe tests need root, bpftrace and tracefs: {e}"
    return None


#: mark for tests that run the real bpftrace probe on this machine
needs_probe = pytest.mark.skipif(_environment_problem() is not None, reason=str(_environment_problem()))


@pytest.fixture(scope="session")
def files_only(tmp_path_factory) -> list[str]:
    """Command prefix that runs a program with ``hosts: files`` (no DNS query can leave this machine)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private /etc/nsswitch.conf")
    conf = tmp_path_factory.mktemp("nss") / "nsswitch.conf"
    conf.write_text("hosts: files\n")
    return ["unshare", "-m", "sh", "-c", f'mount --bind {conf} /etc/nsswitch.conf && exec "$@"', "sh"]
