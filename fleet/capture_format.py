"""The fleetdns capture format, version 1 (``docs/capture-format.md`` is the spec; keep the two in step).

A capture is UTF-8-safe ASCII text, one record a line, the record type first::

    H fleetdns-capture/1 {json header}
    B <boot_ns>                                   probes attached
    N <namekey> <af> <len> <offset> <bytes>       the name behind a name key (once per key; offset 0 / 128)
    E <boot_ns> <pid> <tid> <uid> <fid> <rc> <herr> <latency_ns> <namekey> <comm0> <comm1>
    S <boot_ns> minute|totals|end  …  Y <boot_ns>  summary: one dump of the in-kernel maps
    X|A|Z|F|M <pid> <uid> <fid> <namekey> <comm0> <comm1> …   summary rows (histogram, first, last,
                                                  failures, minutes)
    L <count>                                     the backend reported this many lost events here
    W <boot_ns> <pid> <tid> <uid> <sid> <fd> <af> <addr0> <addr1> <port> <len> <comm0> <comm1> <b0> <b1> <b2>
                                                  one DNS query packet a process sent to UDP port 53
    T {json trailer}

``<bytes>`` is ``\\xNN`` per byte, nothing else: any byte survives. ``<comm0> <comm1>`` are comm's bytes 0-7
and 8-15 as little-endian u64 (decimal; cut at the first NUL). Name keys are u64 (a map dump may print them
signed: read modulo 2^64).

Write side (stdlib only, used by the runner on hosts): :func:`header_line`, :func:`trailer_line`,
:func:`hex_bytes`, :func:`decode_hex`, :func:`result_name`.

Read side: :func:`parse_capture` (bytes or a path → :class:`Capture`; pandas is imported only here), with one
column→dtype map per table in :data:`SCHEMAS`, applied at read time:

* ``events``: one row per lookup (events mode).
* ``summary``: one row per (pid, uid, comm, function, name) (summary mode; events-mode captures get the
  same table computed from their events, so the two modes compare directly).
* ``histogram``: per key, ``bucket`` = floor(log2(latency_ns)) and its ``count``.
* ``minutes``: per key, the wall-clock ``minute`` (UTC, start) and its ``count``.
* ``wire``: one row per DNS query packet (``W`` records, both modes), its question decoded by
  :func:`decode_query`.

Strict about the format version (a wrong or missing header raises :class:`~fleet.errors.InputError`), lenient
about damage: a truncated last line, garbage, an unknown record type are counted in ``Capture.damage`` and
skipped, never raised.
"""

from __future__ import annotations

import collections
import dataclasses
import errno as errno_mod
import ipaddress
import json
import os
import re
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from fleet.errors import InputError

if TYPE_CHECKING:  # pandas is only needed to read; hosts writing captures may not have it
    import numpy as np
    import pandas as pd

FORMAT = "fleetdns-capture"
VERSION = 1
HEADER_PREFIX = f"H {FORMAT}/".encode()
HALF = 128  # bytes of a name in one N record; the rest follows in a second N record at offset 128
NAME_MAX = 256  # a length of NAME_MAX means "at least NAME_MAX": truncated

#: Function ids of the probe (fleet/probes/render.py FUNCTIONS); never renumbered.
FUNCTIONS = {1: "getaddrinfo", 2: "gethostbyname", 3: "gethostbyname2", 4: "gethostbyname_r",
             5: "gethostbyname2_r", 6: "gethostbyaddr", 7: "gethostbyaddr_r", 8: "getnameinfo"}
_EAI = {0: "OK", -1: "EAI_BADFLAGS", -2: "EAI_NONAME", -3: "EAI_AGAIN", -4: "EAI_FAIL", -6: "EAI_FAMILY",
        -7: "EAI_SOCKTYPE", -8: "EAI_SERVICE", -10: "EAI_MEMORY", -11: "EAI_SYSTEM", -12: "EAI_OVERFLOW",
        -5: "EAI_NODATA", -9: "EAI_ADDRFAMILY", -100: "EAI_INPROGRESS", -101: "EAI_CANCELED",
        -102: "EAI_NOTCANCELED", -103: "EAI_ALLDONE", -104: "EAI_INTR", -105: "EAI_IDN_ENCODE"}
_HERRNO = {1: "HOST_NOT_FOUND", 2: "TRY_AGAIN", 3: "NO_RECOVERY", 4: "NO_DATA", -1: "NETDB_INTERNAL"}
_HEX_RE = re.compile(rb"(?:\\x[0-9a-f]{2})*")

#: W records: the payload bytes a record carries at most, the sending syscalls and the question types named
WIRE_MAX = 272
SYSCALLS = {1: "write", 2: "sendto", 3: "sendmsg", 4: "sendmmsg"}
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 64: "SVCB",
          65: "HTTPS", 255: "ANY"}


# ---------------------------------------------------------------------------------------------- write side

def hex_bytes(data: bytes) -> str:
    """Encode bytes as the format's ``\\xNN`` string (what bpftrace's ``%rx`` prints)."""
    return "".join(f"\\x{b:02x}" for b in data)


def decode_hex(token: bytes | str) -> bytes:
    """Decode a ``\\xNN…`` token; raises ValueError on anything else."""
    if isinstance(token, str):
        token = token.encode("ascii")
    if not _HEX_RE.fullmatch(token):
        raise ValueError(f"not a \\xNN byte string: {token[:40]!r}")
    return bytes.fromhex(token.replace(b"\\x", b"").decode("ascii"))


def header_line(fields: dict[str, Any]) -> bytes:
    """The header record. ``fields`` are the header fields of docs/capture-format.md (JSON-serialisable)."""
    return f"H {FORMAT}/{VERSION} ".encode() + json.dumps(fields, sort_keys=True).encode() + b"\n"


def trailer_line(fields: dict[str, Any]) -> bytes:
    """The trailer record (end time, exit status, lost count, …), the last line of a complete capture."""
    return b"T " + json.dumps(fields, sort_keys=True).encode() + b"\n"


def result_name(fid: int, rc: int, herr: int) -> str:
    """The result of one lookup as a name: ``OK``, ``EAI_*`` (getaddrinfo, getnameinfo), an ``h_errno``
    name (gethostby*), an errno name (``*_r`` returning one, e.g. ``ERANGE``) or ``FAILED`` (NULL, no h_errno)."""
    if fid in (1, 8):
        return _EAI.get(rc, f"EAI_{rc}")
    if rc == 0 and herr == 0:
        return "OK"
    if rc > 0:
        return errno_mod.errorcode.get(rc, f"errno {rc}")
    if herr:
        return _HERRNO.get(herr, f"h_errno {herr}")
    return "FAILED"


def comm_bytes(c0: int, c1: int) -> bytes:
    """Comm from its two u64 halves (as printed: decimal, possibly signed), cut at the first NUL."""
    return ((c0 % 2**64).to_bytes(8, "little") + (c1 % 2**64).to_bytes(8, "little")).split(b"\0", 1)[0]


def add_display_name(names: dict[int, str], line: bytes) -> None:
    """Record an N line's name (as display text) in ``names`` (name key → text); a bad line is ignored."""
    try:
        key, af, length, offset, data = line.rstrip(b"\n").split(b" ")[1:]
        raw = decode_hex(data)
    except ValueError:
        return
    key = int(key) % 2**64
    if int(af):
        names[key] = reverse_name(int(af), raw)
    elif int(offset) == 0:
        names[key] = display_bytes(raw) + ("…" if int(length) > len(raw) else "")
    else:
        names[key] = names.get(key, "").rstrip("…") + display_bytes(raw) + ("…" if int(length) >= NAME_MAX else "")


def display_bytes(data: bytes) -> str:
    """A name or comm as text: UTF-8 where valid, ``\\xNN`` for other bytes, control bytes escaped too."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reverse_name(af: int, addr: bytes) -> str:
    """The textual address of a reverse lookup (``af`` 2 = AF_INET, 10 = AF_INET6)."""
    if af == 2 and len(addr) == 4:
        return str(ipaddress.IPv4Address(addr))
    if af == 10 and len(addr) == 16:
        return str(ipaddress.IPv6Address(addr))
    return f"af{af}:{addr.hex()}"


class Question(NamedTuple):
    """The first question of a DNS query packet.

    ``qid``: the message id; ``name``: the labels' exact bytes joined with ``.`` (no trailing dot; the root is
    ``b""``); ``qtype``: the question type, None when the payload ends before it; ``truncated``: the payload was
    cut inside the name, so ``name`` holds only its first labels (the last one possibly partial)."""

    qid: int
    name: bytes
    qtype: int | None
    truncated: bool


def decode_query(payload: bytes, sent: int | None = None) -> Question | None:
    """The question of a DNS query packet (the first ``min(sent, WIRE_MAX)`` bytes a process sent to port 53).

    ``sent`` is the length the process sent (a W record's ``len``): a payload shorter than that was cut, and a
    name running past its end is kept, flagged ``truncated``. Without ``sent`` a payload of ``WIRE_MAX`` bytes
    counts as cut. Returns None for a packet that asks nothing (a response: QR bit set; no question). Raises
    ValueError for one that cannot be decoded: shorter than the 12-byte header, a compression pointer or a
    reserved label type (length byte ≥ 0x40) in the question name, or a question that ends early without a cut.
    """
    if len(payload) < 12:
        raise ValueError("shorter than a DNS header")
    qid, flags, qdcount = struct.unpack_from("!HHH", payload)
    if flags & 0x8000 or qdcount == 0:
        return None
    cut = len(payload) < sent if sent is not None else len(payload) >= WIRE_MAX
    labels: list[bytes] = []
    pos = 12
    while pos < len(payload) and payload[pos]:
        length = payload[pos]
        if length >= 0x40:
            raise ValueError(f"label length byte {length:#04x} (compression pointer or reserved type)")
        labels.append(payload[pos + 1:pos + 1 + length])
        pos += 1 + length
    name = b".".join(labels)
    if pos >= len(payload):  # no terminating zero byte: the name runs past the end
        if not cut:
            raise ValueError("the question name has no end")
        return Question(qid, name, None, True)
    pos += 1
    if pos + 4 > len(payload):
        if not cut:
            raise ValueError("the question has no type and class")
        qtype = struct.unpack_from("!H", payload, pos)[0] if pos + 2 <= len(payload) else None
        return Question(qid, name, qtype, False)
    return Question(qid, name, struct.unpack_from("!H", payload, pos)[0], False)


def qtype_name(qtype: int | None) -> str | None:
    """``A``, ``AAAA``, ``PTR``… (:data:`QTYPES`), else ``TYPE<n>`` (RFC 3597); None stays None."""
    return None if qtype is None else QTYPES.get(qtype, f"TYPE{qtype}")


def wire_server(af: int, addr0: int, addr1: int, port: int) -> str | None:
    """A W record's destination as ``10.213.0.2:53`` or ``[::1]:53``; None for an unknown family."""
    if af == 2:
        return f"{ipaddress.IPv4Address(struct.pack('<I', addr0 % 2**32))}:{port}"
    if af == 10:
        return f"[{ipaddress.IPv6Address(struct.pack('<QQ', addr0 % 2**64, addr1 % 2**64))}]:{port}"
    return None


# ---------------------------------------------------------------------------------------------- read side

_KEY = {"host": "category", "pid": "Int64", "uid": "Int64", "comm": "category", "comm_bytes": "object",
        "function": "category", "name": "category", "name_bytes": "object", "name_truncated": "boolean",
        "reverse": "boolean"}

#: One column→dtype map per table; :func:`parse_capture` builds every table through it.
SCHEMAS: dict[str, dict[str, str]] = {
    "events": {"time": "datetime64[ns, UTC]", "boot_ns": "Int64", "host": "category", "pid": "Int64",
               "tid": "Int64", "uid": "Int64", "comm": "category", "comm_bytes": "object",
               "function": "category", "name": "category", "name_bytes": "object",
               "name_truncated": "boolean", "reverse": "boolean", "result": "category", "ok": "boolean",
               "rc": "Int32", "herr": "Int32", "latency_ns": "Int64"},
    "summary": {**_KEY, "lookups": "Int64", "failures": "Int64", "first_time": "datetime64[ns, UTC]",
                "last_time": "datetime64[ns, UTC]"},
    "histogram": {**_KEY, "bucket": "Int8", "count": "Int64"},
    "minutes": {**_KEY, "minute": "datetime64[ns, UTC]", "count": "Int64"},
    "wire": {"time": "datetime64[ns, UTC]", "host": "category", "pid": "Int64", "tid": "Int64", "uid": "Int64",
             "comm": "category", "comm_bytes": "object", "syscall": "category", "server": "string",
             "qid": "Int64", "qtype": "category", "name": "category", "name_bytes": "object",
             "truncated": "boolean"},
}


@dataclasses.dataclass
class Capture:
    """A parsed capture: header and trailer (dicts; trailer None when missing), the five tables, the
    backend's lost-event count (``L`` records, or the trailer's when larger) and damage counts by kind."""

    header: dict[str, Any]
    trailer: dict[str, Any] | None
    events: pd.DataFrame
    summary: pd.DataFrame
    histogram: pd.DataFrame
    minutes: pd.DataFrame
    wire: pd.DataFrame
    lost: int
    damage: dict[str, int]

    @property
    def mode(self) -> str:
        return self.header.get("mode", "events")

    @property
    def sources(self) -> list[str]:
        """The header's ``sources`` (``libc``, ``wire``); ``["libc"]`` when absent or not a list of names."""
        value = self.header.get("sources")
        if isinstance(value, list) and value and all(v in ("libc", "wire") for v in value):
            return list(value)
        return ["libc"]

    @property
    def wire_scope(self) -> str | None:
        """The header's ``wire_scope``: ``all``, ``netns:<inode>``, or None (the wire source was off)."""
        value = self.header.get("wire_scope")
        return value if isinstance(value, str) and "wire" in self.sources else None


def _frame(table: str, rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Build one table from rows (or a frame), in the column order and dtypes of SCHEMAS[table]."""
    import pandas as pd

    schema = SCHEMAS[table]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=list(schema))
    out = {}
    for col, dtype in schema.items():
        current = df[col].dtype
        if str(current) == dtype or (dtype == "category" and isinstance(current, pd.CategoricalDtype)):
            out[col] = df[col]  # already right: skip the copy
        elif dtype.startswith("datetime64"):
            if isinstance(df[col].dtype, pd.DatetimeTZDtype):
                out[col] = df[col].dt.tz_convert("UTC").astype(dtype)
            else:  # integer epoch ns (None for unknown)
                out[col] = pd.to_datetime(df[col].astype("Int64"), unit="ns", utc=True).astype(dtype)
        elif dtype == "object":
            out[col] = df[col].astype(object)
        else:
            out[col] = df[col].astype(dtype)
    return pd.DataFrame(out, columns=list(schema))


def _read_header(first: bytes) -> dict[str, Any]:
    if not first.startswith(HEADER_PREFIX):
        raise InputError("not a fleetdns capture (no 'H fleetdns-capture/N' header line)")
    version_text, _, rest = first[len(HEADER_PREFIX):].partition(b" ")
    if not version_text.isdigit():
        raise InputError("capture header has no format version")
    if int(version_text) != VERSION:
        raise InputError(f"capture format version {int(version_text)} is not supported "
                         f"(this fleetdns reads version {VERSION})", hint="use a matching fleetdns")
    try:
        header = json.loads(rest)
    except ValueError:
        raise InputError("capture header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError("capture header is not a JSON object")
    return header


class _Names:
    """Reassembles names from N records: name key → (af, length, {offset: bytes})."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[int, bytes]] = collections.defaultdict(dict)
        self.meta: dict[int, tuple[int, int]] = {}

    def add(self, key: int, af: int, length: int, offset: int, data: bytes) -> None:
        self.meta[key] = (af, length)
        self.parts[key][offset] = data


class _NameColumns:
    """Name key → the name columns of a row (cached); counts ``missing_name`` / ``incomplete_name``."""

    def __init__(self, names: _Names, damage: collections.Counter[str], name_max: int = NAME_MAX) -> None:
        # name_max: a truncated name carries its first min(name_max, NAME_MAX) bytes (header field, stap's
        # bpf runtime reads only 64)
        self.names, self.damage, self.cache, self.name_max = names, damage, {}, min(name_max, NAME_MAX)

    def __call__(self, key: int) -> dict[str, Any]:
        if key not in self.cache:
            self.cache[key] = self._columns(key)
        return self.cache[key]

    def _columns(self, key: int) -> dict[str, Any]:
        if key not in self.names.meta:
            self.damage["missing_name"] += 1
            return {"name": f"<name {key:016x}>", "name_bytes": None, "name_truncated": False, "reverse": False}
        af, length = self.names.meta[key]
        if length < 0:
            return {"name": None, "name_bytes": None, "name_truncated": False, "reverse": af != 0}
        parts = self.names.parts[key]
        data = parts.get(0, b"") + parts.get(HALF, b"")
        if len(data) != min(length, self.name_max):
            self.damage["incomplete_name"] += 1
        return {"name": reverse_name(af, data) if af else display_bytes(data), "name_bytes": data,
                "name_truncated": length >= NAME_MAX, "reverse": af != 0}


def _comm_columns(c0: int, c1: int) -> dict[str, Any]:
    comm = comm_bytes(c0, c1)
    return {"comm": display_bytes(comm), "comm_bytes": comm}


def parse_capture(source: bytes | str | os.PathLike[str]) -> Capture:
    """Parse a capture (its bytes, or a file path) into a :class:`Capture`.

    Raises InputError for an unreadable file, a missing header or another format version; every other
    problem is counted in ``damage``: ``truncated_line`` (last line without newline), ``bad_record``
    (a known type with wrong fields), ``unknown_record`` (a type this version does not know), ``bad_wire``
    (a W record whose payload is no decodable DNS query), ``missing_name`` (a name key without N record: its
    ``name`` is ``<name KEY>``), ``incomplete_name``, ``no_trailer``, ``after_trailer``,
    ``row_outside_snapshot``, ``incomplete_snapshot`` (summary: a dump was cut; the last complete one is used).
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                source = f.read()
        except OSError as e:
            raise InputError(f"cannot read capture {os.fspath(source)}: {e.strerror}") from None
    data: bytes = source
    damage: collections.Counter[str] = collections.Counter()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        damage["truncated_line"] += 1  # the last line has no newline: cut off mid-write
    if end == 0:
        raise InputError("empty capture (no header line)")
    view = memoryview(data)[:end]  # slices of a memoryview copy nothing; re reads it as bytes
    first = data.find(b"\n")
    header = _read_header(data[:first])
    host = header.get("host")
    offset = int(header.get("wall_offset_ns", 0))
    body = view[first + 1:]

    trailer = None
    for m in _T_RE.finditer(body):
        try:
            value = json.loads(m.group(1))
        except ValueError:
            continue  # left in the body: counted as bad_record below
        if isinstance(value, dict):
            trailer = value
            damage["after_trailer"] += body[m.end() + 1:].tobytes().count(b"\n")
            body = body[:m.start()]
            break
    # E records are most of a capture: matched in C here and parsed in bulk; the rest goes line by line
    events: list[bytes] = _E_RE.findall(body)
    lines = _OTHER_RE.findall(body[:-1]) if len(body) else []
    lost = 0
    names = _Names()
    snapshot: list[list[Any]] | None = None
    snapshot_kind = ""
    snapshots: list[tuple[str, list[list[Any]]]] = []
    cut_snapshot = False
    minute_rows: list[list[Any]] = []
    wire_rows: list[tuple[Any, ...]] = []

    for line in lines:
        kind, _, rest = line.partition(b" ")
        fields = rest.split(b" ")
        try:
            if kind in (b"E", b"T"):  # an E record without fields, a trailer that is not a JSON object
                raise ValueError
            elif kind == b"N":
                if len(fields) != 5:
                    raise ValueError
                key, af, length, off = (int(x) for x in fields[:4])
                names.add(key % 2**64, af, length, off, decode_hex(fields[4]))
            elif kind in _SUMMARY_FIELDS:
                if len(fields) != 6 + _SUMMARY_FIELDS[kind]:
                    raise ValueError
                row = [kind, *(int(x) for x in fields)]
                if kind == b"M":
                    minute_rows.append(row)
                elif snapshot is not None:
                    snapshot.append(row)
                else:
                    damage["row_outside_snapshot"] += 1
            elif kind == b"S":
                if len(fields) != 2:
                    raise ValueError
                int(fields[0])
                if snapshot is not None:
                    cut_snapshot = True
                snapshot_kind = fields[1].decode("ascii", "replace")
                snapshot = [] if snapshot_kind in ("totals", "end") else None
            elif kind == b"Y":
                if snapshot is not None:
                    snapshots.append((snapshot_kind, snapshot))
                snapshot = None
            elif kind == b"L":
                if len(fields) != 1:
                    raise ValueError
                lost += int(fields[0])
            elif kind == b"B":
                int(fields[0])
            elif kind == b"W":
                if len(fields) != 16:
                    raise ValueError
                numbers = [int(x) for x in fields[:13]]
                payload = decode_hex(b"".join(fields[13:]))  # three \xNN fields: one string when joined
                # int64 columns (addresses and comm halves are u64, read modulo 2^64); the time must fit too
                if len(payload) != min(numbers[10], WIRE_MAX) or not all(
                        -2**63 <= n < 2**63 for n in (*numbers[:7], numbers[9], numbers[0] + offset)):
                    raise ValueError
                wire_rows.append((*numbers, payload))
            else:
                damage["unknown_record"] += 1
        except (ValueError, UnicodeDecodeError):
            damage["bad_record"] += 1
    if snapshot is not None or cut_snapshot:
        damage["incomplete_snapshot"] += 1
    if trailer is None:
        damage["no_trailer"] += 1
    else:
        lost = max(lost, int(trailer.get("lost", 0) or 0))

    name_cols = _NameColumns(names, damage, int(header.get("name_max", NAME_MAX)))
    events_df = _events_frame(host, offset, events, name_cols, damage)

    if header.get("mode") == "summary":
        summary_df, hist_df, minutes_df = _summary_tables(host, snapshots, minute_rows, name_cols, offset)
    else:
        summary_df, hist_df, minutes_df = summarize_events(events_df)
    filters = header.get("filters")
    globs = filters.get("names") if isinstance(filters, dict) else None
    wire_df = _wire_frame(host, offset, wire_rows, damage, globs if isinstance(globs, list) else [])
    return Capture(header, trailer, events_df, summary_df, hist_df, minutes_df, wire_df, lost,
                   {k: v for k, v in damage.items() if v})


_E_RE = re.compile(rb"^E (.*)$", re.M)
_T_RE = re.compile(rb"^T (.*)$", re.M)
_OTHER_RE = re.compile(rb"^(?!E ).*$", re.M)
_SUMMARY_FIELDS = {b"X": 2, b"A": 1, b"Z": 1, b"F": 3, b"M": 2}  # numbers after the 6 key fields


def _summary_tables(host, snapshots, minute_rows, name_cols, offset):
    """Summary-mode tables from the last complete end (else totals) snapshot and all per-minute rows."""
    chosen = next((rows for kind, rows in reversed(snapshots) if kind == "end"), None)
    if chosen is None and snapshots:
        chosen = snapshots[-1][1]

    def key_cols(pid: int, uid: int, fid: int, namekey: int, c0: int, c1: int) -> dict[str, Any]:
        return {"host": host, "pid": pid, "uid": uid, **_comm_columns(c0, c1),
                "function": FUNCTIONS.get(fid, f"fn{fid}"), **name_cols(namekey % 2**64)}

    agg: dict[tuple, dict[str, Any]] = {}
    hist_rows = []
    for kind, *row in chosen or []:
        k, vals = tuple(row[:6]), row[6:]
        totals = agg.setdefault(k, {"lookups": 0, "failures": 0, "first_time": None, "last_time": None})
        if kind == b"X":
            totals["lookups"] += vals[1]
            hist_rows.append({**key_cols(*k), "bucket": vals[0], "count": vals[1]})
        elif kind == b"F":
            totals["failures"] += vals[2]
        elif kind == b"A":
            totals["first_time"] = vals[0] + offset
        elif kind == b"Z":
            totals["last_time"] = vals[0] + offset
    summary_rows = [{**key_cols(*k), **v} for k, v in agg.items()]
    minutes: collections.Counter[tuple] = collections.Counter()
    for _kind, *row in minute_rows:
        minutes[tuple(row[:7])] += row[7]
    minute_out = [{**key_cols(*k[:6]), "minute": k[6] * 60_000_000_000, "count": c} for k, c in minutes.items()]
    return _frame("summary", summary_rows), _frame("histogram", hist_rows), _frame("minutes", minute_out)


def _wire_frame(host: str | None, offset: int, records: list[tuple[Any, ...]], damage: collections.Counter[str],
                globs: list[str]) -> pd.DataFrame:
    """The wire table from W records' fields (one row per query packet): responses and packets without a
    question are left out, undecodable payloads counted as ``bad_wire``, names outside the header's name globs
    left out (the probe filters libc names in the kernel; its wire side cannot). Comms, servers and display names
    are decoded once per distinct value."""
    from fleet.probes.render import name_matches

    rows = []
    comms: dict[tuple[int, int], tuple[bytes, str]] = {}
    names: dict[bytes, str | None] = {}
    servers: dict[tuple[int, int, int, int], str | None] = {}
    for boot_ns, pid, tid, uid, sid, _fd, af, addr0, addr1, port, sent, c0, c1, payload in records:
        try:
            question = decode_query(payload, sent)
        except ValueError:
            damage["bad_wire"] += 1
            continue
        if question is None:
            continue
        if question.name not in names:  # display text, or None when the name globs leave the name out
            names[question.name] = display_bytes(question.name) if name_matches(question.name, globs) else None
        if names[question.name] is None:
            continue
        if (c0, c1) not in comms:
            raw = comm_bytes(c0, c1)
            comms[c0, c1] = (raw, display_bytes(raw))
        comm, comm_text = comms[c0, c1]
        server_key = (af, addr0, addr1, port)
        if server_key not in servers:
            servers[server_key] = wire_server(*server_key)
        rows.append({"time": boot_ns + offset, "host": host, "pid": pid, "tid": tid, "uid": uid,
                     "comm": comm_text, "comm_bytes": comm, "syscall": SYSCALLS.get(sid, f"sid{sid}"),
                     "server": servers[server_key], "qid": question.qid, "qtype": qtype_name(question.qtype),
                     "name": names[question.name], "name_bytes": question.name,
                     "truncated": question.truncated})
    return _frame("wire", rows)


_E_COLUMNS = ["t0", "pid", "tid", "uid", "fid", "rc", "herr", "latency_ns", "namekey", "comm0", "comm1"]
#: name key and comm halves are u64 that may be printed signed or unsigned: read as text, decoded once per value
_E_TEXT = ("namekey", "comm0", "comm1")


def _read_e_records(records: list[bytes], damage: collections.Counter[str]) -> pd.DataFrame:
    """E record fields (after the type) → a frame of int64 columns and text u64 columns, by pyarrow's CSV
    reader in one pass. Records with another field count or an empty field are dropped and counted as
    ``bad_record``; a non-integer field makes the whole batch be re-read without the bad records."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    wrong_count = 0

    def skip(_row) -> str:
        nonlocal wrong_count
        wrong_count += 1
        return "skip"

    text = pa.dictionary(pa.int32(), pa.string())  # few distinct values: arrive as pandas categoricals
    types = {c: (text if c in _E_TEXT else pa.int64()) for c in _E_COLUMNS}
    read = pacsv.ReadOptions(column_names=_E_COLUMNS, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=" ", quote_char=False, escape_char=False, invalid_row_handler=skip)
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    try:
        table = pacsv.read_csv(pa.py_buffer(b"\n".join(records) + b"\n"), read, parse, convert)
    except pa.ArrowInvalid:
        good = [r for r in records if _int_fields(r)]
        damage["bad_record"] += len(records) - len(good)
        wrong_count = 0
        table = pacsv.read_csv(pa.py_buffer(b"\n".join(good) + b"\n"), read, parse, convert) if good else None
    damage["bad_record"] += wrong_count
    if table is None:
        return _empty_e_records()
    null = pc.or_(pc.is_null(table[_E_COLUMNS[0]]), pc.is_null(table[_E_COLUMNS[1]]))
    for column in _E_COLUMNS[2:]:
        null = pc.or_(null, pc.is_null(table[column]))
    bad = pc.sum(null).as_py() or 0
    if bad:
        damage["bad_record"] += bad
        table = table.filter(pc.invert(null))
    return table.to_pandas()


def _int_fields(record: bytes) -> bool:
    fields = record.split(b" ")
    try:
        for x in fields:
            int(x)
    except ValueError:
        return len(fields) != len(_E_COLUMNS)  # a wrong count is skipped (and counted) by the reader itself
    return True


def _empty_e_records() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="category" if c in _E_TEXT else "int64") for c in _E_COLUMNS})


def _u64_codes(text: pd.Series) -> tuple[np.ndarray, list[int | None]]:
    """Codes of a categorical text column and its categories as u64 (None where not an integer)."""
    values = []
    for u in text.cat.categories:
        try:
            values.append(int(u) % 2**64)
        except ValueError:
            values.append(None)
    return text.cat.codes.to_numpy(), values


def _events_frame(host: str | None, offset: int, records: list[bytes], name_cols: _NameColumns,
                  damage: collections.Counter[str]) -> pd.DataFrame:
    """The events table from raw E records: integer columns in bulk, then every per-value decoding (names, comms,
    results) done once per distinct value and spread with take()."""
    import numpy as np
    import pandas as pd

    if not records:
        return _frame("events", [])
    raw = _read_e_records(records, damage)
    key_codes, keys = _u64_codes(raw["namekey"])
    c0_codes, c0s = _u64_codes(raw["comm0"])
    c1_codes, c1s = _u64_codes(raw["comm1"])
    bad = (np.asarray([k is None for k in keys], dtype=bool)[key_codes]
           | np.asarray([c is None for c in c0s], dtype=bool)[c0_codes]
           | np.asarray([c is None for c in c1s], dtype=bool)[c1_codes])
    if bad.any():
        damage["bad_record"] += int(bad.sum())
        keep = ~bad
        raw, key_codes, c0_codes, c1_codes = raw[keep], key_codes[keep], c0_codes[keep], c1_codes[keep]
    if raw.empty:
        return _frame("events", [])
    # names: one column dict per distinct key
    per_key = [name_cols(k) if k is not None else {} for k in keys]
    name_bytes = np.empty(len(keys), dtype=object)
    name_bytes[:] = [d.get("name_bytes") for d in per_key]
    # comms: one decoding per distinct (comm0, comm1) pair
    pair_codes, pairs = pd.factorize(c0_codes.astype(np.int64) * len(c1s) + c1_codes)
    comm_b = np.empty(len(pairs), dtype=object)
    comm_b[:] = [comm_bytes(c0s[p // len(c1s)], c1s[p % len(c1s)]) for p in pairs.tolist()]
    # results: one result_name() per distinct (fid, rc, herr), the three factorized and combined into one code
    parts = [pd.factorize(raw[c]) for c in ("fid", "rc", "herr")]
    n_rc, n_herr = len(parts[1][1]), len(parts[2][1])
    res_codes, res_keys = pd.factorize((parts[0][0].astype(np.int64) * n_rc + parts[1][0]) * n_herr + parts[2][0])
    res_names = [result_name(int(parts[0][1][k // (n_rc * n_herr)]), int(parts[1][1][k // n_herr % n_rc]),
                             int(parts[2][1][k % n_herr])) for k in res_keys.tolist()]
    fid_codes, fids = parts[0]
    n = len(raw)
    frame = pd.DataFrame({
        "time": raw["t0"].to_numpy() + offset, "boot_ns": raw["t0"].to_numpy(),
        "host": _categorical(np.zeros(n, dtype=np.int64), [host]),
        "pid": raw["pid"].to_numpy(), "tid": raw["tid"].to_numpy(), "uid": raw["uid"].to_numpy(),
        "comm": _categorical(pair_codes, [display_bytes(c) for c in comm_b]), "comm_bytes": comm_b[pair_codes],
        "function": _categorical(fid_codes, [FUNCTIONS.get(int(f), f"fn{f}") for f in fids]),
        "name": _categorical(key_codes, [d.get("name") for d in per_key]), "name_bytes": name_bytes[key_codes],
        "name_truncated": np.asarray([bool(d.get("name_truncated")) for d in per_key])[key_codes],
        "reverse": np.asarray([bool(d.get("reverse")) for d in per_key])[key_codes],
        "result": _categorical(res_codes, res_names),
        "ok": np.asarray([r == "OK" for r in res_names], dtype=bool)[res_codes],
        "rc": raw["rc"].to_numpy(), "herr": raw["herr"].to_numpy(), "latency_ns": raw["latency_ns"].to_numpy()})
    return _frame("events", frame)


def _categorical(codes: np.ndarray, values: list[Any]) -> pd.Categorical:
    """A categorical column from per-row codes into *values* (one entry per distinct raw value; equal texts, e.g.
    two name keys that display alike, share one category; None is missing)."""
    import numpy as np
    import pandas as pd

    value_codes, categories = pd.factorize(np.asarray(values, dtype=object))
    return pd.Categorical.from_codes(value_codes[codes], categories=categories)


def summarize_events(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The summary, histogram and minutes tables computed from an events table (same keys as the
    in-kernel summary: host, pid, uid, comm, function, name).

    Comm and name group by their exact bytes. Every key column is factorized to integer codes and the codes
    combined into one key code, so each table is one bincount over integers; the key columns of a group are
    taken from its first row.
    """
    import numpy as np
    import pandas as pd

    if events.empty:
        return _frame("summary", []), _frame("histogram", []), _frame("minutes", [])
    key = np.zeros(len(events), dtype=np.int64)
    for col in ("host", "pid", "uid", "comm_bytes", "function", "name_bytes"):
        codes, uniques = pd.factorize(events[col], use_na_sentinel=False)
        key = pd.factorize(key * len(uniques) + codes)[0]  # re-compacted each step: never overflows
    key_columns = [c for c in SCHEMAS["summary"] if c in _KEY]
    time_ns = events["time"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    fail = (~events["ok"].to_numpy(dtype=bool)).astype(np.int64)
    bucket = np.floor(np.log2(events["latency_ns"].clip(lower=1).to_numpy(dtype="float64"))).astype(np.int64)
    minute = time_ns // 60_000_000_000

    def groups(code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per distinct code (compacted): the first row, the row count, and each row's group."""
        group, _ = pd.factorize(code)
        _, first = np.unique(group, return_index=True)
        return first, np.bincount(group), group

    first, lookups, group = groups(key)
    by_time = pd.Series(time_ns).groupby(group)
    summary = events.iloc[first][key_columns].reset_index(drop=True).assign(
        lookups=lookups, failures=np.bincount(group, weights=fail).astype(np.int64),
        first_time=by_time.min().to_numpy(), last_time=by_time.max().to_numpy())
    first, counts, _ = groups(key * 64 + bucket)  # a latency in ns has fewer than 64 log2 buckets
    hist = events.iloc[first][key_columns].reset_index(drop=True).assign(bucket=bucket[first], count=counts)
    first, counts, _ = groups(key * (int(minute.max() - minute.min()) + 1) + (minute - minute.min()))
    minutes = events.iloc[first][key_columns].reset_index(drop=True).assign(
        minute=minute[first] * 60_000_000_000, count=counts)
    return _frame("summary", summary), _frame("histogram", hist), _frame("minutes", minutes)
