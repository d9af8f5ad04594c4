"""The deploy playbooks without hosts: syntax, lint, and the package lists each OS family renders for given facts
(RHEL and Arch cannot be booted here; their branches are checked this way)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import deploy, inventory
from fleet.errors import ExitCode, InputError
from tests.conftest import fleetdns

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "playbooks" / "roles" / "fleetdns_probe"
BIN = Path(sys.executable).parent


def render(family: str, **facts) -> dict:
    """The role's vars file for *family*, templated by Ansible's own Templar with *facts*."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    loader = DataLoader()
    raw = loader.load_from_file(str(ROLE / "vars" / f"{family}.yml"), trusted_as_template=True)
    templar = Templar(loader=loader, variables={**facts, **raw})
    return {key: templar.template(value) for key, value in raw.items()}


def test_syntax_check(tmp_path):
    inv = tmp_path / "hosts.ini"
    inv.write_text("[all]\nexample ansible_host=192.0.2.1\n")
    proc = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(inv),
                           str(ROOT / "playbooks" / "deploy.yml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(not (BIN / "ansible-lint").exists(), reason="ansible-lint is not installed (pip extra 'test')")
def test_ansible_lint_is_clean():
    proc = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--nocolor", "deploy.yml"],
                          cwd=ROOT / "playbooks", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_redhat_renders_headers_for_the_running_kernel():
    rendered = render("RedHat", ansible_kernel="5.14.0-362.el9.x86_64")
    assert rendered["fleetdns_probe_header_packages"] == [
        "kernel-devel-5.14.0-362.el9.x86_64", "kernel-headers-5.14.0-362.el9.x86_64"]
    assert {"systemtap", "systemtap-runtime", "bpftrace"} <= set(rendered["fleetdns_probe_packages"])
    assert rendered["fleetdns_probe_debuginfo_packages"] == ["glibc-debuginfo"]


@pytest.mark.parametrize("kernel, headers", [
    ("6.6.10-arch1-1", "linux-headers"),
    ("6.1.71-1-lts", "linux-lts-headers"),
    ("6.6.10-zen1-1-zen", "linux-zen-headers"),
    ("6.6.10-hardened1-1-hardened", "linux-hardened-headers"),
])
def test_archlinux_renders_the_headers_of_the_kernel_flavour(kernel, headers):
    rendered = render("Archlinux", ansible_kernel=kernel)
    assert rendered["fleetdns_probe_header_packages"] == [headers]
    assert set(rendered["fleetdns_probe_packages"]) == {"systemtap", "bpftrace"}


def test_debian_renders_headers_and_debug_symbols():
    rendered = render("Debian", ansible_kernel="6.1.0-18-amd64")
    assert rendered["fleetdns_probe_header_packages"] == ["linux-headers-6.1.0-18-amd64"]
    assert {"systemtap", "libc6-dbg", "bpftrace"} <= set(rendered["fleetdns_probe_packages"])


def test_host_zip_is_reproducible_and_importable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_HOME", str(tmp_path))
    first = deploy.build_host_zip().read_bytes()
    second = deploy.build_host_zip().read_bytes()
    assert first == second  # so a second deploy's copy task reports ok, not changed
    zipped = tmp_path / "host.zip"
    zipped.write_bytes(first)
    # The host's python with only the zip on its path: the runner and preflight import from it, stdlib only.
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    proc = subprocess.run([python, "-S", "-c", "import fleet.preflight, fleet.probes.runner, sys; "
                           "assert 'pandas' not in sys.modules"],
                          env={"PYTHONPATH": str(zipped)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("content, needle", [
    (None, "inventory not found"),
    ("", "defines no hosts"),
    ("[web\nfoo ansible_host=192.0.2.1\n", "Failed to parse inventory"),
])
def test_bad_inventories_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "hosts.ini"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=needle):
        inventory.load(path)
    proc = fleetdns("deploy", str(path), home=tmp_path)
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_inventory_directory_with_group_vars_and_limit(tmp_path):
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "hosts.yml").write_text(
        "all:\n  children:\n    web:\n      hosts:\n        web1: {ansible_host: 192.0.2.10}\n"
        "        web2: {ansible_host: 192.0.2.11, ansible_port: 2222}\n    db:\n      hosts:\n        db1:\n")
    (tmp_path / "group_vars" / "web.yml").write_text(
        "ansible_user: deploy\nansible_ssh_common_args: '-o UserKnownHostsFile=/etc/fleet/known_hosts "
        "-o StrictHostKeyChecking=yes'\n")
    hosts = {h.name: h for h in inventory.load(tmp_path)}
    assert set(hosts) == {"web1", "web2", "db1"}
    assert hosts["web2"].port == 2222 and hosts["web2"].user == "deploy"
    assert hosts["web1"].known_hosts == "/etc/fleet/known_hosts"
    assert hosts["db1"].address == "db1" and hosts["db1"].user is None
    assert [h.name for h in inventory.load(tmp_path, limit="web")] == ["web1", "web2"]
    with pytest.raises(InputError, match="--limit 'nothing' matches no host"):
        inventory.load(tmp_path, limit="nothing")
