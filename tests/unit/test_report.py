"""fleet/report.py and fleet/render.py on run stores built from real capture bytes (tests/captures.py): merged
counts, coverage, odd bytes through every format, CSV formula injection, check verdicts, diff."""

from __future__ import annotations

import io
import json
import os
import random
import stat

import pandas as pd
import pytest

from fleet import render, report
from fleet.errors import InputError, UsageError
from tests.captures import CaptureBuilder, Lookup, make_run

CSV_COLUMNS = ["host", "process", "pid", "name", "lookups", "failed", "p50_ms", "p95_ms", "first_seen", "last_seen",
               "source"]
HOSTILE = [b"comma,name", b'quote"name', b"tab\tname", b"new\nline", b"=HYPERLINK(\"http://x\",\"y\")", b"+1",
           b"-1+2", b"@SUM(A1)", b"'=already", b"\xff\xfe\x80bad", "bücher.de".encode(), b"esc\x1b[31mred",
           b"back\\x41slash", b"x" * 253, b"", b"\r=cr"]


@pytest.fixture(autouse=True)
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "reports"


def lab_run():
    """lab1 (events): curl 3× db.lab, python 2× nx.lab failing; lab2 (summary): db.lab 5×, 1 failed;
    lab3 unreachable."""
    lab1 = (CaptureBuilder("lab1").lookup(Lookup(b"db.lab", latency_ns=3_000_000), 3)
            .lookup(Lookup(b"nx.lab", comm=b"python3", pid=7, rc=-2), 2))
    lab2 = CaptureBuilder("lab2", mode="summary").summary_key(b"db.lab", buckets={21: 4, 23: 1}, failures=1)
    return make_run({"lab1": ("captured", lab1.bytes()), "lab2": ("captured", lab2.bytes()),
                     "lab3": ("unreachable", None)}, reasons={"lab3": "ssh: connection refused"})


def read_csv_text(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def csv_text(table: pd.DataFrame, tmp_path) -> str:
    path = tmp_path / "out.csv"
    render.write_csv(table, path)
    return path.read_text(encoding="utf-8")


def unneutralise(cell: str) -> str:
    """What docs/report.md tells a CSV reader to do: drop the one ' added before a formula-like cell."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r", "'") else cell


# ---------------------------------------------------------------------------------------------- merging

def test_events_and_summary_hosts_merge_into_one_table():
    coverage, table, _ = report.build(lab_run())
    assert list(table.columns) == CSV_COLUMNS
    assert dict(table.dtypes.astype(str)) == {
        "host": "category", "process": "category", "pid": "Int64", "name": "category", "lookups": "Int64",
        "failed": "Int64", "p50_ms": "Float64", "p95_ms": "Float64", "first_seen": "datetime64[ns, UTC]",
        "last_seen": "datetime64[ns, UTC]", "source": "category"}
    assert set(table["source"]) == {"libc"}  # captures without a wire source
    rows = {(r.host, r.process, r.name): (r.lookups, r.failed) for r in table.itertuples()}
    assert rows == {("lab2", "curl", "db.lab"): (5, 1), ("lab1", "curl", "db.lab"): (3, 0),
                    ("lab1", "python3", "nx.lab"): (2, 2)}
    assert list(table["lookups"]) == [5, 3, 2]  # sorted by lookups
    # 3 ms lies in the log2 bucket [2^21, 2^22) ns; reported as its geometric middle
    lab1 = table[(table["host"] == "lab1") & (table["name"] == "db.lab")].iloc[0]
    assert lab1["p50_ms"] == pytest.approx(2**21.5 / 1e6)
    lab2 = table[table["host"] == "lab2"].iloc[0]
    assert lab2["p50_ms"] == pytest.approx(2**21.5 / 1e6) and lab2["p95_ms"] == pytest.approx(2**23.5 / 1e6)
    assert list(coverage["host"]) == ["lab1", "lab2", "lab3"]
    assert list(coverage["complete"]) == [True, True, False]
    assert coverage.set_index("host").loc["lab3", "reason"] == "ssh: connection refused"
    assert list(coverage["lookups"]) == [5, 5, 0]


def test_by_name_counts_hosts_and_processes():
    loaded = report.load(lab_run())
    t = report.aggregate(loaded, ["name"]).set_index("name")
    assert list(t.columns) == ["hosts", "processes", "lookups", "failed", "p50_ms", "p95_ms", "first_seen",
                               "last_seen", "source"]
    assert (t.loc["db.lab", "hosts"], t.loc["db.lab", "processes"], t.loc["db.lab", "lookups"]) == (2, 1, 8)
    assert t.loc["nx.lab", "failed"] == 2
    by_function = report.aggregate(loaded, ["function"])
    assert by_function["lookups"].sum() == 10 and list(by_function["function"]) == ["getaddrinfo"]


def test_filters_globs_failed_and_top():
    loaded = report.load(lab_run())
    assert set(report.aggregate(loaded, filters=report.Filters(names=["DB.*"]))["name"]) == {"db.lab"}
    assert set(report.aggregate(loaded, filters=report.Filters(hosts=["lab2"]))["host"]) == {"lab2"}
    assert set(report.aggregate(loaded, filters=report.Filters(processes=["py*"]))["process"]) == {"python3"}
    failed = report.aggregate(loaded, filters=report.Filters(failed_only=True))
    assert set(zip(failed["host"], failed["name"], strict=True)) == {("lab2", "db.lab"), ("lab1", "nx.lab")}
    assert len(report.aggregate(loaded, top=1)) == 1


def test_bad_by_is_a_usage_error():
    with pytest.raises(UsageError, match="--by host,uid"):
        report.parse_by("host,uid")
    with pytest.raises(UsageError):
        report.parse_by("host,host")
    assert report.parse_by("name,function") == ["name", "function"]


def test_self_test_marker_lookups_are_left_out():
    cap = CaptureBuilder("h1").lookup(Lookup(b"fleetdns-selftest-1234.invalid"), 1).lookup(Lookup(b"db.lab"), 2)
    run = make_run({"h1": ("captured", cap.bytes())}, options={"marker": "fleetdns-selftest-1234.invalid"})
    coverage, table, _ = report.build(run)
    assert list(table["name"]) == ["db.lab"] and coverage.loc[0, "lookups"] == 2


def test_empty_run_gives_an_empty_table_with_the_columns():
    run = make_run({"h1": ("empty", CaptureBuilder("h1").bytes()), "h2": ("failed", None)})
    coverage, table, _ = report.build(run)
    assert list(table.columns) == CSV_COLUMNS and table.empty
    assert list(coverage["complete"]) == [True, False]


# ---------------------------------------------------------------------------------------------- coverage

def test_coverage_states_every_kind_of_incomplete_host():
    good = CaptureBuilder("ok").lookup(Lookup(b"a.lab"), 2)
    run = make_run({
        "ok": ("captured", good.bytes()),
        "gz": ("captured", CaptureBuilder("gz").lookup(Lookup(b"b.lab"), 4).bytes()),
        "lossy": ("partial", CaptureBuilder("lossy").lookup(Lookup(b"c.lab")).bytes(lost=7)),
        "cut": ("partial", CaptureBuilder("cut").lookup(Lookup(b"d.lab"), 3).bytes(trailer=False)[:-5]),
        "garbage": ("captured", b"\x00\x01 not a capture\n"),
        "nofile": ("captured", None),
        "down": ("unreachable", None),
        "broke": ("failed", None),
        "waiting": ("pending", None),
    }, compress={"gz"})
    coverage, table, _ = report.build(run)
    cov = coverage.set_index("host")
    assert cov.loc["ok", "complete"] and cov.loc["gz", "complete"] and cov.loc["gz", "lookups"] == 4
    assert cov.loc["lossy", "lost"] == 7 and not cov.loc["lossy", "complete"]
    assert cov.loc["cut", "damage"] == 2 and "no_trailer 1" in cov.loc["cut", "damage_kinds"]
    assert cov.loc["cut", "lookups"] == 2  # the cut last line is counted as damage, the rest is kept
    assert cov.loc["garbage", "damage_kinds"] == "unreadable"
    assert "not a fleetdns capture" in cov.loc["garbage", "reason"]
    assert cov.loc["nofile", "damage_kinds"] == "missing_file"
    assert set(cov.index[~cov["complete"]]) == {"lossy", "cut", "garbage", "nofile", "down", "broke", "waiting"}
    assert set(table["host"]) == {"ok", "gz", "lossy", "cut"}


def test_damaged_manifest_is_bad_input(reports):
    run = lab_run()
    run.manifest["hosts"] = ["lab1"]
    run.save()
    with pytest.raises(InputError, match="no valid 'hosts' table"):
        report.load(run)


# ---------------------------------------------------------------------------------------------- odd bytes

@pytest.mark.parametrize("data", HOSTILE + [bytes([b]) for b in range(256)])
def test_escape_is_printable_one_line_and_reversible(data):
    text = report.escape_bytes(data)
    assert text.isprintable()
    assert report.unescape_text(text) == data


def test_escape_round_trips_random_bytes():
    rng = random.Random(6)
    alphabet = b"\\xab\n\t\r\x1b\xc3\xa9\xff\x00\xe2\x80\xa8 =+-'\""  # escapes, UTF-8 pieces, U+2028
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert report.unescape_text(report.escape_bytes(data)) == data


def hostile_run():
    cap = CaptureBuilder("h1")
    for i, name in enumerate(HOSTILE):
        cap.lookup(Lookup(name, comm=HOSTILE[i % 8][:15], pid=1000 + i), i + 1)
    cap.lookup(Lookup(None, comm=b"=cmd|calc"), 1)  # a NULL name
    return make_run({"h1": ("captured", cap.bytes())})


def test_hostile_names_survive_csv_exactly(tmp_path):
    _, table, _ = report.build(hostile_run())
    text = csv_text(table, tmp_path)
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert "\x1b" not in text and "\t" not in text
    back = read_csv_text(text)
    assert len(back) == len(HOSTILE) + 1
    got = {report.unescape_text(unneutralise(n)): int(c) for n, c in zip(back["name"], back["lookups"], strict=True)
           if n != "\\N"}
    assert got == {name: i + 1 for i, name in enumerate(HOSTILE)}
    assert back.loc[back["name"] == "\\N", "process"].tolist() == ["'=cmd|calc"]
    processes = {report.unescape_text(unneutralise(p)) for p in back["process"]}
    assert processes == {h[:15] for h in HOSTILE[:8]} | {b"=cmd|calc"}


def test_formula_like_cells_are_neutralised(tmp_path):
    back = read_csv_text(csv_text(report.build(hostile_run())[1], tmp_path))
    names = set(back["name"])
    for cell in ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-1+2", "'@SUM(A1)", "''=already"]:
        assert cell in names
    assert "\\r=cr" in names  # CR is escaped, so the cell starts with a backslash: nothing to neutralise
    assert not any(n.startswith(tuple("=+-@\t\r")) for col in ("host", "process", "name") for n in back[col])
    assert (back["first_seen"].str.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")).all()


def test_hostile_names_survive_json_and_parquet(tmp_path):
    _, table, _ = report.build(hostile_run())
    render.write_json(table, tmp_path / "out.json")
    records = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert {report.unescape_text(r["name"]) for r in records if r["name"] != "\\N"} == set(HOSTILE)
    assert records[0]["first_seen"].endswith("Z") and list(records[0]) == CSV_COLUMNS
    render.write_parquet(table, tmp_path / "out.parquet")
    back = pd.read_parquet(tmp_path / "out.parquet")
    assert list(back.columns) == CSV_COLUMNS and back["lookups"].sum() == table["lookups"].sum()
    assert set(back["name"]) == set(table["name"])
    for name in ("out.json", "out.parquet"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_html_is_self_contained_and_escaped(tmp_path):
    cap = CaptureBuilder("h1").lookup(Lookup(b"<script>alert(1)</script>.lab", rc=-2), 3)
    cap.lookup(Lookup(b"ok.lab", comm=b"<img src=x>"), 2)
    run = make_run({"h1": ("captured", cap.bytes()), "h2": ("unreachable", None)})
    loaded = report.load(run)
    table = report.aggregate(loaded)
    render.write_html(tmp_path / "r.html", run_id=run.id, coverage=loaded.coverage, table=table,
                      by_name=report.aggregate(loaded, ["name"]), minutes=loaded.minutes,
                      histogram=loaded.histogram)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    assert "http" not in page.replace('lang="en"', "")  # nothing fetched from elsewhere
    assert page.count("<svg") == 4 and "1 of 2 hosts not completely captured" in page
    assert stat.S_IMODE(os.stat(tmp_path / "r.html").st_mode) == 0o600


# ---------------------------------------------------------------------------------------------- check

def _host(host: str, names: list[bytes]) -> CaptureBuilder:
    cap = CaptureBuilder(host)
    for n in names:
        cap.lookup(Lookup(n, pid=50), 2)
    return cap


def run_of(hosts: dict[str, tuple[str, list[bytes]]]):
    return make_run({h: (status, _host(h, names).bytes() if status != "unreachable" else None)
                     for h, (status, names) in hosts.items()})


def test_check_proven():
    loaded = report.load(run_of({"a": ("captured", [b"new-db.lab"]), "b": ("empty", [])}))
    result = report.check(loaded, ["old-db.*"], ["new-db.lab"])
    assert result.verdict == "proven" and result.offenders.empty and result.missing == []


def test_check_violated_lists_host_process_pid_count_last():
    loaded = report.load(run_of({"a": ("captured", [b"OLD-DB.lab", b"new-db.lab"]),
                                 "b": ("unreachable", [])}))
    result = report.check(loaded, ["old-db.*"], ["new-db.lab"])
    assert result.verdict == "violated"  # a seen violation wins over incomplete coverage
    row = result.offenders.iloc[0]
    assert (row["host"], row["process"], row["pid"], row["name"], row["lookups"]) == ("a", "curl", 50,
                                                                                     "OLD-DB.lab", 2)
    assert row["last_seen"] is not pd.NaT


def test_check_unproven_when_a_host_was_not_captured():
    for status in ("unreachable", "partial"):
        loaded = report.load(run_of({"a": ("captured", [b"new-db.lab"]), "b": (status, [b"x.lab"])}))
        result = report.check(loaded, ["old-db.*"])
        assert result.verdict == "unproven" and list(result.unproven["host"]) == ["b"]


def test_check_present_missing():
    complete = report.load(run_of({"a": ("captured", [b"x.lab"])}))
    assert report.check(complete, [], ["new-db.lab"]).verdict == "violated"
    incomplete = report.load(run_of({"a": ("captured", [b"x.lab"]), "b": ("unreachable", [])}))
    assert report.check(incomplete, [], ["new-db.lab"]).verdict == "unproven"
    with pytest.raises(UsageError):
        report.check(complete, [], [])


# ---------------------------------------------------------------------------------------------- diff

def test_diff_appeared_disappeared_changed_not_captured():
    before = run_of({"a": ("captured", [b"old-db.lab", b"same.lab", b"more.lab"]),
                     "b": ("captured", [b"old-db.lab"])})
    after_a = CaptureBuilder("a").lookup(Lookup(b"new-db.lab", pid=51), 1).lookup(Lookup(b"same.lab", pid=51), 2)
    after_a.lookup(Lookup(b"more.lab", pid=51, rc=-3), 9)
    after = make_run({"a": ("captured", after_a.bytes()), "b": ("unreachable", None)})
    d = report.diff(report.load(before), report.load(after))
    changes = {(r.host, r.name): r.change for r in d.itertuples()}
    assert changes == {("a", "new-db.lab"): "appeared", ("a", "old-db.lab"): "disappeared",
                       ("a", "more.lab"): "changed", ("b", "old-db.lab"): "not captured"}
    more = d[d["name"] == "more.lab"].iloc[0]
    assert (more["lookups_a"], more["lookups_b"], more["lookups_delta"], more["failed_b"]) == (2, 9, 7, 9)
    everything = report.diff(report.load(before), report.load(after), include_same=True)
    assert "same" in set(everything["change"])


def test_worker_processes_give_the_same_report():
    hosts = {f"h{i:02d}": ("captured", CaptureBuilder(f"h{i:02d}").lookup(Lookup(b"db.lab", pid=i), i + 1).bytes())
             for i in range(10)}
    hosts["down"] = ("unreachable", None)
    run = make_run(hosts)
    serial, parallel = report.load(run, workers=1), report.load(run, workers=2)
    pd.testing.assert_frame_equal(report.aggregate(serial), report.aggregate(parallel))
    pd.testing.assert_frame_equal(serial.coverage, parallel.coverage)
    assert report.aggregate(parallel)["lookups"].sum() == 55
