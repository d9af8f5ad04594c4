"""The run store (fleet/store.py): run ids, the manifest, private modes, bad ids."""

from __future__ import annotations

import os
import stat

import pytest

from fleet import store
from fleet.errors import InputError


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "reports"


def test_new_runs_are_private_unique_and_newest_first(reports):
    a = store.new_run({"mode": "events"}, "inv.ini", None, ["lab1", "lab2"])
    b = store.new_run({"mode": "events"}, "inv.ini", None, ["lab1"])
    assert store.RUN_ID_RE.match(a.id) and store.RUN_ID_RE.match(b.id) and a.id != b.id
    assert [r.id for r in store.list_runs()][:2] == [b.id, a.id]
    assert store.open_run(None).id == b.id
    assert stat.S_IMODE(os.stat(reports).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(a.path / "manifest.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(a.raw_dir).st_mode) == 0o700
    assert a.manifest["hosts"]["lab2"]["status"] == "pending"


def test_update_and_reopen(reports):
    run = store.new_run({}, "inv.ini", "web*", ["h1"])
    run.update_host("h1", status="captured", bytes=10)
    run.save()
    again = store.open_run(run.id)
    assert again.manifest["hosts"]["h1"]["status"] == "captured"
    assert again.manifest["limit"] == "web*"
    assert again.host_file("h1").name == "h1.capture"


@pytest.mark.parametrize("bad", ["../etc", "latest", "2026-11-25", "20261125T213000Z/..", "20261125T213000"])
def test_bad_run_ids_are_input_errors(reports, bad):
    with pytest.raises(InputError, match="bad run id"):
        store.open_run(bad)


def test_unknown_and_empty_store(reports):
    with pytest.raises(InputError, match="no runs"):
        store.open_run(None)
    with pytest.raises(InputError, match="no run 20200101T000000Z"):
        store.open_run("20200101T000000Z")


def test_damaged_manifest_is_an_input_error(reports):
    run = store.new_run({}, "inv.ini", None, ["h1"])
    (run.path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable manifest"):
        store.open_run(run.id)
    assert store.list_runs() == []


@pytest.mark.parametrize("bad", ["../x", ".hidden", "a/b", ""])
def test_host_names_that_cannot_be_files(reports, bad):
    with pytest.raises(InputError):
        store.check_host_name(bad)
