"""The real ``python -m fleet report / diff / check`` on temporary run stores: outputs, exit codes, error lines."""

from __future__ import annotations

import io
import json
import os
import re
import stat

import pandas as pd
import pytest

from fleet.errors import ExitCode
from tests.captures import CaptureBuilder, Lookup, make_run
from tests.conftest import fleetdns
from tests.unit.test_cli import assert_one_line_error

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@pytest.fixture(autouse=True)
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "reports"


def two_host_run(*, third: str | None = None):
    lab1 = (CaptureBuilder("lab1").lookup(Lookup(b"db.lab"), 3)
            .lookup(Lookup(b"nx\x1b[2J.lab", comm=b"evil\ncomm", pid=9, rc=-2), 2))
    lab2 = CaptureBuilder("lab2", mode="summary").summary_key(b"db.lab", buckets={20: 4}, failures=1)
    hosts = {"lab1": ("captured", lab1.bytes()), "lab2": ("captured", lab2.bytes())}
    if third:
        hosts["lab3"] = (third, None)
    return make_run(hosts, reasons={"lab3": "ssh: no route to host"})


def test_report_terminal_shows_coverage_then_table_without_control_characters():
    two_host_run(third="unreachable")
    proc = fleetdns("report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("coverage of run") < proc.stdout.index("DNS lookups, run")
    assert "unreachable" in proc.stdout and "ssh: no route to host" in proc.stdout
    assert "nx\\u001b[2J.lab" in proc.stdout and "evil\\ncomm" in proc.stdout
    assert not CONTROL.search(proc.stdout.replace("\n", ""))
    assert "1 of 3 hosts not completely captured: lab3 (unreachable)" in proc.stderr


def test_report_latest_run_by_default_and_csv_to_stdout_only():
    make_run({"old": ("captured", CaptureBuilder("old").lookup(Lookup(b"x.lab")).bytes())})
    two_host_run()
    proc = fleetdns("report", "--csv", "-")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
    assert list(table.columns) == ["host", "process", "pid", "name", "lookups", "failed", "p50_ms", "p95_ms",
                                   "first_seen", "last_seen", "source"]
    assert set(table["host"]) == {"lab1", "lab2"}  # the newest run, not "old"
    assert table.groupby("host")["lookups"].sum().to_dict() == {"lab1": 5, "lab2": 4}
    assert table["failed"].sum() == 3


def test_csv_and_json_on_stdout_are_utf8_whatever_the_locale():
    name = "bücher\u2028.de".encode()
    run = make_run({"h1": ("captured", CaptureBuilder("h1").lookup(Lookup(name, comm=b"\xffx")).bytes())})
    env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    csv_out = fleetdns("report", run.id, "--csv", "-", env=env)
    assert csv_out.returncode == 0, csv_out.stderr
    assert csv_out.stdout.splitlines()[1].startswith("h1,\\xffx,100,bücher\\u2028.de,1,")
    json_out = fleetdns("report", run.id, "--json", "-", env=env)
    assert json_out.returncode == 0, json_out.stderr
    record = json.loads(json_out.stdout)[0]
    assert (record["name"], record["process"]) == ("bücher\\u2028.de", "\\xffx")


def test_report_default_csv_path_is_in_the_run_and_private():
    run = two_host_run()
    proc = fleetdns("report", run.id, "--csv", "--json")
    assert proc.returncode == 0, proc.stderr
    for name in ("dns-report.csv", "dns-report.json"):
        path = run.path / name
        assert f"wrote {path}" in proc.stderr
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    records = json.loads((run.path / "dns-report.json").read_text())
    assert sum(r["lookups"] for r in records) == 9


def test_report_by_name_failed_top_and_other_formats(tmp_path):
    run = two_host_run()
    proc = fleetdns("report", run.id, "--by", "name", "--failed", "--top", "1", "--json", "-",
                    "--parquet", str(tmp_path / "r.parquet"), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert records == [{**records[0], "name": "db.lab", "hosts": 2, "processes": 1, "lookups": 7, "failed": 1}]
    assert pd.read_parquet(tmp_path / "r.parquet")["name"].tolist() == ["db.lab"]
    assert "<svg" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("args, code, needle", [
    (["report", "nonsense"], ExitCode.BAD_INPUT, "bad run id 'nonsense'"),
    (["report", "20200101T000000Z"], ExitCode.BAD_INPUT, "no run 20200101T000000Z"),
    (["check", "--absent", "x", "20200101T000000Z"], ExitCode.BAD_INPUT, "no run 20200101T000000Z"),
    (["diff", "20200101T000000Z", "20200102T000000Z"], ExitCode.BAD_INPUT, "no run 20200101T000000Z"),
    (["report", "--by", "host,color"], ExitCode.USAGE, "--by host,color"),
    (["report", "--top", "0"], ExitCode.USAGE, "--top"),
    (["report", "--parquet", "-"], ExitCode.USAGE, "--parquet needs a file path"),
    (["check"], ExitCode.USAGE, "at least one --absent or --present"),
])
def test_bad_input_is_one_line(args, code, needle):
    two_host_run()
    assert_one_line_error(fleetdns(*args), code, needle)


def test_no_runs_and_damaged_manifest(reports):
    assert_one_line_error(fleetdns("report"), ExitCode.BAD_INPUT, "no runs in")
    run = two_host_run()
    (run.path / "manifest.json").write_text('{"format": "fleetdns-run/1", "hos')
    assert_one_line_error(fleetdns("report", run.id), ExitCode.BAD_INPUT, "unreadable manifest.json")
    (run.path / "manifest.json").write_text('{"format": "fleetdns-run/1", "hosts": 3}')
    assert_one_line_error(fleetdns("report", run.id), ExitCode.BAD_INPUT, "no valid 'hosts' table")


def test_damaged_capture_file_is_counted_not_fatal():
    run = two_host_run()
    run.host_file("lab2").write_bytes(b"H fleetdns-capture/1 {not json\n")
    proc = fleetdns("report", run.id, "--csv", "-")
    assert proc.returncode == 0, proc.stderr
    assert "lab2 (captured)" in proc.stderr
    assert set(pd.read_csv(io.StringIO(proc.stdout))["host"]) == {"lab1"}


def test_check_exit_codes():
    run = two_host_run()
    ok = fleetdns("check", run.id, "--absent", "old-db.*", "--present", "DB.lab")
    assert ok.returncode == ExitCode.OK, ok.stderr
    assert "proven: 2 hosts completely captured" in ok.stdout

    bad = fleetdns("check", run.id, "--absent", "db.*")
    assert_one_line_error(bad, ExitCode.HOSTS_FAILED, "2 hosts resolved an --absent name (7 lookups)")
    assert "lab1" in bad.stdout and "lab2" in bad.stdout

    missing = fleetdns("check", run.id, "--present", "new-db.lab")
    assert_one_line_error(missing, ExitCode.HOSTS_FAILED, "no host resolved new-db.lab")

    partial = two_host_run(third="failed")
    unproven = fleetdns("check", partial.id, "--absent", "old-db.*")
    assert_one_line_error(unproven, ExitCode.UNPROVEN, "cannot prove it: 1 hosts not completely captured (lab3)")
    assert "lab3" in unproven.stdout


def test_diff_between_two_runs():
    before = two_host_run()
    after = make_run({"lab1": ("captured", CaptureBuilder("lab1").lookup(Lookup(b"new-db.lab"), 4).bytes()),
                      "lab2": ("partial", None)})
    proc = fleetdns("diff", before.id, after.id, "--csv", "-")
    assert proc.returncode == 0, proc.stderr
    d = pd.read_csv(io.StringIO(proc.stdout))
    changes = dict(zip(d["host"] + " " + d["name"], d["change"], strict=True))
    assert changes == {"lab1 new-db.lab": "appeared", "lab1 db.lab": "disappeared",
                       "lab1 nx\\u001b[2J.lab": "disappeared", "lab2 db.lab": "not captured"}
    table = fleetdns("diff", before.id, after.id, "--by", "name")
    assert table.returncode == 0 and "appeared" in table.stdout
