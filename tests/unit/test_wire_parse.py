"""W records (docs/capture-format.md): the DNS question decoded from real query packets built with struct, the wire
table's schema, damage, the header's name globs and sources, and hostile names surviving byte-exactly."""

from __future__ import annotations

import struct

import pandas as pd
import pytest

from fleet import capture_format as cf
from tests.captures import CaptureBuilder, Query, dns_query, reverse_query_name, wire_record

WIRE = ["libc", "wire"]


def parse(*queries: Query, **builder) -> cf.Capture:
    cap = CaptureBuilder("h1", sources=WIRE, **builder)
    for q in queries:
        cap.query(q)
    return cf.parse_capture(cap.bytes())


# ---------------------------------------------------------------------------------------------- decode_query

@pytest.mark.parametrize("name, qtype", [(b"db.lab", 1), (b"db.lab", 28), (reverse_query_name("10.213.0.5"), 12),
                                         (reverse_query_name("2001:db8::1"), 12), (b"", 2), (b"x.lab", 65)])
def test_decode_real_queries(name, qtype):
    q = cf.decode_query(dns_query(name, qtype, qid=0xBEEF))
    assert q == cf.Question(0xBEEF, name, qtype, False)


def test_odd_bytes_in_labels_are_kept_exactly():
    labels = [b"a.b", b"nul\x00byte", b"\xff\xfe", b"new\nline", bytes(range(1, 40))]
    q = cf.decode_query(dns_query(labels))
    assert q.name == b".".join(labels) and q.qtype == 1 and not q.truncated


def test_63_byte_labels_are_labels_64_is_not():
    q = cf.decode_query(dns_query([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]))  # 253 characters
    assert len(q.name) == 253 and q.qtype == 1 and not q.truncated
    with pytest.raises(ValueError, match="0x40"):
        cf.decode_query(dns_query([b"a" * 64]))


def test_a_253_character_name_fits_in_the_272_bytes_a_record_carries():
    packet = dns_query([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]) + b"\x00" * 11  # + an EDNS OPT record
    assert len(packet) > cf.WIRE_MAX
    q = cf.decode_query(packet[:cf.WIRE_MAX], sent=len(packet))
    assert len(q.name) == 253 and q.qtype == 1 and not q.truncated


def test_a_name_running_past_the_cut_is_kept_truncated():
    labels = [bytes([0x61 + i]) * 63 for i in range(5)]  # 5 × 64 bytes: more than any legal name
    packet = dns_query(labels)
    q = cf.decode_query(packet[:cf.WIRE_MAX], sent=len(packet))
    assert q.truncated and q.qtype is None
    assert q.name == b".".join([*labels[:4], b"eee"])  # 4 whole labels, then 3 bytes of the fifth
    # the name ends exactly at the cut: its terminating zero byte is missing
    assert cf.decode_query(packet[:12 + 64 * 4 + 1], sent=len(packet)).truncated
    # without a cut, the same bytes are damage
    with pytest.raises(ValueError, match="no end"):
        cf.decode_query(packet[:cf.WIRE_MAX - 1])


def test_a_name_complete_at_the_cut_has_an_unknown_type():
    packet = dns_query(b"db.lab")
    q = cf.decode_query(packet[:-3], sent=len(packet))
    assert q == cf.Question(0x1234, b"db.lab", None, False)


@pytest.mark.parametrize("payload, message", [
    (dns_query(b"db.lab")[:12] + b"\x02db\xc0\x0c\x00\x01\x00\x01", "compression pointer"),
    (dns_query(b"db.lab")[:12] + b"\x80abc", "reserved"),
    (b"\x12\x34\x01\x00", "header"),
    (dns_query(b"db.lab")[:-2], "no type"),
    (dns_query(b"db.lab")[:14], "no end"),
])
def test_undecodable_payloads_raise(payload, message):
    with pytest.raises(ValueError, match=message):
        cf.decode_query(payload)


def test_responses_and_packets_without_a_question_ask_nothing():
    assert cf.decode_query(dns_query(b"db.lab", flags=0x8180)) is None
    assert cf.decode_query(dns_query(b"db.lab", qdcount=0)) is None


# ---------------------------------------------------------------------------------------------- the wire table

def test_wire_schema_and_values():
    c = parse(Query(dns_query(b"DB.lab", 28, qid=7), comm=b"goapp", pid=42, tid=43, sid=1, t=5_000),
              Query(dns_query(reverse_query_name("10.213.0.5"), 12), server="::1", sid=4))
    assert dict(c.wire.dtypes.astype(str)) == cf.SCHEMAS["wire"]
    assert c.damage == {} and c.sources == WIRE and c.wire_scope == "all"
    first, second = (c.wire.iloc[i] for i in range(2))
    assert (first["pid"], first["tid"], first["comm"], first["syscall"], first["qid"], first["qtype"]) == (
        42, 43, "goapp", "write", 7, "AAAA")
    assert (first["name"], first["name_bytes"], first["server"]) == ("DB.lab", b"DB.lab", "10.213.0.2:53")
    assert (second["syscall"], second["server"], second["qtype"], second["name"]) == (
        "sendmmsg", "[::1]:53", "PTR", "5.0.213.10.in-addr.arpa")


def test_unknown_qtype_and_syscall_are_named_by_number():
    c = parse(Query(dns_query(b"x.lab", 99), sid=9))
    assert (c.wire.iloc[0]["qtype"], c.wire.iloc[0]["syscall"]) == ("TYPE99", "sid9")


def test_wire_time_is_boot_ns_plus_the_offset():
    from tests.captures import OFFSET

    c = parse(Query(dns_query(b"x.lab"), t=123_456))
    assert c.wire.iloc[0]["time"].value == OFFSET + 123_456


def test_truncated_query_row_is_kept_and_flagged():
    packet = dns_query([bytes([0x61 + i]) * 63 for i in range(5)])
    c = parse(Query(packet))
    row = c.wire.iloc[0]
    assert bool(row["truncated"]) and pd.isna(row["qtype"]) and len(row["name_bytes"]) == 259
    assert c.damage == {}


def test_bad_wire_and_bad_records_are_counted_and_dropped():
    good = Query(dns_query(b"ok.lab"))
    pointer = Query(dns_query(b"db.lab")[:12] + b"\x02db\xc0\x0c\x00\x01\x00\x01")
    response = Query(dns_query(b"answer.lab", flags=0x8180))
    record = wire_record(good).decode()
    fields = record.split(" ")
    wrong_len = " ".join(fields[:11] + ["9"] + fields[12:])  # says 9 bytes were sent, carries 24
    bad_hex = record.replace("\\x6f", "\\xzz", 1)
    cap = CaptureBuilder("h1", sources=WIRE).query(good).query(pointer).query(response)
    huge_pid = " ".join(fields[:2] + [str(2**63)] + fields[3:])
    huge_time = " ".join(["W", str(2**63 - 5)] + fields[2:])  # boot_ns + the offset overflows
    cap.lines += [b"W 1 2 3\n", wrong_len.encode(), bad_hex.encode(), huge_pid.encode(), huge_time.encode()]
    c = cf.parse_capture(cap.bytes())
    assert list(c.wire["name"]) == ["ok.lab"]  # the response is dropped without damage
    assert c.damage == {"bad_wire": 1, "bad_record": 5}


def test_payload_fields_may_be_empty_and_addresses_signed():
    short = wire_record(Query(dns_query(b"a.lab"), server="fe80::1")).decode()
    assert short.endswith("  \n")  # bytes1 and bytes2 empty
    cap = CaptureBuilder("h1", sources=WIRE)
    cap.lines.append(short.encode())
    c = cf.parse_capture(cap.bytes())
    assert c.wire.iloc[0]["server"] == "[fe80::1]:53"
    long_name = [b"x" * 63] * 3 + [b"y" * 60]
    c = parse(Query(dns_query(long_name)))
    assert c.wire.iloc[0]["name_bytes"] == b".".join(long_name)


def test_header_name_globs_apply_to_wire_rows():
    c = parse(Query(dns_query(b"DB.lab")), Query(dns_query(b"other.example")), name_globs=["db.*"])
    assert list(c.wire["name"]) == ["DB.lab"]


def test_sources_default_to_libc_for_older_captures():
    c = cf.parse_capture(CaptureBuilder("h1").bytes())
    assert c.sources == ["libc"] and c.wire_scope is None and c.wire.empty
    assert dict(c.wire.dtypes.astype(str)) == cf.SCHEMAS["wire"]
    odd = CaptureBuilder("h1", sources=["dns"]).bytes()
    assert cf.parse_capture(odd).sources == ["libc"]


def test_summary_mode_captures_carry_wire_rows_too():
    cap = CaptureBuilder("h1", mode="summary", sources=WIRE).summary_key(b"db.lab", buckets={20: 1})
    c = cf.parse_capture(cap.query(Query(dns_query(b"db.lab"))).bytes())
    assert len(c.wire) == 1 and c.summary.iloc[0]["lookups"] == 1


# ---------------------------------------------------------------------------------------------- hostile names

ODD = [b"a\nb", b"tab\there", b"comma,quote\"'", b"=cmd|x", b"esc\x1b[31m", b"\xff\xfe\x80", "bücher.de".encode(),
       b"x" * 63, b"", b"nul\x00", b"back\\x41slash", b"+1", b"@SUM(A1)", b"\r=cr"]


@pytest.mark.parametrize("name", ODD, ids=repr)
def test_hostile_names_in_w_records_round_trip_byte_exactly(name):
    c = parse(Query(dns_query([name] if name else []), comm=name[:15] or b"x"))
    row = c.wire.iloc[0]
    assert row["name_bytes"] == name and row["comm_bytes"] == (name[:15] or b"x").split(b"\0")[0]
    assert row["name"].isprintable() and c.damage == {}


def test_a_w_record_line_is_printable_ascii_whatever_the_name():
    line = wire_record(Query(dns_query([b"\n\x00\xff"]), comm=b"\n\t"))
    assert line.count(b"\n") == 1 and all(32 <= b < 127 for b in line[:-1])
    assert len(line.split(b" ")) == 17
    assert struct.unpack("<I", struct.pack("<I", int(line.split(b" ")[8])))[0] == 0x0200D50A
