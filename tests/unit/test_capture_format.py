"""The capture parser on hand-made captures: schema, odd bytes, summary snapshots, damage. No root needed."""

from __future__ import annotations

import pytest

from fleet import capture_format as cf
from fleet.errors import InputError
from fleet.probes import render, runner

OFFSET = 1_700_000_000_000_000_000
HEADER = {"host": "h1", "boot_id": "b", "backend": "bpftrace", "mode": "events", "wall_offset_ns": OFFSET}


def key_of(name: bytes | None, af: int = 0) -> int:
    """A name key (the probe uses FNV-1a; any distinct u64 will do for the parser)."""
    return hash((name, af)) % 2**64


def name_def(name: bytes | None, *, af: int = 0, length: int | None = None) -> bytes:
    """The N record(s) defining a name, as the probe prints them (two halves of 128 bytes)."""
    length = (-1 if name is None else len(name)) if length is None else length
    data = name or b""
    out = f"N {key_of(name, af)} {af} {length} 0 {cf.hex_bytes(data[:128])}\n".encode()
    if len(data) > 128:
        out += f"N {key_of(name, af)} {af} {length} 128 {cf.hex_bytes(data[128:256])}\n".encode()
    return out


def comm_ints(comm: bytes) -> tuple[int, int]:
    raw = comm.ljust(16, bytes(1))
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def event(t0: int, name: bytes | None, *, fid: int = 1, rc: int = 0, herr: int = 0, pid: int = 10,
          tid: int = 10, comm: bytes = b"python3", af: int = 0, length: int | None = None) -> bytes:
    """An E record preceded by its name's N record(s), as the bpftrace probe prints them."""
    c0, c1 = comm_ints(comm)
    return name_def(name, af=af, length=length) + (
        f"E {t0} {pid} {tid} 0 {fid} {rc} {herr} 1500 {key_of(name, af)} {c0} {c1}\n").encode()


def capture(*records: bytes, header: dict | None = None, trailer: bool = True) -> bytes:
    out = cf.header_line(header or HEADER) + b"B 1\n" + b"".join(records)
    if trailer:
        out += cf.trailer_line({"exit_status": 0, "lost": 0, "end_time_ns": OFFSET + 10})
    return out


ODD = [b"a\nb", b"tab\there", b"comma,quote\"'", b"=cmd|x", b"esc\x1b[31m", b"\xff\xfe\x80", "bücher.de".encode(),
       b"x" * 253, b""]


def test_events_schema_and_values():
    c = cf.parse_capture(capture(event(5, b"localhost"), event(6, b"nope", rc=-2)))
    assert dict(c.events.dtypes.astype(str)) == cf.SCHEMAS["events"]
    assert c.damage == {}
    first = c.events.iloc[0]
    assert first["name"] == "localhost" and first["function"] == "getaddrinfo" and first["ok"]
    assert first["time"].value == OFFSET + 5 and first["latency_ns"] == 1500 and first["comm"] == "python3"
    assert c.events.iloc[1]["result"] == "EAI_NONAME" and not c.events.iloc[1]["ok"]


@pytest.mark.parametrize("name", ODD, ids=repr)
def test_odd_names_round_trip_byte_exactly(name):
    c = cf.parse_capture(capture(event(5, name)))
    assert c.events.iloc[0]["name_bytes"] == name
    assert not c.events.iloc[0]["name_truncated"]
    assert c.damage == {}


def test_long_name_is_flagged_truncated():
    c = cf.parse_capture(capture(event(5, b"y" * 256, length=256)))
    row = c.events.iloc[0]
    assert row["name_truncated"] and row["name_bytes"] == b"y" * 256


def test_missing_second_half_and_missing_name_are_counted():
    first_half_only = event(5, b"z" * 200).split(b"\n")
    del first_half_only[1]
    c = cf.parse_capture(capture(b"\n".join(first_half_only), b"E 6 1 1 0 1 0 0 9 12345 0 0\n"))
    assert c.damage == {"incomplete_name": 1, "missing_name": 1}
    assert c.events.iloc[0]["name_bytes"] == b"z" * 128
    assert c.events.iloc[1]["name"] == f"<name {12345:016x}>"


def test_comm_odd_bytes_and_signed_halves():
    comm = b"a\nb,\xff\x1bcdefghijk"
    c0, c1 = comm_ints(comm)
    c = cf.parse_capture(capture(name_def(b"x"), f"E 5 1 1 0 1 0 0 9 {key_of(b'x')} {c0 - 2**64} {c1}\n".encode()))
    assert c.events.iloc[0]["comm_bytes"] == comm and c.damage == {}


def test_gethostby_results_and_reverse_names():
    c = cf.parse_capture(capture(
        event(1, b"vm", fid=3, rc=-1, herr=1), event(2, b"vm", fid=4, rc=34), event(3, b"vm", fid=2),
        event(4, b"\x7f\x00\x00\x01", fid=6, af=2), event(5, b"\x00" * 15 + b"\x01", fid=8, af=10)))
    assert list(c.events["result"]) == ["HOST_NOT_FOUND", "ERANGE", "OK", "OK", "OK"]
    assert list(c.events["name"])[3:] == ["127.0.0.1", "::1"]
    assert list(c.events["reverse"]) == [False, False, False, True, True]


def test_null_name():
    c = cf.parse_capture(capture(event(5, None)))
    assert c.events.iloc[0]["name_bytes"] is None and c.damage == {}


@pytest.mark.parametrize("blob, message", [
    (b"", "empty capture"),
    (b"hello\n", "not a fleetdns capture"),
    (b"H fleetdns-capture/2 {}\n", "version 2 is not supported"),
    (b"H fleetdns-capture/1 [1]\n", "not a JSON object"),
])
def test_bad_headers_raise_input_error(blob, message):
    with pytest.raises(InputError, match=message):
        cf.parse_capture(blob)


def test_damage_is_counted_not_raised():
    blob = capture(event(5, b"ok1"), b"garbage line\n", b"E 1 2 3\n", b"N 1 0 3 0 \\xzz\\x41\n",
                   b"Q something new\n", b"W 1 2 3\n", event(6, b"ok2"), trailer=False)
    blob += event(7, b"cut")[:-5]  # a truncated last line
    c = cf.parse_capture(blob)
    assert list(c.events["name"]) == ["ok1", "ok2"]
    assert c.damage == {"unknown_record": 2, "bad_record": 3, "truncated_line": 1,
                        "no_trailer": 1}


def test_bad_event_records_are_counted_in_the_bulk_reader():
    good = event(5, b"ok1")
    key, c0 = key_of(b"ok1"), comm_ints(b"python3")[0]
    blob = capture(good, f"E 6 10 10 0 1 0 0 1500 {key} {c0}\n".encode(),  # 10 fields
                   f"E 7 10 10 0 1 0 0  {key} {c0} 0\n".encode(),  # an empty field
                   f"E 8 10 10 0 1 0 0 1500 {key} {c0} 0 9\n".encode(),  # 12 fields
                   b"E\n", b"T [1, 2]\n", event(9, b"ok2"))
    c = cf.parse_capture(blob)
    assert list(c.events["name"]) == ["ok1", "ok2"]
    assert c.damage == {"bad_record": 5}
    not_int = capture(good, f"E x 10 10 0 1 0 0 1500 {key} {c0} 0\n".encode(),
                      f"E 8 10 10 0 1 0 0 1500 zz {c0} 0\n".encode(), event(9, b"ok2"))
    c = cf.parse_capture(not_int)
    assert list(c.events["name"]) == ["ok1", "ok2"] and c.damage == {"bad_record": 2}


def test_records_after_the_trailer_are_counted_not_read():
    blob = capture(event(5, b"a")) + event(6, b"b") + b"L 4\n"
    c = cf.parse_capture(blob)
    assert list(c.events["name"]) == ["a"] and c.lost == 0
    assert c.damage == {"after_trailer": 3}  # the N record, the E record, the L record


def test_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="cannot read capture"):
        cf.parse_capture(tmp_path / "missing.capture")


def test_lost_events_from_records_and_trailer():
    c = cf.parse_capture(capture(event(5, b"a"), b"L 7\n", b"L 3\n"))
    assert c.lost == 10


def summary_capture(*, cut: bool = False) -> bytes:
    """A summary capture the way the runner writes it: N definitions, two snapshots, per-minute rows."""
    key = key_of(b"localhost")
    signed = key - 2**64 if key >= 2**63 else key  # map dumps print keys signed
    c0, c1 = comm_ints(b"cu,rl\n")
    k = f"10 0 1 {signed} {c0} {c1}"
    rows = [f"X {k} 12 3", f"X {k} 14 1", f"F {k} -2 0 1", f"A {k} 100", f"Z {k} 900"]
    body = [name_def(b"localhost").decode().strip(), "S 50 totals", f"X {k} 12 1", "Y 51",
            f"M {k} {OFFSET // 60_000_000_000} 4", "S 1000 end", *rows, "Y 1001"]
    if cut:
        body += ["S 2000 totals", rows[0]]
    text = "\n".join(body) + "\n"
    return capture(text.encode(), header={**HEADER, "mode": "summary"})


def test_summary_tables():
    c = cf.parse_capture(summary_capture())
    assert c.damage == {}
    for table in ("summary", "histogram", "minutes"):
        assert dict(getattr(c, table).dtypes.astype(str)) == cf.SCHEMAS[table]
    row = c.summary.iloc[0]
    assert (row["name"], row["comm_bytes"], row["lookups"], row["failures"]) == ("localhost", b"cu,rl\n", 4, 1)
    assert row["first_time"].value == OFFSET + 100 and row["last_time"].value == OFFSET + 900
    assert sorted(c.histogram["bucket"]) == [12, 14]
    assert c.minutes.iloc[0]["count"] == 4


def test_summary_cut_snapshot_uses_last_complete_one():
    c = cf.parse_capture(summary_capture(cut=True))
    assert c.damage == {"incomplete_snapshot": 1}
    assert c.summary.iloc[0]["lookups"] == 4


def test_events_summary_matches_event_counts():
    c = cf.parse_capture(capture(event(5, b"a"), event(6, b"a", rc=-2), event(7, b"b", pid=11)))
    s = c.summary.set_index("name")
    assert (s.loc["a", "lookups"], s.loc["a", "failures"], s.loc["b", "lookups"]) == (2, 1, 1)
    assert c.histogram["count"].sum() == 3 and c.minutes["count"].sum() == 3


def test_runner_map_line_to_record():
    assert runner._map_record(b"@fail[10, 0, 1, -5, 7, 0, -2, 0]: 3\n") == b"F 10 0 1 -5 7 0 -2 0 3\n"
    assert runner._map_record(b"@lat[10, 0, 1, -5, 12") is None


def test_display_names_for_the_live_table():
    names: dict[int, str] = {}
    for line in name_def(b"a\nb" + b"y" * 300, length=256).splitlines() + name_def(b"\x7f\0\0\1", af=2).splitlines():
        cf.add_display_name(names, line)
    assert names[key_of(b"\x7f\0\0\1", 2)] == "127.0.0.1"
    assert names[key_of(b"a\nb" + b"y" * 300)] == "a\\nb" + "y" * 253 + "…"


@pytest.mark.parametrize("glob, name, hit", [
    ("*.example.com", b"WWW.Example.com", True), ("*.example.com", b"example.com", False),
    ("api*", b"api.x", True), ("a?c", b"abc", True), ("a?c", b"abcd", False), ("pre*suf", b"presuf", True),
])
def test_glob_semantics(glob, name, hit):
    assert render.name_matches(name, [glob]) is hit


@pytest.mark.parametrize("opts", [{"names": ("*a*",)}, {"names": ("[ab]",)}, {"names": ("",)},
                                  {"backend": "dtrace"}, {"mode": "both"}, {"cgroup": "/x", "backend": "stap"}])
def test_bad_options_are_usage_errors(opts):
    from fleet.errors import UsageError

    with pytest.raises(UsageError):
        render.render(render.ProbeOptions(**opts))
