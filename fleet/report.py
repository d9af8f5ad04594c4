"""Merged cross-host reports of a run, and the two questions asked of them: what changed (diff), and did a change
take effect everywhere (check).

Input is the run store (``fleet/store.py``): the manifest's per-host status plus ``raw/HOST.capture[.gz]``. Each
host file is parsed on its own (:func:`fleet.capture_format.parse_capture`, in worker processes) and reduced at
once to its per-key tables (summary, latency histogram, minutes), so memory grows with the number of distinct
(host, process, name) keys, not with the raw files; a run larger than memory still reports. Events- and
summary-mode captures give the same tables, so they merge into one shape.

Tables (pandas, dtypes from :data:`KEYS_SCHEMA` and :data:`AGG_SCHEMA`):

* ``Loaded.summary``: one row per (host, pid, uid, process, function, name): ``lookups``, ``failed``,
  ``first_seen``, ``last_seen``.
* ``Loaded.histogram``: the same keys + ``bucket`` (floor(log2(latency_ns))) + ``count``.
* ``Loaded.minutes``: host, process, name + ``minute`` (UTC) + ``count`` (for plots).
* ``Loaded.coverage``: one row per host of the manifest, see :data:`COVERAGE_SCHEMA`.
* ``Loaded.blind_spots``, ``Loaded.connections``, ``Loaded.watch``: the host scans (``raw/HOST.scan.json``),
  see :data:`SCAN_SCHEMAS`; ``Loaded.scan_notes``: host → why its scan is missing or incomplete.
* :func:`aggregate` → the report table: the ``by`` keys, then ``hosts`` / ``processes`` (distinct counts, when
  ``host`` / ``process`` are not keys), ``lookups``, ``failed``, ``p50_ms``, ``p95_ms``, ``first_seen``,
  ``last_seen``, and last ``source``; sorted by lookups, descending.

Every per-key table has a ``source`` key (:data:`SOURCES`): a libc lookup is ``both`` when the wire source saw its
query, else ``libc``; queries no libc lookup accounts for are ``wire`` lookups (:func:`reconcile`,
:func:`wire_lookups`). A wire lookup's ``function`` is the syscall that sent it, and its ``failed`` and latency are
unknown (NA): the wire source sees queries, not answers.

``name`` and ``process`` are :func:`escape_bytes` text: unambiguous, printable, one line (docs/report.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gzip
import ipaddress
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from fleet import capture_format
from fleet.errors import InputError, UsageError
from fleet.store import STATUSES, Run

GROUP_KEYS = ("host", "process", "pid", "name", "function", "source")
DEFAULT_BY = ("host", "process", "pid", "name")
DIFF_BY = ("host", "process", "name")  # not pid: it changes when a process restarts
#: statuses whose host may have a capture file to read
READABLE = ("captured", "empty", "partial", "running", "pending")
#: where a lookup was seen: by both sources, by the libc probe only, on the wire only
SOURCES = ("both", "libc", "wire")
#: a libc lookup's own queries leave within [start, start + latency + MATCH_SLACK_NS]
MATCH_SLACK_NS = 1_000_000
#: unmatched queries of one pid and name less than this apart are one lookup (A+AAAA, a quick retry)
WIRE_GAP_NS = 1_000_000_000

KEYS_SCHEMA = {"host": "category", "pid": "Int64", "uid": "Int64", "process": "category",
               "function": "category", "name": "category", "source": "category"}
AGG_SCHEMA = {"lookups": "Int64", "failed": "Int64", "hosts": "Int64", "processes": "Int64",
              "p50_ms": "Float64", "p95_ms": "Float64",
              "first_seen": "datetime64[ns, UTC]", "last_seen": "datetime64[ns, UTC]"}
COVERAGE_SCHEMA = {"host": "string", "status": "category", "reason": "string",
                   "window_start": "datetime64[ns, UTC]", "window_end": "datetime64[ns, UTC]",
                   "mode": "string", "lookups": "Int64", "lost": "Int64", "damage": "Int64",
                   "damage_kinds": "string", "complete": "boolean", "sources": "string", "wire_scope": "string",
                   "blind_spots": "Int64"}
#: the host scan's tables (spec: raw/HOST.scan.json, format fleetdns-scan/1); text escaped like names
SCAN_FORMAT = "fleetdns-scan/1"
SCAN_SCHEMAS = {
    "blind_spots": {"host": "category", "pid": "Int64", "process": "string", "exe": "string",
                    "reason": "category", "detail": "string"},
    "connections": {"host": "category", "pid": "Int64", "process": "string", "remote": "string",
                    "remote_addr": "string"},
    "watch": {"host": "category", "name": "string", "address": "string", "error": "string"},
}


# ---------------------------------------------------------------------------------------------- escaping

_CONTROL = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


@functools.lru_cache(maxsize=1 << 16)  # the same names and comms recur in every table and on every host
def escape_bytes(data: bytes | None) -> str | None:
    """Bytes (a name, a comm) as one line of printable text that maps back to exactly those bytes.

    UTF-8 text stays as it is; a byte that is not part of valid UTF-8 becomes ``\\xNN``; a backslash becomes
    ``\\\\``; newline, tab, CR become ``\\n`` ``\\t`` ``\\r``; any other non-printable character ``\\uXXXX``
    (``\\UXXXXXXXX`` above U+FFFF). Because a backslash is always escaped, ``\\xNN`` can only mean a raw byte.
    None (a NULL name) stays None.
    """
    if data is None:
        return None
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        if ch in _CONTROL:
            out.append(_CONTROL[ch])
        elif "\udc80" <= ch <= "\udcff":  # surrogateescape: a byte that was not valid UTF-8
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return "".join(out)


_UNCONTROL = {"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}
_UNESCAPE_RE = re.compile(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def unescape_text(text: str) -> bytes:
    """The inverse of :func:`escape_bytes` (for readers of the CSV/JSON; the tests check the round trip)."""
    out = bytearray()
    pos = 0
    for m in _UNESCAPE_RE.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        code = m.group(1)
        if code[0] == "x":
            out.append(int(code[1:], 16))
        elif code[0] in "uU":
            out += chr(int(code[1:], 16)).encode("utf-8")
        else:
            out += _UNCONTROL[code]
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


# ---------------------------------------------------------------------------------------------- reconciliation

def _per_distinct(col: pd.Series, fn: Callable[[Any], Any]) -> pd.Series:
    """``fn`` of each value of an object column (bytes), computed once per distinct value; None stays None."""
    codes, uniques = pd.factorize(col)
    values = np.empty(len(uniques) + 1, dtype=object)  # code -1 (None) takes the trailing None
    for i, value in enumerate(uniques):
        values[i] = fn(value)
    return pd.Series(values[codes], index=col.index, dtype=object)


def _forward_key(name: bytes) -> bytes:
    low = name.lower()  # ASCII only, as DNS compares names
    return low[:-1] if low.endswith(b".") else low


def _reverse_key(address: bytes) -> bytes | None:
    return ipaddress.ip_address(address).reverse_pointer.encode() if len(address) in (4, 16) else None


def _wire_keys(name: bytes) -> list[bytes]:
    """The libc match keys a query of *name* answers: the name itself and each prefix that ends before a dot
    (``db.lab`` answers ``db`` plus the search domain ``lab``), all lower-case."""
    low = name.lower()
    return [low, *(low[:i] for i in range(1, len(low)) if low[i] == 0x2E)]


def _libc_keys(table: pd.DataFrame) -> pd.Series:
    """Per row of an events or summary table, the name its queries ask for: the name in lower case without a
    trailing dot, or the in-addr.arpa / ip6.arpa name of a reverse lookup's address; None for a NULL or
    truncated name (glibc sends no query for those)."""
    reverse = table["reverse"].fillna(False).to_numpy(dtype=bool)
    key = _per_distinct(table["name_bytes"], _forward_key).where(~reverse, _per_distinct(table["name_bytes"],
                                                                                         _reverse_key))
    return key.where(~table["name_truncated"].fillna(False).to_numpy(dtype=bool), None)


def _ns(col: pd.Series) -> np.ndarray:
    return col.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _candidates(wire: pd.DataFrame) -> pd.DataFrame:
    """One row per (query, match key it answers): ``w`` (the query's row), ``pid``, ``t`` (ns), ``key``."""
    cand = pd.DataFrame({"w": np.arange(len(wire)), "pid": wire["pid"].to_numpy(dtype=np.int64),
                         "t": _ns(wire["time"]), "key": _per_distinct(wire["name_bytes"], _wire_keys).to_numpy()})
    return cand.explode("key", ignore_index=True)


def _key_codes(*keys: pd.Series) -> list[np.ndarray]:
    """Integer codes of byte keys, shared across the given columns (merges on integers, not bytes)."""
    codes, _ = pd.factorize(pd.concat([k.reset_index(drop=True) for k in keys], ignore_index=True))
    bounds = np.cumsum([0, *(len(k) for k in keys)])
    return [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _sources(codes: np.ndarray) -> pd.Categorical:
    return pd.Categorical.from_codes(codes, categories=SOURCES)


def reconcile(events: pd.DataFrame, wire: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(events, wire)`` of one capture, each with a ``source`` column (categorical of :data:`SOURCES`).

    A libc lookup (events row) is ``both`` when a query of the same pid asks its name — equal ignoring ASCII
    case, the name plus a search-domain suffix (``db`` → ``db.lab``), or for a reverse lookup the arpa name of its
    address — sent within [start, start + latency + :data:`MATCH_SLACK_NS`]; else ``libc``. A query matched to a
    lookup is ``both`` (consumed: :func:`wire_lookups` does not count it again), else ``wire``. Each query is
    compared with the latest lookup of its pid and name that started before it (``merge_asof``).
    """
    ev = np.full(len(events), SOURCES.index("libc"), dtype=np.int8)
    wq = np.full(len(wire), SOURCES.index("wire"), dtype=np.int8)
    if len(events) and len(wire):
        cand = _candidates(wire)
        start = _ns(events["time"])
        base = min(start.min(), cand["t"].min())  # small times stay exact in the float64 of unmatched rows
        start, cand["t"] = start - base, cand["t"] - base
        lookups = pd.DataFrame({"e": np.arange(len(events)), "pid": events["pid"].to_numpy(dtype=np.int64),
                                "start": start, "key": _libc_keys(events).to_numpy(),
                                "end": start + events["latency_ns"].to_numpy(dtype=np.int64) + MATCH_SLACK_NS})
        lookups = lookups[lookups["key"].notna()]
        cand["k"], lookups["k"] = _key_codes(cand["key"], lookups["key"])
        pairs = pd.merge_asof(cand.drop(columns="key").sort_values("t"),
                              lookups.drop(columns="key").sort_values("start"),
                              left_on="t", right_on="start", by=["pid", "k"], direction="backward")
        hit = (pairs["end"] >= pairs["t"]).to_numpy(dtype=bool)  # no lookup: end is NaN, never a hit
        ev[pairs.loc[hit, "e"].to_numpy(dtype=np.int64)] = SOURCES.index("both")
        wq[pairs.loc[hit, "w"].to_numpy(dtype=np.int64)] = SOURCES.index("both")
    return events.assign(source=_sources(ev)), wire.assign(source=_sources(wq))


def _summary_sources(summary: pd.DataFrame, histogram: pd.DataFrame,
                     wire: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Summary mode (no per-lookup times): per summary key, ``both`` when a query of its pid asks its name
    (as in :func:`reconcile`) between its first lookup and its last one plus the key's slowest latency bucket
    and :data:`MATCH_SLACK_NS` — approximate: the whole key is ``both`` even if some of its lookups sent
    nothing. Returns the source codes per summary row and whether each query was matched (consumed)."""
    src = np.full(len(summary), SOURCES.index("libc"), dtype=np.int8)
    used = np.zeros(len(wire), dtype=bool)
    if not (len(summary) and len(wire)):
        return src, used
    key_cols = ["pid", "uid", "comm_bytes", "function", "name_bytes", "reverse"]
    rows, hist_rows = _row_keys([summary, histogram], key_cols)
    slowest = pd.Series(histogram["bucket"].to_numpy(dtype=np.int64)).groupby(hist_rows).max()
    bucket = slowest.reindex(np.arange(rows.max() + 1)).to_numpy(dtype="float64")[rows]
    latency = np.where(np.isnan(bucket), 0, np.exp2(np.nan_to_num(bucket) + 1)).astype(np.int64)
    keys = pd.DataFrame({"s": np.arange(len(summary)), "pid": summary["pid"].to_numpy(dtype=np.int64),
                         "first": _ns(summary["first_time"]),
                         "last": _ns(summary["last_time"]) + latency + MATCH_SLACK_NS,
                         "key": _libc_keys(summary).to_numpy()})
    keys = keys[keys["key"].notna()]
    cand = _candidates(wire)
    cand["k"], keys["k"] = _key_codes(cand["key"], keys["key"])
    pairs = cand.drop(columns="key").merge(keys.drop(columns="key"), on=["pid", "k"])
    hit = ((pairs["t"] >= pairs["first"]) & (pairs["t"] <= pairs["last"])).to_numpy(dtype=bool)
    src[pairs.loc[hit, "s"].to_numpy(dtype=np.int64)] = SOURCES.index("both")
    used[pairs.loc[hit, "w"].to_numpy(dtype=np.int64)] = True
    return src, used


def _row_keys(frames: list[pd.DataFrame], columns: list[str]) -> list[np.ndarray]:
    """Per row of each frame, a code of its *columns* shared across the frames (equal keys, equal codes)."""
    both = pd.concat([f[columns] for f in frames], ignore_index=True)
    key = np.zeros(len(both), dtype=np.int64)
    for col in columns:
        codes, uniques = pd.factorize(both[col], use_na_sentinel=False)
        key = pd.factorize(key * len(uniques) + codes)[0]  # re-compacted each step: never overflows
    bounds = np.cumsum([0, *(len(f) for f in frames)])
    return [key[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _arpa_address(name: bytes) -> str | None:
    """The address an in-addr.arpa / ip6.arpa name stands for (``4.3.2.1.in-addr.arpa`` → ``1.2.3.4``)."""
    low = name.lower()
    try:
        if low.endswith(b".in-addr.arpa"):
            parts = low[:-len(b".in-addr.arpa")].split(b".")
            if len(parts) == 4 and all(p.isdigit() and p == str(int(p)).encode() for p in parts):
                return str(ipaddress.IPv4Address(b".".join(reversed(parts)).decode()))
        elif low.endswith(b".ip6.arpa"):
            nibbles = low[:-len(b".ip6.arpa")].split(b".")
            if len(nibbles) == 32 and all(len(n) == 1 for n in nibbles):
                return str(ipaddress.IPv6Address(int(b"".join(reversed(nibbles)), 16)))
    except ValueError:
        pass
    return None


def wire_lookups(queries: pd.DataFrame) -> pd.DataFrame:
    """Queries no libc lookup accounts for, as lookups: a query less than :data:`WIRE_GAP_NS` after the previous
    one of the same pid and name (ASCII case ignored) belongs to the same lookup (an A+AAAA pair, a quick
    retry). Not the thread: Go sends its A and AAAA queries from two threads. One row per lookup with the wire
    table's columns of its first query, plus ``queries`` (its count)."""
    if queries.empty:
        return queries.assign(queries=pd.Series(dtype="Int64"))
    t = _ns(queries["time"])
    pid = queries["pid"].to_numpy(dtype=np.int64)
    name = pd.factorize(_per_distinct(queries["name_bytes"], bytes.lower))[0]
    order = np.lexsort((t, name, pid))
    t, pid, name = t[order], pid[order], name[order]
    same = (pid[1:] == pid[:-1]) & (name[1:] == name[:-1]) & (t[1:] - t[:-1] < WIRE_GAP_NS)
    new = np.concatenate([[True], ~same])
    counts = np.bincount(np.cumsum(new) - 1)
    return queries.iloc[order[new]].assign(queries=counts).reset_index(drop=True)


def _wire_tables(lookups: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary and minutes rows of wire lookups, in the capture tables' columns and dtypes plus ``source`` (wire).
    ``function`` is the syscall; a PTR query of an arpa name is a reverse lookup named by its address;
    ``failures`` is NA (the wire source sees no answers)."""
    address = _per_distinct(lookups["name_bytes"], _arpa_address)
    reverse = address.notna().to_numpy(dtype=bool) & (lookups["qtype"] == "PTR").to_numpy(dtype=bool)
    rows = pd.DataFrame({
        "host": lookups["host"], "pid": lookups["pid"], "uid": lookups["uid"], "comm": lookups["comm"],
        "comm_bytes": lookups["comm_bytes"], "function": lookups["syscall"].astype(object),
        "name": lookups["name"].astype(object).where(~reverse, address), "name_bytes": lookups["name_bytes"],
        "name_truncated": lookups["truncated"], "reverse": reverse}).reset_index(drop=True)
    (key,) = _row_keys([rows], ["pid", "uid", "comm_bytes", "function", "name_bytes", "reverse"])
    t = pd.Series(_ns(lookups["time"]))
    first = pd.Series(np.arange(len(rows))).groupby(key).min().to_numpy()
    summary = rows.iloc[first].reset_index(drop=True).assign(
        lookups=np.bincount(key), failures=pd.NA, first_time=_utc(t.groupby(key).min()),
        last_time=_utc(t.groupby(key).max()), source="wire")
    per_minute = pd.Series(np.arange(len(rows))).groupby([key, t.to_numpy() // 60_000_000_000])
    minutes = rows.iloc[per_minute.min().to_numpy()].reset_index(drop=True).assign(
        minute=_utc(pd.Series(per_minute.size().index.get_level_values(1) * 60_000_000_000)),
        count=per_minute.size().to_numpy(), source="wire")
    schemas = {t: {**capture_format.SCHEMAS[t], "source": "category"} for t in ("summary", "minutes")}
    return summary[list(schemas["summary"])].astype(schemas["summary"]), \
        minutes[list(schemas["minutes"])].astype(schemas["minutes"])


def _utc(ns: pd.Series) -> pd.DatetimeIndex:
    """UTC epoch ns as timestamps (an index: assigned by position)."""
    return pd.to_datetime(ns.to_numpy(dtype=np.int64), unit="ns", utc=True)


def sourced_tables(capture: capture_format.Capture) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A capture's summary, histogram and minutes tables with ``source`` (see :func:`reconcile`), plus the rows of
    its wire lookups (summary and minutes only: their latency is unknown). Summary-mode captures are matched per
    key (:func:`_summary_sources`)."""
    if capture.wire.empty:
        summary, histogram, minutes = (t.assign(source=_sources(np.full(len(t), SOURCES.index("libc"), dtype=np.int8)))
                                       for t in (capture.summary, capture.histogram, capture.minutes))
        return summary, histogram, minutes
    if capture.mode == "summary":
        src, used = _summary_sources(capture.summary, capture.histogram, capture.wire)
        key_cols = ["pid", "uid", "comm_bytes", "function", "name_bytes", "reverse"]
        keys = _row_keys([capture.summary, capture.histogram, capture.minutes], key_cols)
        per_key = np.full(max(int(k.max(initial=-1)) for k in keys) + 1, SOURCES.index("libc"), dtype=np.int8)
        per_key[keys[0]] = src
        tables = [t.assign(source=_sources(per_key[k]))
                  for t, k in zip((capture.summary, capture.histogram, capture.minutes), keys, strict=True)]
        unmatched = capture.wire[~used]
    else:
        events, wire = reconcile(capture.events, capture.wire)
        parts = [(*capture_format.summarize_events(events[events["source"] == s]), s) for s in ("both", "libc")]
        tables = [pd.concat([p[i].assign(source=_sources(np.full(len(p[i]), SOURCES.index(p[3]), dtype=np.int8)))
                             for p in parts], ignore_index=True) for i in range(3)]
        unmatched = wire[wire["source"] == "wire"].drop(columns="source")
    lookups = wire_lookups(unmatched)
    if len(lookups):
        summary, minutes = _wire_tables(lookups)
        tables[0] = pd.concat([tables[0], summary], ignore_index=True)
        tables[2] = pd.concat([tables[2], minutes], ignore_index=True)
    return tables[0], tables[1], tables[2]


# ---------------------------------------------------------------------------------------------- host scans

def _scan_text(value: Any) -> str | None:
    """A text field of a scan (comm, exe), escaped like names and processes; None when not a string."""
    if not isinstance(value, str):
        return None
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "backslashreplace")
    return escape_bytes(data)


def _scan_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _scan_records(scan: dict[str, Any], field: str) -> list[dict[str, Any]]:
    value = scan.get(field)
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def read_scan(run: Run, host: str) -> tuple[dict[str, pd.DataFrame], str | None]:
    """A host's scan (``raw/HOST.scan.json``) as the :data:`SCAN_SCHEMAS` tables, and a note: None when it was
    read whole, else one line saying why it is missing, unreadable or incomplete (never raised). Malformed
    entries are skipped; text fields are escaped like names."""
    path = run.scan_file(host)
    empty = {t: _scan_frame(t, []) for t in SCAN_SCHEMAS}
    try:
        scan = json.loads(path.read_bytes())
    except FileNotFoundError:
        return empty, "no host scan"
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        return empty, f"no host scan (unreadable {path.name}: {getattr(e, 'strerror', None) or e})"
    if not isinstance(scan, dict) or scan.get("format") != SCAN_FORMAT:
        return empty, f"no host scan ({path.name} is not a {SCAN_FORMAT} file)"
    blind = [{"host": host, "pid": _scan_int(b.get("pid")), "process": _scan_text(b.get("comm")),
              "exe": _scan_text(b.get("exe")), "reason": _scan_text(b.get("reason")),
              "detail": _scan_text(b.get("detail"))} for b in _scan_records(scan, "blind_spots")]
    conns = [{"host": host, "pid": _scan_int(c.get("pid")), "process": _scan_text(c.get("comm")),
              "remote": _scan_text(c.get("remote")), "remote_addr": _canonical_address(c.get("remote_addr"))}
             for c in _scan_records(scan, "connections")]
    watch = []
    for w in _scan_records(scan, "watch"):
        addresses = [a for a in map(_canonical_address, w.get("addresses") or []) if a] \
            if isinstance(w.get("addresses"), list) else []
        watch += [{"host": host, "name": _scan_text(w.get("name")), "address": a,
                   "error": _scan_text(w.get("error"))} for a in addresses or [None]]
    errors = scan.get("errors") if isinstance(scan.get("errors"), list) else []
    note = None
    if errors:
        first = _scan_text(errors[0]) if isinstance(errors[0], str) else "?"
        note = f"host scan incomplete: {len(errors)} {'error' if len(errors) == 1 else 'errors'} (first: {first})"
    return {"blind_spots": _scan_frame("blind_spots", blind), "connections": _scan_frame("connections", conns),
            "watch": _scan_frame("watch", [w for w in watch if w["name"] is not None])}, note


def _canonical_address(value: Any) -> str | None:
    """An IP address as :mod:`ipaddress` writes it (so ``::ffff:a.b.c.d`` and friends compare), else None."""
    if not isinstance(value, str):
        return None
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _scan_frame(table: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    schema = SCAN_SCHEMAS[table]
    return pd.DataFrame(rows, columns=list(schema)).astype(schema)


# ---------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class Loaded:
    """One run, read: per-key tables of every readable host, the coverage of every host of the manifest, and
    the host scans (``scan_notes``: host → why its scan is missing or incomplete)."""

    run: Run
    summary: pd.DataFrame
    histogram: pd.DataFrame
    minutes: pd.DataFrame
    coverage: pd.DataFrame
    blind_spots: pd.DataFrame
    connections: pd.DataFrame
    watch: pd.DataFrame
    scan_notes: dict[str, str]


def _markers(run: Run, host: str) -> set[str]:
    """The run's self-test marker names (kept out of reports): ``options.marker`` and ``hosts.H.marker``,
    a name or a list of names, as the capture stage records them in the manifest."""
    found: set[str] = set()
    for value in (run.manifest.get("options", {}).get("marker"), run.manifest["hosts"][host].get("marker")):
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def _host_entries(run: Run) -> dict[str, dict[str, Any]]:
    hosts = run.manifest.get("hosts")
    if not isinstance(hosts, dict) or not all(isinstance(v, dict) for v in hosts.values()):
        raise InputError(f"run {run.id}: manifest.json has no valid 'hosts' table")
    return hosts


def _read_capture_file(run: Run, host: str) -> capture_format.Capture | None:
    """The host's parsed capture, None when there is no file; InputError when it cannot be read at all."""
    for compressed in (False, True):
        path = run.host_file(host, compressed=compressed)
        if path.exists():
            break
    else:
        return None
    try:
        data = path.read_bytes()
        if compressed:
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{path.name}: {e}") from None
    return capture_format.parse_capture(data)


def _reduce(table: pd.DataFrame, host: str, markers: set[str]) -> pd.DataFrame:
    """A capture table with the report's key columns: host from the manifest, process/name escaped from the
    exact bytes (reverse lookups keep their textual address), marker lookups dropped, byte columns gone."""
    if table.empty:
        return table.drop(columns=["comm_bytes", "name_bytes"]).rename(columns={"comm": "process"})
    # escaping runs once per distinct value, not per row
    comm = _escaped(table["comm_bytes"])
    named = table["name_bytes"].notna() & ~table["reverse"].astype(bool)
    missing = table["name_bytes"].isna() & table["name"].notna() & ~table["reverse"].astype(bool)
    name = table["name"].astype(object).where(~named, _escaped(table["name_bytes"]))
    # a name key whose N record was lost: "\?" cannot come out of escape_bytes, so it is never a real name
    name = name.where(~missing, "\\?" + table["name"].astype(str))
    # a NULL name: "\N" (as in SQL COPY) keeps it apart from the empty name, which is "" in every format
    name = name.where(name.notna(), "\\N")
    out = table.drop(columns=["comm", "comm_bytes", "name", "name_bytes"]).assign(
        host=host, process=comm.astype(object), name=name.astype(object))
    if markers:
        out = out[~out["name"].isin(markers)]
    return out


def _escaped(col: pd.Series) -> pd.Series:
    """:func:`escape_bytes` of a bytes column, computed once per distinct value (None stays None)."""
    codes, uniques = pd.factorize(col)
    texts = np.asarray([escape_bytes(u) for u in uniques] + [None], dtype=object)
    return pd.Series(texts[codes], index=col.index, dtype=object)  # code -1 (None) takes the trailing None


def _timestamp(value: Any) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value) if value else pd.NaT
    except (ValueError, TypeError):
        return pd.NaT
    if ts is pd.NaT:
        return ts
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


#: the per-host tables :func:`_load_host` returns and :func:`load` concatenates
TABLES = ("summary", "histogram", "minutes", *SCAN_SCHEMAS)


def _load_host(run: Run, host: str) -> tuple[dict[str, Any], dict[str, pd.DataFrame], str | None]:
    """One host: its coverage row, its tables (:data:`TABLES`; the capture's only when it has a readable one)
    and its scan note. Pure function of the run store: runs in a worker process too."""
    entry = run.manifest["hosts"][host]
    status = entry.get("status") if entry.get("status") in STATUSES else "failed"
    reason = entry.get("reason")
    window = entry.get("window") if isinstance(entry.get("window"), dict) else {}
    row = {"host": host, "status": status, "reason": reason, "window_start": _timestamp(window.get("start")),
           "window_end": _timestamp(window.get("end")), "mode": None, "lookups": 0,
           "lost": int(entry.get("lost") or 0), "damage": 0, "damage_kinds": None, "sources": None,
           "wire_scope": None}
    tables, note = read_scan(run, host)
    row["blind_spots"] = None if note and note.startswith("no host scan") else len(tables["blind_spots"])
    capture = None
    if status in READABLE:
        try:
            capture = _read_capture_file(run, host)
        except InputError as e:
            row.update(damage=1, damage_kinds="unreadable", reason=f"capture unreadable: {e}")
    if capture is not None:
        markers = _markers(run, host)
        summary, histogram, minutes = sourced_tables(capture)
        summary = _reduce(summary, host, markers)
        tables.update(summary=summary, histogram=_reduce(histogram, host, markers),
                      minutes=_reduce(minutes, host, markers)[["host", "process", "name", "source", "minute",
                                                               "count"]])
        row.update(mode=capture.mode, lookups=int(summary["lookups"].sum()), lost=max(row["lost"], capture.lost),
                   damage=sum(capture.damage.values()),
                   damage_kinds=", ".join(f"{k} {v}" for k, v in sorted(capture.damage.items())) or None,
                   sources="+".join(capture.sources), wire_scope=capture.wire_scope)
        if row["window_start"] is pd.NaT and capture.header.get("start_time"):
            row["window_start"] = _timestamp(capture.header["start_time"])
        if row["window_end"] is pd.NaT and capture.trailer and capture.trailer.get("end_time_ns"):
            row["window_end"] = pd.Timestamp(int(capture.trailer["end_time_ns"]), unit="ns", tz="UTC")
    elif status in ("captured", "empty") and row["damage"] == 0:
        row.update(damage=1, damage_kinds="missing_file", reason=reason or "no capture file in the run store")
    # absence is provable only where the whole window was captured with nothing lost or damaged
    row["complete"] = status in ("captured", "empty") and row["lost"] == 0 and row["damage"] == 0
    return row, tables, note


#: below this many hosts, starting worker processes costs more than it saves
PARALLEL_MIN_HOSTS = 8


def load(run: Run, workers: int | None = None) -> Loaded:
    """Read every host of *run*: per-key tables of those with a capture, coverage and scans for all of them.

    Host files are parsed in ``workers`` processes (default: one per CPU, when the run has at least
    :data:`PARALLEL_MIN_HOSTS` hosts); each worker holds one host's file at a time, so memory stays bounded.
    """
    hosts = sorted(_host_entries(run))
    workers = workers or (os.cpu_count() or 1 if len(hosts) >= PARALLEL_MIN_HOSTS else 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_load_host, [run] * len(hosts), hosts))
    else:
        results = [_load_host(run, host) for host in hosts]
    per_table = {t: [tables[t] for _, tables, _ in results if t in tables] for t in TABLES}
    scans = {t: pd.concat(per_table[t], ignore_index=True).astype(SCAN_SCHEMAS[t]) if per_table[t]
             else _scan_frame(t, []) for t in SCAN_SCHEMAS}
    return Loaded(run, _concat(per_table["summary"], "summary"), _concat(per_table["histogram"], "histogram"),
                  _concat(per_table["minutes"], "minutes"), _coverage_frame([row for row, _, _ in results]),
                  scans["blind_spots"], scans["connections"], scans["watch"],
                  {host: note for host, (_, _, note) in zip(hosts, results, strict=True) if note})


def _concat(frames: list[pd.DataFrame], table: str) -> pd.DataFrame:
    """Concatenate per-host tables; key columns to their KEYS_SCHEMA dtypes (categoricals built once here)."""
    columns = {"summary": ["host", "pid", "uid", "process", "function", "name", "source", "lookups", "failures",
                           "first_time", "last_time"],
               "histogram": ["host", "pid", "uid", "process", "function", "name", "source", "bucket", "count"],
               "minutes": ["host", "process", "name", "source", "minute", "count"]}[table]
    frames = [f for f in frames if not f.empty]
    if not frames:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        frames = [empty]
    df = pd.concat([f[columns] for f in frames], ignore_index=True)
    dtypes = {c: KEYS_SCHEMA[c] for c in columns if c in KEYS_SCHEMA}
    dtypes.update({"lookups": "Int64", "failures": "Int64", "count": "Int64", "bucket": "Int64",
                   "first_time": "datetime64[ns, UTC]", "last_time": "datetime64[ns, UTC]",
                   "minute": "datetime64[ns, UTC]"})
    df = df.astype({c: t for c, t in dtypes.items() if c in df.columns})
    df["source"] = df["source"].cat.set_categories(SOURCES)
    return df.rename(columns={"failures": "failed", "first_time": "first_seen", "last_time": "last_seen"})


def _coverage_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COVERAGE_SCHEMA))
    for col in ("window_start", "window_end"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df.astype(COVERAGE_SCHEMA)


# ---------------------------------------------------------------------------------------------- filters

@dataclasses.dataclass
class Filters:
    """Row filters of the report. Globs are fnmatch patterns over the escaped text; names match without
    regard to case (DNS names are case-insensitive), hosts and processes exactly."""

    names: Sequence[str] = ()
    hosts: Sequence[str] = ()
    processes: Sequence[str] = ()
    failed_only: bool = False

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows of *df* (a table with host, process and name columns) that pass the glob filters."""
        return df[self.mask(df)] if len(df) else df

    def mask(self, df: pd.DataFrame) -> pd.Series:
        keep = pd.Series(True, index=df.index)
        for col, globs, fold in (("name", self.names, True), ("host", self.hosts, False),
                                 ("process", self.processes, False)):
            if globs:
                keep &= match_globs(df[col], globs, fold_case=fold)
        return keep


def match_globs(values: pd.Series, globs: Iterable[str], *, fold_case: bool = False) -> pd.Series:
    """Whether each value matches any glob; each distinct value is matched once (categoricals)."""
    globs = [g.lower() if fold_case else g for g in globs]
    cats = values.astype("category")
    hits = [any(fnmatch.fnmatchcase(str(v).lower() if fold_case else str(v), g) for g in globs)
            for v in cats.cat.categories]
    lookup = np.asarray(hits + [False], dtype=bool)  # code -1 (missing) indexes the trailing False
    return pd.Series(lookup[cats.cat.codes.to_numpy()], index=values.index)


# ---------------------------------------------------------------------------------------------- aggregation

def parse_by(text: str | Sequence[str] | None, default: Sequence[str] = DEFAULT_BY) -> list[str]:
    """``--by host,process`` → ["host", "process"], checked against :data:`GROUP_KEYS`."""
    if not text:
        return list(default)
    keys = [k.strip() for k in text.split(",")] if isinstance(text, str) else list(text)
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad or not keys or len(set(keys)) != len(keys):
        raise UsageError(f"--by {','.join(keys)}: expected distinct keys from {','.join(GROUP_KEYS)}")
    return keys


def percentiles(histogram: pd.DataFrame, by: list[str], qs: Sequence[float] = (0.5, 0.95)) -> pd.DataFrame:
    """Latency percentiles per group from merged log2 histograms: the bucket where the cumulative count first
    reaches q, reported as its geometric middle 2^(bucket+0.5) ns, in ms (so within a factor √2 of the truth).

    Histograms merge exactly across hosts and modes (summary mode has nothing finer), hence this estimate.
    """
    cols = [f"p{round(q * 100)}_ms" for q in qs]
    if histogram.empty:
        return pd.DataFrame(columns=[*by, *cols])
    per_bucket = (histogram.groupby([*by, "bucket"], observed=True, sort=True, dropna=False)["count"].sum()
                  .reset_index())
    group = per_bucket.groupby(by, observed=True, sort=False, dropna=False).ngroup().to_numpy()
    counts = per_bucket["count"].to_numpy(dtype="float64")
    cum = per_bucket.groupby(group, sort=False)["count"].cumsum().to_numpy(dtype="float64")
    total = np.bincount(group, weights=counts)[group]
    buckets = per_bucket["bucket"].to_numpy(dtype="float64")
    _, first_row = np.unique(group, return_index=True)  # rows are sorted by group keys, then bucket
    out = per_bucket.iloc[first_row][by].reset_index(drop=True)
    for q, col in zip(qs, cols, strict=True):
        reached = np.flatnonzero(cum >= q * total)
        # the first row of each group that reaches q: the group's lowest such bucket
        _, first = np.unique(group[reached], return_index=True)
        out[col] = np.exp2(buckets[reached[first]] + 0.5) / 1e6
    return out


def aggregate(loaded: Loaded, by: Sequence[str] = DEFAULT_BY, filters: Filters | None = None,
              top: int | None = None) -> pd.DataFrame:
    """The report table (columns in the module docstring), filtered, grouped by *by*, sorted by lookups.

    ``source`` is always the last column: a key when *by* has it, else the sources of the group's lookups
    (``both``, ``libc``, ``wire``, or several joined by ``+``, e.g. ``both+libc``). ``failed`` counts the
    lookups whose result is known: NA for a group of wire lookups only.
    """
    by = list(by)
    filters = filters or Filters()
    summary, histogram = filters.apply(loaded.summary), filters.apply(loaded.histogram)
    aggs: dict[str, tuple[str, str]] = {}
    if "host" not in by:
        aggs["hosts"] = ("host", "nunique")
    if "process" not in by:
        aggs["processes"] = ("process", "nunique")
    aggs.update(lookups=("lookups", "sum"), first_seen=("first_seen", "min"), last_seen=("last_seen", "max"))
    keys = [k for k in by if k != "source"]
    columns = [*keys, *[c for c in ("hosts", "processes") if c in aggs], "lookups", "failed", "p50_ms", "p95_ms",
               "first_seen", "last_seen", "source"]
    if summary.empty:
        return _typed(pd.DataFrame({c: pd.Series(dtype=object) for c in columns}))
    grouped = summary.groupby(by, observed=True, sort=False, dropna=False)
    table = grouped.agg(**aggs).reset_index()
    table["failed"] = grouped["failed"].sum(min_count=1).to_numpy()
    if "source" not in by:
        table["source"] = _source_sets(summary, by)
    if filters.failed_only:
        table = table[table["failed"].fillna(0) > 0]
    table = table.merge(percentiles(histogram, by), on=by, how="left")
    sort_keys = ["lookups", *by]
    table = table.sort_values(sort_keys, ascending=[False] + [True] * len(by), kind="stable", na_position="last")
    if top:
        table = table.head(top)
    return _typed(table[columns].reset_index(drop=True))


#: every non-empty set of sources as text, indexed by its bit mask (bit i: SOURCES[i])
_SOURCE_SETS = [None, *("+".join(s for i, s in enumerate(SOURCES) if mask >> i & 1) for mask in range(1, 8))]


def _source_sets(summary: pd.DataFrame, by: list[str]) -> pd.Categorical:
    """Per group of *summary* by *by* (in groupby order, sort=False), the sources of its rows: one of
    :data:`SOURCES`, or several joined by ``+``."""
    codes = summary["source"].cat.codes.to_numpy()
    flags = pd.DataFrame({i: codes == i for i in range(len(SOURCES))}, index=summary.index)
    seen = flags.groupby([summary[k] for k in by], observed=True, sort=False, dropna=False).max().to_numpy()
    masks = seen.astype(np.int64) @ (1 << np.arange(len(SOURCES)))
    return pd.Categorical(np.asarray(_SOURCE_SETS, dtype=object)[masks])


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    schema = {**KEYS_SCHEMA, **AGG_SCHEMA}
    return table.astype({c: schema[c] for c in table.columns if c in schema})


def build(run: Run, by: Sequence[str] = DEFAULT_BY, filters: Filters | None = None,
          top: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, Loaded]:
    """``(coverage, table, loaded)`` for *run*: see :func:`load` and :func:`aggregate`."""
    loaded = load(run)
    return loaded.coverage, aggregate(loaded, by, filters, top), loaded


# ---------------------------------------------------------------------------------------------- diff

DIFF_CHANGES = ("appeared", "disappeared", "not captured", "changed", "same")


def diff(a: Loaded, b: Loaded, by: Sequence[str] = DIFF_BY, include_same: bool = False) -> pd.DataFrame:
    """Rows of *by* keys with ``change`` (one of :data:`DIFF_CHANGES`), ``lookups_a/_b``, ``failed_a/_b``,
    ``p50_ms_a/_b``, ``p95_ms_a/_b``, ``lookups_delta``, and last ``source_a/_b`` (the key's sources in each run,
    as in :func:`aggregate`; absent when ``source`` is one of *by*).

    ``disappeared`` means the key is gone although its host was completely captured in B; where the host was
    not (failed, partial, lost events), the change is ``not captured``: its absence proves nothing.
    ``changed``: lookups or failures differ, or p95 moved by at least one log2 bucket.
    """
    by = list(by)
    ta, tb = aggregate(a, by), aggregate(b, by)
    metrics = ["lookups", "failed", "p50_ms", "p95_ms", *(["source"] if "source" not in by else [])]
    merged = ta[[*by, *metrics]].merge(tb[[*by, *metrics]], on=by, how="outer", suffixes=("_a", "_b"),
                                       indicator=True)
    in_a, in_b = merged["_merge"] != "right_only", merged["_merge"] != "left_only"
    differs = ((merged["lookups_a"] != merged["lookups_b"]) | (merged["failed_a"] != merged["failed_b"])
               | ((merged["p95_ms_a"] / merged["p95_ms_b"]).apply(np.log2).abs() >= 1)).fillna(False)
    change = np.select([~in_a, ~in_b, differs], ["appeared", "disappeared", "changed"], "same")
    merged["change"] = change
    if "host" in by:
        complete_b = set(b.coverage.loc[b.coverage["complete"].fillna(False).astype(bool), "host"])
        lost = (merged["change"] == "disappeared") & ~merged["host"].astype(str).isin(complete_b)
        merged.loc[lost, "change"] = "not captured"
    for col in ("lookups", "failed"):  # 0 in the run without the key; a wire-only key's failed stays unknown
        merged[f"{col}_a"] = merged[f"{col}_a"].mask(~in_a, 0)
        merged[f"{col}_b"] = merged[f"{col}_b"].mask(~in_b, 0)
    merged["lookups_delta"] = merged["lookups_b"] - merged["lookups_a"]
    if not include_same:
        merged = merged[merged["change"] != "same"]
    merged["change"] = pd.Categorical(merged["change"], categories=DIFF_CHANGES)
    merged = merged.sort_values(["change", "lookups_delta", *by], key=_abs_delta_key, kind="stable")
    columns = [*by, "change", "lookups_a", "lookups_b", "lookups_delta", "failed_a", "failed_b", "p50_ms_a",
               "p50_ms_b", "p95_ms_a", "p95_ms_b", *(["source_a", "source_b"] if "source" in metrics else [])]
    out = merged[columns].reset_index(drop=True)
    return out.astype({c: "Int64" for c in ("lookups_a", "lookups_b", "lookups_delta", "failed_a", "failed_b")})


def _abs_delta_key(col: pd.Series) -> pd.Series:
    return -col.abs() if col.name == "lookups_delta" else col


# ---------------------------------------------------------------------------------------------- check

#: the tables :attr:`CheckResult.evidence` and :attr:`CheckResult.blind_spots` (``covered``: the wire source ran on
#: the host; ``wire_scope``: what it watched there)
EVIDENCE_SCHEMA = {"host": "category", "pid": "Int64", "process": "string", "name": "string", "remote": "string",
                   "connections": "Int64"}
BLIND_SPOT_SCHEMA = {**SCAN_SCHEMAS["blind_spots"], "covered": "boolean", "wire_scope": "string"}


def _empty(schema: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})


@dataclasses.dataclass
class CheckResult:
    """The answer to a change ticket.

    ``offenders``: host, process, pid, name, lookups, last_seen, source of every --absent match. ``missing``: the
    --present globs no host resolved. ``unproven``: coverage rows of the hosts whose capture is not complete.
    ``evidence``: pre-capture evidence from the host scans (:data:`EVIDENCE_SCHEMA`): connections open at
    capture start to an address a watched --absent name resolved to. ``blind_spots``: the processes the libc
    probe cannot see (:data:`BLIND_SPOT_SCHEMA`; ``covered``: the wire source ran on that host). ``notes``: one
    line each — hosts without a scan, globs without a watched name, watched names that did not resolve.
    """

    offenders: pd.DataFrame
    missing: list[str]
    unproven: pd.DataFrame
    evidence: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty(EVIDENCE_SCHEMA))
    blind_spots: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty(BLIND_SPOT_SCHEMA))
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def uncovered_hosts(self) -> list[str]:
        """Hosts with processes the libc probe cannot see and no wire source: absence is unproven there."""
        return sorted(set(self.blind_spots.loc[~self.blind_spots["covered"].astype(bool), "host"].astype(str)))

    @property
    def verdict(self) -> str:
        """``violated`` (a host resolved an absent name, or a present name was seen nowhere while every host was
        fully captured), ``unproven`` (nothing wrong seen, but not every host was fully captured, or pre-capture
        evidence, or blind spots without a wire source) or ``proven``."""
        if len(self.offenders) or (self.missing and self.unproven.empty):
            return "violated"
        return "unproven" if len(self.unproven) or len(self.evidence) or self.uncovered_hosts else "proven"

    def lines(self) -> list[str]:
        """The evidence, blind-spot and note lines printed next to the verdict (one line each, escaped text)."""
        out = [f"{r.host}: {_process_text(r.pid, r.process)} holds {r.connections} "
               f"{'connection' if r.connections == 1 else 'connections'} to {r.remote}, which {r.name} resolved to "
               "at capture start — it resolved before the capture began" for r in self.evidence.itertuples()]
        for host, rows in self.blind_spots.groupby("host", observed=True, sort=True):
            kinds = ", ".join(f"{k} {n}" for k, n in rows["reason"].astype(str).value_counts().sort_index().items())
            noun = "process" if len(rows) == 1 else "processes"
            what = f"{host}: {len(rows)} {noun} the libc probe cannot see ({kinds})"
            scope = rows["wire_scope"].dropna()
            netns = f" (wire scope {scope.iloc[0]}: processes in other network namespaces are not seen)" \
                if len(scope) and scope.iloc[0].startswith("netns:") else ""
            out.append(what + (" — covered by the wire source: their UDP/53 queries are seen; /etc/hosts lookups of "
                               f"static binaries are not{netns}" if rows["covered"].all()
                               else " and the wire source did not run: absence is unproven there"))
        return out + self.notes


def _process_text(pid: Any, process: Any) -> str:
    if pid is None or pid is pd.NA:
        return "a process the scan could not name"
    return f"pid {pid} ({'?' if process is None or process is pd.NA else process})"


def check(loaded: Loaded, absent: Sequence[str], present: Sequence[str] = ()) -> CheckResult:
    """Check the --absent and --present name globs against every host of *loaded*, with the host scans'
    pre-capture evidence and blind spots for the --absent globs (docs/report.md)."""
    if not absent and not present:
        raise UsageError("give at least one --absent or --present name glob")
    table = aggregate(loaded, ("host", "process", "pid", "name"))
    offenders = table[match_globs(table["name"], absent, fold_case=True)] if absent else table.iloc[0:0]
    missing = [g for g in present if not match_globs(table["name"], [g], fold_case=True).any()]
    unproven = loaded.coverage[~loaded.coverage["complete"].fillna(False).astype(bool)]
    result = CheckResult(offenders[["host", "process", "pid", "name", "lookups", "last_seen", "source"]]
                         .reset_index(drop=True), missing, unproven.reset_index(drop=True))
    if absent:
        result.evidence, notes = _evidence(loaded, absent)
        cov = loaded.coverage.set_index("host")
        host = loaded.blind_spots["host"].astype(str)
        result.blind_spots = loaded.blind_spots.assign(
            covered=host.map(cov["sources"].fillna("").str.contains("wire")).fillna(False).to_numpy(dtype=bool),
            wire_scope=host.map(cov["wire_scope"]).to_numpy(dtype=object),
        ).astype(BLIND_SPOT_SCHEMA).reset_index(drop=True)
        result.notes = [f"{host}: {note}" for host, note in sorted(loaded.scan_notes.items())] + notes
    return result


def _evidence(loaded: Loaded, absent: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Connections open at capture start to an address that a watched name matching an --absent glob resolved to
    (:data:`EVIDENCE_SCHEMA`), and the note lines: a glob no watched name matches, a watched name that did not
    resolve on a host."""
    watch, notes, hits = loaded.watch, [], []
    for glob in absent:
        matched = watch[match_globs(watch["name"], [glob], fold_case=True)] if len(watch) else watch
        if matched.empty:
            name = glob if not any(c in glob for c in "*?[") else f"NAME (a name matching {glob})"
            notes.append(f"no pre-capture evidence for {glob}: capture with --watch {name}")
            continue
        hits.append(matched.dropna(subset=["address"]))
        for r in matched[matched["address"].isna()].itertuples():
            notes.append(f"{r.host}: {r.name} did not resolve at capture start"
                         + ("" if r.error is pd.NA else f" ({r.error})"))
    if not hits:
        return _empty(EVIDENCE_SCHEMA), list(dict.fromkeys(notes))
    found = (pd.concat(hits).astype({"host": str}).drop_duplicates()
             .merge(loaded.connections.astype({"host": str}), left_on=["host", "address"],
                    right_on=["host", "remote_addr"]))
    evidence = (found.groupby(["host", "pid", "process", "name", "remote"], dropna=False, sort=True).size()
                .rename("connections").reset_index())
    return evidence[list(EVIDENCE_SCHEMA)].astype(EVIDENCE_SCHEMA), list(dict.fromkeys(notes))
