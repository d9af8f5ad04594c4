"""libc / wire / both: every lookup's source (fleet.report.reconcile, wire_lookups), through the report table, its
``--by source`` key, the CSV's trailing ``source`` column, diff, coverage and HTML. Run stores from real capture
bytes (tests/captures.py)."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from fleet import capture_format as cf
from fleet import render, report
from tests.captures import CaptureBuilder, Lookup, Query, dns_query, make_run, reverse_query_name, scan
from tests.conftest import fleetdns

MS = 1_000_000
T0 = 1_000_000_000
WIRE = ["libc", "wire"]


@pytest.fixture(autouse=True)
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "reports"


def sources_of(cap: CaptureBuilder) -> tuple[list[str], list[str]]:
    """(each libc lookup's source, each query's source) in record order."""
    c = cf.parse_capture(cap.bytes())
    events, wire = report.reconcile(c.events, c.wire)
    return list(events["source"]), list(wire["source"])


def glibc(name: bytes, *, asked: bytes | None = None, t: int = T0, pid: int = 100, latency: int = 2 * MS,
          cap: CaptureBuilder | None = None, af: int = 0) -> CaptureBuilder:
    """A getaddrinfo lookup and the A+AAAA queries glibc sends for it (of ``asked``, default the name)."""
    cap = cap or CaptureBuilder("h1", sources=WIRE)
    cap.lookup(Lookup(name, pid=pid, t=t, latency_ns=latency, fid=6 if af else 1, af=af))
    for i, qtype in enumerate((12,) if af else (1, 28)):
        cap.query(Query(dns_query(asked or name, qtype), pid=pid, t=t + 100_000 + i * 1000, sid=4))
    return cap


# ---------------------------------------------------------------------------------------------- matching

def test_a_lookup_and_its_queries_are_both():
    assert sources_of(glibc(b"db.lab")) == (["both"], ["both", "both"])


def test_names_match_in_any_case_and_without_a_trailing_dot():
    assert sources_of(glibc(b"DB.Lab.", asked=b"db.LAB")) == (["both"], ["both", "both"])


def test_search_domain_suffix_matches():
    assert sources_of(glibc(b"db", asked=b"db.lab")) == (["both"], ["both", "both"])
    # a name is not a suffix match of a longer label: db → dbx.lab is another name
    assert sources_of(glibc(b"db", asked=b"dbx.lab")) == (["libc"], ["wire", "wire"])


@pytest.mark.parametrize("address", ["10.213.0.5", "2001:db8::1"])
def test_reverse_lookups_match_their_arpa_query(address):
    import ipaddress

    cap = glibc(ipaddress.ip_address(address).packed, asked=reverse_query_name(address), af=2 if "." in address
                else 10)
    assert sources_of(cap) == (["both"], ["both"])


def test_queries_outside_the_lookup_window_or_of_another_pid_are_wire():
    cap = CaptureBuilder("h1", sources=WIRE).lookup(Lookup(b"db.lab", t=T0, latency_ns=2 * MS))
    cap.query(Query(dns_query(b"db.lab"), t=T0 + 3 * MS + 1))  # after start + latency + 1 ms
    cap.query(Query(dns_query(b"db.lab"), t=T0 - 1))  # before the lookup started
    cap.query(Query(dns_query(b"db.lab"), t=T0 + MS, pid=101))  # another process
    cap.query(Query(dns_query(b"db.lab"), t=T0 + 3 * MS))  # the window's last nanosecond
    assert sources_of(cap) == (["both"], ["wire", "wire", "wire", "both"])


def test_a_hosts_file_lookup_is_libc_only():
    cap = CaptureBuilder("h1", sources=WIRE).lookup(Lookup(b"local.hosts"))
    assert sources_of(cap) == (["libc"], [])


def test_each_query_goes_to_the_lookup_running_when_it_left():
    cap = glibc(b"db.lab", t=T0)
    glibc(b"db.lab", t=T0 + 2_000 * MS, cap=cap)
    assert sources_of(cap) == (["both", "both"], ["both"] * 4)


# ---------------------------------------------------------------------------------------------- wire lookups

def wire_only(*queries: Query) -> pd.DataFrame:
    cap = CaptureBuilder("h1", sources=WIRE)
    for q in queries:
        cap.query(q)
    return report.wire_lookups(cf.parse_capture(cap.bytes()).wire)


def test_an_a_aaaa_pair_is_one_wire_lookup_and_two_seconds_apart_are_two():
    pair = wire_only(Query(dns_query(b"go.lab", 1), sid=1), Query(dns_query(b"GO.lab", 28), sid=1, t=T0 + 5000))
    assert len(pair) == 1 and pair.iloc[0]["queries"] == 2 and pair.iloc[0]["time"].value % 10**9 == 0
    apart = wire_only(Query(dns_query(b"go.lab")), Query(dns_query(b"go.lab"), t=T0 + 2 * 10**9))
    assert list(apart["queries"]) == [1, 1]
    chained = wire_only(*(Query(dns_query(b"go.lab"), t=T0 + i * 900 * MS) for i in range(3)))
    assert list(chained["queries"]) == [3]  # each less than 1 s after the previous one
    # Go sends A and AAAA from two threads: still one lookup (measured: tids 16021 and 16019, 0.7 ms apart)
    threads = wire_only(Query(dns_query(b"go.lab"), tid=1), Query(dns_query(b"go.lab", 28), tid=2, t=T0 + MS))
    assert list(threads["queries"]) == [2]


def lab_run():
    """h1: python resolves db (search domain) 3× (both), a hosts-file name (libc), a Go binary go.lab (A+AAAA,
    twice 2 s apart: wire), dig a PTR (wire), a formula-like wire name; h2 summary mode."""
    cap = CaptureBuilder("h1", sources=WIRE)
    for i in range(3):
        glibc(b"db", asked=b"db.lab", t=T0 + i * 10 * MS, pid=7, cap=cap)
    cap.lookup(Lookup(b"local.hosts", comm=b"python3", pid=7, t=T0 + 50 * MS))
    for t in (T0, T0 + 2 * 10**9):
        cap.query(Query(dns_query(b"go.lab", 1), comm=b"goapp", pid=8, sid=1, t=t))
        cap.query(Query(dns_query(b"go.lab", 28), comm=b"goapp", pid=8, sid=1, t=t + 2000))
    cap.query(Query(dns_query(reverse_query_name("10.213.0.5"), 12), comm=b"dig", pid=9))
    cap.query(Query(dns_query([b"=cmd|x"]), comm=b"-evil", pid=10))
    h2 = CaptureBuilder("h2", mode="summary", sources=WIRE).summary_key(b"db.lab", buckets={21: 2}, first=T0,
                                                                         last=T0 + 500 * MS)
    h2.query(Query(dns_query(b"db.lab"), t=T0 + 500 * MS + 4 * MS))  # inside: last + 2^22 ns + 1 ms
    h2.query(Query(dns_query(b"db.lab"), t=T0 + 600 * MS))  # after the window: a wire lookup
    return make_run({"h1": ("captured", cap.bytes()), "h2": ("captured", h2.bytes())},
                    scans={"h1": scan("h1", blind_spots=[{"pid": 8, "comm": "goapp", "exe": "/usr/bin/goapp",
                                                          "reason": "go", "detail": "a Go binary"}])})


def test_report_marks_every_lookup_with_its_source():
    loaded = report.load(lab_run())
    table = report.aggregate(loaded)
    rows = {(r.host, r.process, r.name): (r.source, r.lookups, r.failed) for r in table.itertuples()}
    assert rows[("h1", "curl", "db")][:2] == ("both", 3)
    assert rows[("h1", "python3", "local.hosts")][:2] == ("libc", 1)
    assert rows[("h1", "goapp", "go.lab")][:2] == ("wire", 2)
    assert rows[("h1", "dig", "10.213.0.5")][:2] == ("wire", 1)  # a PTR query is named by its address
    assert rows[("h2", "curl", "db.lab")] == ("both+wire", 3, 0)  # 2 matched in summary mode, 1 late query
    wire = table[table["source"] == "wire"]
    assert wire["failed"].isna().all() and wire["p50_ms"].isna().all() and wire["p95_ms"].isna().all()
    by_function = report.aggregate(loaded, ["function", "source"])
    assert set(by_function.loc[by_function["source"] == "wire", "function"]) == {"write", "sendto"}
    assert list(table.columns)[-1] == "source" and str(table["source"].dtype) == "category"


def test_summary_mode_matches_per_key_inside_its_window():
    t = report.aggregate(report.load(lab_run()), ["host", "name", "source"])
    h2 = {(r.name, r.source): r.lookups for r in t[t["host"] == "h2"].itertuples()}
    assert h2 == {("db.lab", "both"): 2, ("db.lab", "wire"): 1}


def test_by_source_and_mixed_groups():
    loaded = report.load(lab_run())
    by_source = report.aggregate(loaded, ["source"]).set_index("source")
    assert list(report.aggregate(loaded, ["source"]).columns)[-1] == "source"
    assert by_source.loc["both", "lookups"] == 5 and by_source.loc["libc", "lookups"] == 1
    assert pd.isna(by_source.loc["wire", "failed"]) and by_source.loc["wire", "lookups"] == 5
    by_name = report.aggregate(loaded, ["name"]).set_index("name")
    assert by_name.loc["db.lab", "source"] == "both+wire"  # h2's matched key and its late query
    assert by_name.loc["db.lab", "failed"] == 0  # the known results
    assert report.parse_by("name,source") == ["name", "source"]


def test_failed_filter_skips_unknown_results():
    failed = report.aggregate(report.load(lab_run()), filters=report.Filters(failed_only=True))
    assert failed.empty


def test_csv_has_a_trailing_source_column_and_neutralises_wire_names(tmp_path):
    table = report.aggregate(report.load(lab_run()))
    render.write_csv(table, tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == ("host,process,pid,name,lookups,failed,p50_ms,p95_ms,first_seen,last_seen,"
                                    "source")
    back = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    row = back[back["name"] == "'=cmd|x"].iloc[0]
    assert (row["process"], row["source"], row["failed"], row["p50_ms"]) == ("'-evil", "wire", "", "")
    assert not any(n.startswith(("=", "+", "-", "@")) for n in back["name"])


def test_hostile_wire_names_survive_csv_exactly(tmp_path):
    from tests.unit.test_report import HOSTILE, unneutralise

    names = [n for n in HOSTILE if all(len(label) <= 63 for label in n.split(b"."))]
    cap = CaptureBuilder("h1", sources=WIRE)
    for i, name in enumerate(names):
        cap.query(Query(dns_query([name] if name else []), pid=1000 + i), i + 1, 2 * 10**9)
    table = report.aggregate(report.load(make_run({"h1": ("captured", cap.bytes())})))
    render.write_csv(table, tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\t" not in text
    back = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    got = {report.unescape_text(unneutralise(n)): int(c) for n, c in zip(back["name"], back["lookups"], strict=True)}
    assert got == {name: i + 1 for i, name in enumerate(names)}
    assert set(back["source"]) == {"wire"}
    render.write_json(table, tmp_path / "r.json")
    records = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert {report.unescape_text(r["name"]) for r in records} == set(names)
    assert all(r["failed"] is None and r["p95_ms"] is None and r["source"] == "wire" for r in records)
    render.write_parquet(table, tmp_path / "r.parquet")
    assert pd.read_parquet(tmp_path / "r.parquet")["source"].tolist() == ["wire"] * len(names)


def test_marker_and_name_filters_apply_to_wire_lookups():
    cap = CaptureBuilder("h1", sources=WIRE).query(Query(dns_query(b"fleetdns-selftest-1.invalid")))
    cap.query(Query(dns_query(b"db.lab")))
    run = make_run({"h1": ("captured", cap.bytes())}, options={"marker": "fleetdns-selftest-1.invalid"})
    loaded = report.load(run)
    assert list(report.aggregate(loaded)["name"]) == ["db.lab"]
    assert report.aggregate(loaded, filters=report.Filters(names=["x*"])).empty


# ---------------------------------------------------------------------------------------------- around the table

def test_coverage_says_which_sources_ran_and_counts_blind_spots():
    cov = report.load(lab_run()).coverage.set_index("host")
    assert (cov.loc["h1", "sources"], cov.loc["h1", "wire_scope"], cov.loc["h1", "blind_spots"]) == (
        "libc+wire", "all", 1)
    assert pd.isna(cov.loc["h2", "blind_spots"])  # no scan
    old = report.load(make_run({"h3": ("captured", CaptureBuilder("h3").bytes())})).coverage
    assert old.loc[0, "sources"] == "libc" and pd.isna(old.loc[0, "wire_scope"])


def test_diff_carries_each_runs_sources():
    before = make_run({"h1": ("captured", glibc(b"go.lab").bytes())})
    after = CaptureBuilder("h1", sources=WIRE).query(Query(dns_query(b"go.lab"), sid=1))
    d = report.diff(report.load(before), report.load(make_run({"h1": ("captured", after.bytes())})),
                    by=["host", "name"], include_same=True)
    row = d.iloc[0]
    assert (row["change"], row["source_a"], row["source_b"], row["failed_a"]) == ("same", "both", "wire", 0)
    assert pd.isna(row["failed_b"]) and list(d.columns)[-2:] == ["source_a", "source_b"]
    keyed = report.diff(report.load(before), report.load(make_run({"h1": ("captured", after.bytes())})),
                        by=["name", "source"])
    assert set(zip(keyed["source"], keyed["change"], strict=True)) == {("both", "disappeared"),
                                                                       ("wire", "appeared")}


def test_html_with_wire_only_rows_and_blind_spots(tmp_path):
    loaded = report.load(lab_run())
    render.write_html(tmp_path / "r.html", run_id=loaded.run.id, coverage=loaded.coverage,
                      table=report.aggregate(loaded), by_name=report.aggregate(loaded, ["name"]),
                      minutes=loaded.minutes, histogram=loaded.histogram, blind_spots=loaded.blind_spots)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Processes the libc probe cannot see" in page and "/usr/bin/goapp" in page


def test_report_command_prints_sources_and_the_blind_spot_section():
    run = lab_run()
    proc = fleetdns("report", run.id)
    assert proc.returncode == 0, proc.stderr
    assert "libc+wire" in proc.stdout and "no scan" in proc.stdout
    assert "processes the libc probe cannot see" in proc.stdout and "/usr/bin/goapp" in proc.stdout
    csv_out = fleetdns("report", run.id, "--csv", "-")
    assert csv_out.stdout.splitlines()[0].endswith(",source")
    assert "/usr/bin/goapp" in csv_out.stderr and "/usr/bin/goapp" not in csv_out.stdout  # stdout: CSV only
    records = json.loads(fleetdns("report", run.id, "--by", "source", "--json", "-").stdout)
    assert {r["source"]: r["lookups"] for r in records} == {"both": 5, "wire": 5, "libc": 1}
    assert all(list(r)[-1] == "source" for r in records)
