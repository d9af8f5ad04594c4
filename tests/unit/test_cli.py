"""The CLI's surface and error paths: one line on stderr, a documented exit code, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from fleet.errors import ExitCode
from tests.conftest import fleetdns

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["capture", "gather", "runs", "report", "diff", "check"]


def assert_one_line_error(proc, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_every_stage_with_examples():
    proc = fleetdns("--help")
    assert proc.returncode == 0
    for name in ["lab", "deploy", *STAGES]:
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), name
    for name in ["lab", "deploy", *STAGES]:
        sub = fleetdns(name, "--help")
        assert sub.returncode == 0 and "fleetdns" in sub.stdout and "Example" in sub.stdout, name


@pytest.mark.parametrize(
    "args, needle",
    [
        (["lab", "up", "--hosts", "0"], "--hosts must be between 1 and 200, not 0"),
        (["lab", "up", "--hosts", "100000"], "--hosts must be between 1 and 200"),
        (["lab", "up", "--hosts", "many"], "'many' is not a valid integer"),
        (["lab", "up", "--mode", "vm"], "'vm' is not one of"),
        (["lab", "net", "lab1", "sideways"], "'sideways' is not one of"),
        (["no-such-command"], "No such command"),
        (["deploy"], "Missing argument 'INVENTORY'"),
        (["deploy", "inventory/x.ini", "--backend", "dtrace"], "'dtrace' is not one of"),
    ],
)
def test_bad_command_lines_exit_2(args, needle, tmp_path):
    proc = fleetdns(*args, home=tmp_path)
    assert_one_line_error(proc, ExitCode.USAGE, needle)


def test_lab_commands_without_a_lab_say_so(tmp_path):
    for args in (["lab", "status"], ["lab", "inventory"], ["lab", "exec", "lab1", "--", "true"]):
        proc = fleetdns(*args, home=tmp_path)
        assert_one_line_error(proc, ExitCode.LAB_FAILED, f"no lab is up in {tmp_path}", "fleetdns lab up")


def test_lab_up_needs_root(monkeypatch, tmp_path, capsys):
    # A mock, because this test may itself run as root: os.geteuid is made to answer as an ordinary user would.
    from fleet import cli

    monkeypatch.setenv("FLEETDNS_HOME", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lab", "up"])
    assert exit_info.value.code == ExitCode.ENVIRONMENT
    expected = "fleetdns: error: fleetdns lab needs root (run it as root, e.g. with sudo)"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="the missing-program check comes after the root check")
def test_lab_up_names_the_package_of_a_missing_program(tmp_path):
    # A PATH holding every program the lab needs except sshd.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for program in ("ip", "nsenter", "unshare", "mount", "umount"):
        (bindir / program).symlink_to(shutil.which(program))
    proc = fleetdns("lab", "up", home=tmp_path, env={"PATH": str(bindir)})
    assert_one_line_error(proc, ExitCode.ENVIRONMENT, "'sshd' not found on PATH", "apt-get install openssh-server")
    assert not (tmp_path / ".lab").exists()


def test_exit_code_table_in_docs_matches_the_enum():
    text = (ROOT / "docs" / "exit-codes.md").read_text()
    documented = {int(code): name for code, name in re.findall(r"^\|\s*(\d+)\s*\|\s*`(\w+)`", text, re.M)}
    assert documented == {code.value: code.name for code in ExitCode}


def test_damaged_lab_description_is_a_lab_error(tmp_path):
    (tmp_path / ".lab").mkdir()
    (tmp_path / ".lab" / "lab.json").write_text('{"hosts": 3}')
    proc = fleetdns("lab", "inventory", home=tmp_path)
    assert_one_line_error(proc, ExitCode.LAB_FAILED, "lab.json is damaged", "fleetdns lab down")


def test_internal_errors_are_one_line(monkeypatch, capsys):
    # A mock: a function made to fail the way a bug would, to see the funnel catch it.
    from fleet import cli
    from fleet.lab import lifecycle

    def broken(*_):
        return 1 / 0

    monkeypatch.setattr(lifecycle, "load", broken)
    monkeypatch.delenv("FLEETDNS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lab", "inventory"])
    assert exit_info.value.code == ExitCode.INTERNAL
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleetdns: internal error: ZeroDivisionError") and "\n" not in err
