"""Fixtures of the real-probe tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def files_only(tmp_path_factory) -> list[str]:
    """Command prefix that runs a program with ``hosts: files`` (no DNS query can leave this machine)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private /etc/nsswitch.conf")
    conf = tmp_path_factory.mktemp("nss") / "nsswitch.conf"
    conf.write_text("hosts: files\n")
    return ["unshare", "-m", "sh", "-c", f'mount --bind {conf} /etc/nsswitch.conf && exec "$@"', "sh"]
