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
from typing import TYPE_CHECKING, Any

from fleet.errors import InputError

if TYPE_CHECKING:  # pandas is only needed to read; hosts writing captures may not have it
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
}


@dataclasses.dataclass
class Capture:
    """A parsed capture: header and trailer (dicts; trailer None when missing), the four tables, the
    backend's lost-event count (``L`` records, or the trailer's when larger) and damage counts by kind."""

    header: dict[str, Any]
    trailer: dict[str, Any] | None
    events: "pd.DataFrame"
    summary: "pd.DataFrame"
    histogram: "pd.DataFrame"
    minutes: "pd.DataFrame"
    lost: int
    damage: dict[str, int]

    @property
    def mode(self) -> str:
        return self.header.get("mode", "events")


def _frame(table: str, rows: "list[dict[str, Any]] | pd.DataFrame") -> "pd.DataFrame":
    """Build one table from rows (or a frame), in the column order and dtypes of SCHEMAS[table]."""
    import pandas as pd

    schema = SCHEMAS[table]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=list(schema))
    out = {}
    for col, dtype in schema.items():
        if dtype.startswith("datetime64"):
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
    (a known type with wrong fields), ``unknown_record`` (a type this version does not know), ``wire_record``
    (reserved ``W`` records, read by a later version), ``missing_name`` (a name key without N record: its
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
    lines = data.split(b"\n")
    damage: collections.Counter[str] = collections.Counter()
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        damage["truncated_line"] += 1
        lines.pop()
    if not lines:
        raise InputError("empty capture (no header line)")
    header = _read_header(lines[0])
    host = header.get("host")
    offset = int(header.get("wall_offset_ns", 0))

    trailer = None
    lost = 0
    events: list[list[int]] = []
    names = _Names()
    snapshot: list[list[Any]] | None = None
    snapshot_kind = ""
    snapshots: list[tuple[str, list[list[Any]]]] = []
    cut_snapshot = False
    minute_rows: list[list[Any]] = []

    for line in lines[1:]:
        if trailer is not None:
            damage["after_trailer"] += 1
            continue
        kind, _, rest = line.partition(b" ")
        fields = rest.split(b" ")
        try:
            if kind == b"E":
                if len(fields) != 11:
                    raise ValueError
                events.append([int(x) for x in fields])
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
            elif kind == b"T":
                value = json.loads(rest)
                if not isinstance(value, dict):
                    raise ValueError
                trailer = value
            elif kind == b"B":
                int(fields[0])
            elif kind == b"W":
                damage["wire_record"] += 1
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
    ev_rows = []
    for t0, pid, tid, uid, fid, rc, herr, lat, key, c0, c1 in events:
        result = result_name(fid, rc, herr)
        ev_rows.append({
            "time": t0 + offset, "boot_ns": t0, "host": host, "pid": pid, "tid": tid, "uid": uid,
            **_comm_columns(c0, c1), "function": FUNCTIONS.get(fid, f"fn{fid}"), **name_cols(key % 2**64),
            "result": result, "ok": result == "OK", "rc": rc, "herr": herr, "latency_ns": lat})
    events_df = _frame("events", ev_rows)

    if header.get("mode") == "summary":
        summary_df, hist_df, minutes_df = _summary_tables(host, snapshots, minute_rows, name_cols, offset)
    else:
        summary_df, hist_df, minutes_df = summarize_events(events_df)
    return Capture(header, trailer, events_df, summary_df, hist_df, minutes_df, lost,
                   {k: v for k, v in damage.items() if v})


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


def summarize_events(events: "pd.DataFrame") -> tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame"]:
    """The summary, histogram and minutes tables computed from an events table (same keys as the
    in-kernel summary: host, pid, uid, comm, function, name)."""
    import numpy as np

    keys = list(_KEY)
    if events.empty:
        return _frame("summary", []), _frame("histogram", []), _frame("minutes", [])
    ev = events.assign(
        name_bytes=events["name_bytes"].map(lambda b: b if b is not None else b"\0null"),
        comm_bytes=events["comm_bytes"].map(bytes))
    by_bytes = ["host", "pid", "uid", "comm_bytes", "function", "name_bytes"]
    first_of = ev.groupby(by_bytes, observed=True, sort=False, dropna=False)
    summary = first_of.agg(
        comm=("comm", "first"), name=("name", "first"), name_truncated=("name_truncated", "first"),
        reverse=("reverse", "first"), lookups=("ok", "size"), failures=("ok", lambda s: int((~s).sum())),
        first_time=("time", "min"), last_time=("time", "max")).reset_index()
    lat = ev["latency_ns"].clip(lower=1).astype("float64")
    ev = ev.assign(bucket=np.floor(np.log2(lat)).astype("int64"), minute=ev["time"].dt.floor("min"))
    other = ["comm", "name", "name_truncated", "reverse"]
    hist = ev.groupby(by_bytes + ["bucket"], observed=True, sort=False, dropna=False).agg(
        **{c: (c, "first") for c in other}, count=("ok", "size")).reset_index()
    minutes = ev.groupby(by_bytes + ["minute"], observed=True, sort=False, dropna=False).agg(
        **{c: (c, "first") for c in other}, count=("ok", "size")).reset_index()
    for df in (summary, hist, minutes):
        df["name_bytes"] = df["name_bytes"].map(lambda b: None if b == b"\0null" else b)
    return _frame("summary", summary), _frame("histogram", hist), _frame("minutes", minutes)
