"""The pure parts of capture and gather: host status classification, manifest updates, the host-side writer's
--max-bytes cap and dead-recorder detection, and the CLI's bad-input errors (no lab needed)."""

from __future__ import annotations

import io
import json
import os

import pytest

from fleet import gather, hostrun, inventory, store
from fleet.errors import ExitCode, InputError
from fleet.ssh import Connection
from tests.conftest import fleetdns
from tests.unit.test_cli import assert_one_line_error

FINISHED = {"state": "finished", "attached": True, "stop_reason": "duration", "events": 3, "lost": 0,
            "dropped": 0, "bytes": 900, "ended": "2026-12-03T10:00:10+00:00"}


@pytest.mark.parametrize(("status", "expected", "reason"), [
    (FINISHED, "captured", None),
    ({**FINISHED, "events": 0}, "empty", None),
    ({**FINISHED, "events": None}, "captured", None),  # summary mode
    ({**FINISHED, "lost": 4}, "partial", "4 events lost"),
    ({**FINISHED, "stop_reason": "stopped"}, "partial", "stopped early"),
    ({**FINISHED, "stop_reason": "max-bytes", "dropped": 7, "lost": 7}, "partial", "7 records dropped"),
    ({**FINISHED, "state": "killed", "stop_reason": "killed"}, "partial", "killed before it finished"),
    ({**FINISHED, "stop_reason": "backend-exit", "exit_status": 1}, "partial", "exited early"),
    ({"state": "failed", "attached": False, "error": "bpftrace failed to attach"}, "failed", "failed to attach"),
    ({**FINISHED, "state": "failed", "error": "never saw its self-test"}, "partial", "self-test"),
])
def test_classify(status, expected, reason):
    got, why = gather.classify(status)
    assert got == expected and got in store.STATUSES
    assert (why is None) if reason is None else (reason in why)


def test_manifest_updates_are_saved_at_once_and_keep_the_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path))
    run = store.new_run({"mode": "events", "duration_s": 10}, "inv.ini", None, ["lab1", "lab2"])
    gather.ManifestLock(run).update("lab1", status="captured", **gather.host_fields(FINISHED))
    on_disk = store.open_run(run.id).manifest["hosts"]
    assert on_disk["lab1"]["status"] == "captured" and on_disk["lab1"]["events"] == 3
    assert set(on_disk["lab2"]) >= {"status", "reason", "file", "bytes", "sha256", "lost", "records", "backend",
                                    "window"}
    assert gather.summary(store.open_run(run.id)) == {"captured": 1, "pending": 1}


def test_counting_writer_caps_records_but_always_ends_the_file():
    capped = []
    out = io.BytesIO()
    w = hostrun._CountingWriter(out, hostrun.TRAILER_ROOM + 110, lambda: capped.append(1))
    w.write(b"H fleetdns-capture/1 {}\n")
    for _ in range(10):
        w.write(b"E " + b"1 " * 20 + b"\n")
    w.write(b"L 2\n")
    w.write(b'T {"lost": 0}\n')
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(b"H ") and lines[-1].startswith(b"T ")
    # the header (24 bytes) and two 43-byte records fit in 110 bytes; eight records and "L 2" did not
    assert w.events == 2 and w.dropped == 9 and capped
    assert lines[-2] == b"L 9" and w.bytes == len(out.getvalue())


def test_a_recorder_that_died_shows_as_killed(tmp_path):
    run_dir = tmp_path / "runs" / "20261203T100000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "recording", "pid": 2**22 + 7}))
    assert hostrun.read_status(run_dir)["state"] == "killed"
    (run_dir / "status.json").write_text(json.dumps({"state": "recording", "pid": os.getpid()}))
    assert hostrun.read_status(run_dir)["state"] == "recording"
    with pytest.raises(InputError, match="no run"):
        hostrun.read_status(tmp_path / "runs" / "20261203T110000Z")


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["capture", "--duration", "10x", "-i", "inv.ini"], ExitCode.USAGE, "bad --duration '10x'"),
    (["capture", "--duration", "0s", "-i", "inv.ini"], ExitCode.USAGE, "must be positive"),
    (["capture", "--duration", "10s", "-i", "inv.ini", "--max-bytes", "lots"], ExitCode.USAGE, "bad --max-bytes"),
    (["capture", "--duration", "10s"], ExitCode.USAGE, "no inventory"),
    (["capture", "--duration", "10s", "-i", "missing.ini"], ExitCode.BAD_INPUT, "inventory not found"),
    (["capture", "--duration", "10s", "-i", "inv.ini", "--limit", "web*"], ExitCode.BAD_INPUT,
     "--limit 'web*' matches no host"),
    (["gather", "yesterday"], ExitCode.BAD_INPUT, "bad run id 'yesterday'"),
    (["gather", "20200101T000000Z"], ExitCode.BAD_INPUT, "no run 20200101T000000Z"),
    (["gather"], ExitCode.BAD_INPUT, "no runs in"),
])
def test_bad_input_is_one_line_with_its_exit_code(tmp_path, args, code, needle):
    (tmp_path / "inv.ini").write_text("[lab]\nlab1 ansible_host=192.0.2.1\n")
    proc = fleetdns(*args, home=tmp_path, cwd=tmp_path)
    assert_one_line_error(proc, code, needle)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())  # no run was created


def test_runs_on_an_empty_store_is_an_empty_table(tmp_path):
    proc = fleetdns("runs", home=tmp_path)
    assert proc.returncode == 0 and "run" in proc.stdout and "2026" not in proc.stdout


@pytest.mark.parametrize("extra, become", [("", False), ("ansible_become=yes", True), ("ansible_become=false", False),
                                           ("ansible_become=true ansible_become_user=root", True)])
def test_become_comes_from_the_inventory_and_wraps_commands_in_sudo(tmp_path, extra, become):
    inv = tmp_path / "inv.ini"
    inv.write_text(f"h1 ansible_host=192.0.2.1 ansible_user=ops {extra}\n")
    host = inventory.load(inv)[0]
    assert host.become is become
    command = Connection(host).command(["fleetdns-probe", "run", "status", "a b;rm -rf /"])
    expected = "fleetdns-probe run status 'a b;rm -rf /'"
    assert command == ("sudo -n -- " + expected if become else expected)


@pytest.mark.parametrize("extra, needle", [("ansible_become_method=su", "sudo only"),
                                           ("ansible_become_user=postgres", "the probe needs root")])
def test_unsupported_become_is_a_clear_input_error(tmp_path, extra, needle):
    inv = tmp_path / "inv.ini"
    inv.write_text(f"h1 ansible_host=192.0.2.1 ansible_become=true {extra}\n")
    with pytest.raises(InputError, match=needle):
        inventory.load(inv)
