"""``fleetdns check --absent`` with the host scans (raw/HOST.scan.json): pre-capture evidence, blind spots, the
verdict rules and exit codes, and scans that are missing, corrupt or hostile."""

from __future__ import annotations

import pytest

from fleet import report
from fleet.errors import ExitCode
from tests.captures import CaptureBuilder, Lookup, make_run, scan
from tests.conftest import fleetdns
from tests.unit.test_cli import assert_one_line_error

WIRE = ["libc", "wire"]
OLD_DB = {"name": "old-db.lab", "addresses": ["10.213.0.5"], "error": None}
CONN = {"pid": 4242, "comm": "python3", "local": "10.213.0.13:40000", "remote": "10.213.0.5:5432",
        "remote_addr": "10.213.0.5", "remote_port": 5432}
GO = {"pid": 77, "comm": "goapp", "exe": "/usr/local/bin/goapp", "reason": "go", "detail": "a Go binary"}
EVIDENCE = ("lab3: pid 4242 (python3) holds 1 connection to 10.213.0.5:5432, which old-db.lab resolved to at capture "
            "start — it resolved before the capture began")


@pytest.fixture(autouse=True)
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "reports"


def run_with(scans: dict, *, lab3_names: tuple[bytes, ...] = (b"new-db.lab",), sources: list[str] | None = None):
    caps = {}
    for host in ("lab1", "lab2", "lab3"):
        cap = CaptureBuilder(host, sources=sources)
        for name in (lab3_names if host == "lab3" else (b"new-db.lab",)):
            cap.lookup(Lookup(name, pid=50))
        caps[host] = ("captured", cap.bytes())
    return make_run(caps, scans=scans)


def full_scans(**lab3) -> dict:
    return {"lab1": scan("lab1", watch=[OLD_DB]), "lab2": scan("lab2", watch=[OLD_DB]),
            "lab3": scan("lab3", watch=[OLD_DB], **lab3)}


def test_evidence_makes_the_verdict_unproven_with_the_evidence_line():
    run = run_with(full_scans(connections=[CONN, {**CONN, "remote": "10.213.0.9:22", "remote_addr": "10.213.0.9"}]))
    result = report.check(report.load(run), ["old-db.*"])
    assert result.verdict == "unproven" and result.unproven.empty
    assert result.lines() == [EVIDENCE]
    proc = fleetdns("check", run.id, "--absent", "old-db.*")
    assert_one_line_error(proc, ExitCode.UNPROVEN, "cannot prove it: pre-capture evidence on lab3")
    assert EVIDENCE in proc.stdout


def test_a_seen_lookup_wins_over_evidence():
    run = run_with(full_scans(connections=[CONN]), lab3_names=(b"old-db.lab",))
    assert report.check(report.load(run), ["old-db.*"]).verdict == "violated"
    proc = fleetdns("check", run.id, "--absent", "old-db.*")
    assert_one_line_error(proc, ExitCode.HOSTS_FAILED, "1 host resolved an --absent name (1 lookup)")
    assert EVIDENCE in proc.stdout


def test_no_evidence_and_no_blind_spots_is_proven():
    run = run_with(full_scans(connections=[{**CONN, "remote_addr": "10.213.0.6", "remote": "10.213.0.6:5432"}]))
    proc = fleetdns("check", run.id, "--absent", "old-db.lab")
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    assert "proven: 3 hosts completely captured" in proc.stdout


def test_blind_spots_without_the_wire_source_are_unproven():
    run = run_with({**full_scans(), "lab2": scan("lab2", watch=[OLD_DB], blind_spots=[GO])})
    result = report.check(report.load(run), ["old-db.lab"])
    assert result.verdict == "unproven" and result.uncovered_hosts == ["lab2"]
    proc = fleetdns("check", run.id, "--absent", "old-db.lab")
    assert_one_line_error(proc, ExitCode.UNPROVEN, "processes the libc probe cannot see, without the wire source, "
                                                   "on lab2")
    assert "lab2: 1 process the libc probe cannot see (go 1) and the wire source did not run" in proc.stdout
    assert "/usr/local/bin/goapp" in proc.stdout


def test_blind_spots_with_the_wire_source_are_covered_and_printed():
    run = run_with({**full_scans(), "lab2": scan("lab2", watch=[OLD_DB], blind_spots=[GO, {**GO, "pid": 78,
                                                                                          "reason": "static"}])},
                   sources=WIRE)
    result = report.check(report.load(run), ["old-db.lab"])
    assert result.verdict == "proven" and result.blind_spots["covered"].all()
    proc = fleetdns("check", run.id, "--absent", "old-db.lab")
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    assert ("lab2: 2 processes the libc probe cannot see (go 1, static 1) — covered by the wire source: their "
            "UDP/53 queries are seen; /etc/hosts lookups of static binaries are not") in proc.stdout


@pytest.mark.parametrize("bad", [None, b"{not json", b"[1, 2]", b'{"format": "fleetdns-scan/9"}', b"\xff\xfe",
                                 b"[" * 100_000 + b"]" * 100_000])
def test_a_missing_or_corrupt_scan_is_one_line_never_a_crash(bad):
    scans = full_scans()
    if bad is None:
        del scans["lab2"]
    else:
        scans["lab2"] = bad
    run = run_with(scans)
    result = report.check(report.load(run), ["old-db.lab"])
    assert result.verdict == "proven"
    assert [line for line in result.lines() if line.startswith("lab2")][0].startswith("lab2: no host scan")
    proc = fleetdns("check", run.id, "--absent", "old-db.lab")
    assert proc.returncode == ExitCode.OK and "lab2: no host scan" in proc.stdout
    assert "Traceback" not in proc.stderr
    report_proc = fleetdns("report", run.id)
    assert report_proc.returncode == 0 and "no scan" in report_proc.stdout


def test_malformed_scan_entries_are_skipped_and_scan_errors_noted():
    lab3 = scan("lab3", watch=[OLD_DB, "junk", {"name": 5}], connections=[CONN, 7, {**CONN, "pid": "x"}],
                blind_spots=[None, {"pid": [1]}], errors=["pid 77: /proc/77/exe: permission denied"])
    run = run_with({**full_scans(), "lab3": lab3})
    loaded = report.load(run)
    assert len(loaded.connections) == 2 and loaded.connections["pid"].isna().sum() == 1
    assert len(loaded.blind_spots) == 1 and loaded.blind_spots["pid"].isna().all()
    result = report.check(loaded, ["old-db.lab"])
    assert EVIDENCE in result.lines()
    assert "lab3: host scan incomplete: 1 error (first: pid 77: /proc/77/exe: permission denied)" in result.lines()
    assert any("a process the scan could not name holds 1 connection" in line for line in result.lines())


def test_globs_without_a_watched_name_and_names_that_did_not_resolve():
    lab3 = scan("lab3", watch=[{"name": "old-db.lab", "addresses": [], "error": "NXDOMAIN"}])
    run = run_with({**full_scans(), "lab3": lab3})
    lines = report.check(report.load(run), ["old-db.lab", "legacy-*.corp"]).lines()
    assert "lab3: old-db.lab did not resolve at capture start (NXDOMAIN)" in lines
    assert "no pre-capture evidence for legacy-*.corp: capture with --watch NAME (a name matching legacy-*.corp)" \
        in lines
    assert "no pre-capture evidence for gone.lab: capture with --watch gone.lab" in report.check(
        report.load(run), ["gone.lab"]).lines()


def test_mapped_ipv6_addresses_compare_with_ipv4():
    conn = {**CONN, "remote": "[::ffff:10.213.0.5]:5432", "remote_addr": "::ffff:10.213.0.5"}
    run = run_with(full_scans(connections=[conn]))
    assert report.check(report.load(run), ["old-db.lab"]).verdict == "unproven"


def test_hostile_text_in_a_scan_is_escaped():
    evil = {**CONN, "comm": "py\x1b[2J\nthon", "remote": "10.213.0.5:5432\r"}
    run = run_with(full_scans(connections=[evil], blind_spots=[{**GO, "exe": "/tmp/a\nb"}]))
    proc = fleetdns("check", run.id, "--absent", "old-db.lab")
    assert proc.returncode == ExitCode.UNPROVEN
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    assert "pid 4242 (py\\u001b[2J\\nthon)" in proc.stdout and "/tmp/a\\nb" in proc.stdout


def test_present_only_checks_ignore_scans():
    run = run_with(full_scans(connections=[CONN], blind_spots=[GO]))
    result = report.check(report.load(run), [], ["new-db.lab"])
    assert result.verdict == "proven" and result.lines() == []


def test_a_wire_source_limited_to_its_network_namespace_says_so():
    run = run_with({**full_scans(), "lab2": scan("lab2", watch=[OLD_DB], blind_spots=[GO])}, sources=WIRE)
    entry = run.host_file("lab2")
    entry.write_bytes(entry.read_bytes().replace(b'"wire_scope": "all"', b'"wire_scope": "netns:4026531840"'))
    lines = report.check(report.load(run), ["old-db.lab"]).lines()
    assert any(line.startswith("lab2: 1 process") and line.endswith(
        "(wire scope netns:4026531840: processes in other network namespaces are not seen)") for line in lines)


def test_a_wire_only_lookup_of_an_absent_name_is_a_violation():
    from tests.captures import Query, dns_query

    cap = CaptureBuilder("lab1", sources=WIRE).query(Query(dns_query(b"OLD-DB.lab"), comm=b"goapp", pid=77, sid=1))
    run = make_run({"lab1": ("captured", cap.bytes())}, scans={"lab1": scan("lab1", blind_spots=[GO])})
    result = report.check(report.load(run), ["old-db.*"])
    assert result.verdict == "violated"
    row = result.offenders.iloc[0]
    assert (row["host"], row["process"], row["pid"], row["name"], row["source"]) == ("lab1", "goapp", 77,
                                                                                   "OLD-DB.lab", "wire")
    proc = fleetdns("check", run.id, "--absent", "old-db.*")
    assert_one_line_error(proc, ExitCode.HOSTS_FAILED, "1 host resolved an --absent name (1 lookup)")
