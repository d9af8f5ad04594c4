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
* :func:`aggregate` → the report table: the ``by`` keys, then ``hosts`` / ``processes`` (distinct counts, when
  ``host`` / ``process`` are not keys), ``lookups``, ``failed``, ``p50_ms``, ``p95_ms``, ``first_seen``,
  ``last_seen``; sorted by lookups, descending.

``name`` and ``process`` are :func:`escape_bytes` text: unambiguous, printable, one line (docs/report.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gzip
import multiprocessing
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from fleet import capture_format
from fleet.errors import InputError, UsageError
from fleet.store import STATUSES, Run

GROUP_KEYS = ("host", "process", "pid", "name", "function")
DEFAULT_BY = ("host", "process", "pid", "name")
DIFF_BY = ("host", "process", "name")  # not pid: it changes when a process restarts
#: statuses whose host may have a capture file to read
READABLE = ("captured", "empty", "partial", "running", "pending")

KEYS_SCHEMA = {"host": "category", "pid": "Int64", "uid": "Int64", "process": "category",
               "function": "category", "name": "category"}
AGG_SCHEMA = {"lookups": "Int64", "failed": "Int64", "hosts": "Int64", "processes": "Int64",
              "p50_ms": "Float64", "p95_ms": "Float64",
              "first_seen": "datetime64[ns, UTC]", "last_seen": "datetime64[ns, UTC]"}
COVERAGE_SCHEMA = {"host": "string", "status": "category", "reason": "string",
                   "window_start": "datetime64[ns, UTC]", "window_end": "datetime64[ns, UTC]",
                   "mode": "string", "lookups": "Int64", "lost": "Int64", "damage": "Int64",
                   "damage_kinds": "string", "complete": "boolean"}


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


# ---------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class Loaded:
    """One run, read: per-key tables of every readable host, and the coverage of every host of the manifest."""

    run: Run
    summary: pd.DataFrame
    histogram: pd.DataFrame
    minutes: pd.DataFrame
    coverage: pd.DataFrame


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


def _load_host(run: Run, host: str) -> tuple[dict[str, Any], list[pd.DataFrame]]:
    """One host: its coverage row and, when it has a readable capture, its reduced summary, histogram and
    minutes tables (empty list otherwise). Pure function of the run store: runs in a worker process too."""
    entry = run.manifest["hosts"][host]
    status = entry.get("status") if entry.get("status") in STATUSES else "failed"
    reason = entry.get("reason")
    window = entry.get("window") if isinstance(entry.get("window"), dict) else {}
    row = {"host": host, "status": status, "reason": reason, "window_start": _timestamp(window.get("start")),
           "window_end": _timestamp(window.get("end")), "mode": None, "lookups": 0,
           "lost": int(entry.get("lost") or 0), "damage": 0, "damage_kinds": None}
    tables: list[pd.DataFrame] = []
    capture = None
    if status in READABLE:
        try:
            capture = _read_capture_file(run, host)
        except InputError as e:
            row.update(damage=1, damage_kinds="unreadable", reason=f"capture unreadable: {e}")
    if capture is not None:
        markers = _markers(run, host)
        summary = _reduce(capture.summary, host, markers)
        tables = [summary, _reduce(capture.histogram, host, markers),
                  _reduce(capture.minutes, host, markers)[["host", "process", "name", "minute", "count"]]]
        row.update(mode=capture.mode, lookups=int(summary["lookups"].sum()), lost=max(row["lost"], capture.lost),
                   damage=sum(capture.damage.values()),
                   damage_kinds=", ".join(f"{k} {v}" for k, v in sorted(capture.damage.items())) or None)
        if row["window_start"] is pd.NaT and capture.header.get("start_time"):
            row["window_start"] = _timestamp(capture.header["start_time"])
        if row["window_end"] is pd.NaT and capture.trailer and capture.trailer.get("end_time_ns"):
            row["window_end"] = pd.Timestamp(int(capture.trailer["end_time_ns"]), unit="ns", tz="UTC")
    elif status in ("captured", "empty") and row["damage"] == 0:
        row.update(damage=1, damage_kinds="missing_file", reason=reason or "no capture file in the run store")
    # absence is provable only where the whole window was captured with nothing lost or damaged
    row["complete"] = status in ("captured", "empty") and row["lost"] == 0 and row["damage"] == 0
    return row, tables


#: below this many hosts, starting worker processes costs more than it saves
PARALLEL_MIN_HOSTS = 8


def load(run: Run, workers: int | None = None) -> Loaded:
    """Read every host of *run*: per-key tables of those with a capture, coverage for all of them.

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
    per_table = [[tables[i] for _, tables in results if tables] for i in range(3)]
    return Loaded(run, _concat(per_table[0], "summary"), _concat(per_table[1], "histogram"),
                  _concat(per_table[2], "minutes"), _coverage_frame([row for row, _ in results]))


def _concat(frames: list[pd.DataFrame], table: str) -> pd.DataFrame:
    """Concatenate per-host tables; key columns to their KEYS_SCHEMA dtypes (categoricals built once here)."""
    columns = {"summary": ["host", "pid", "uid", "process", "function", "name", "lookups", "failures",
                           "first_time", "last_time"],
               "histogram": ["host", "pid", "uid", "process", "function", "name", "bucket", "count"],
               "minutes": ["host", "process", "name", "minute", "count"]}[table]
    frames = [f for f in frames if not f.empty]
    if not frames:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        frames = [empty]
    df = pd.concat([f[columns] for f in frames], ignore_index=True)
    dtypes = {c: KEYS_SCHEMA[c] for c in columns if c in KEYS_SCHEMA}
    dtypes.update({"lookups": "Int64", "failures": "Int64", "count": "Int64", "bucket": "Int64",
                   "first_time": "datetime64[ns, UTC]", "last_time": "datetime64[ns, UTC]",
                   "minute": "datetime64[ns, UTC]"})
    return df.astype({c: t for c, t in dtypes.items() if c in df.columns}).rename(
        columns={"failures": "failed", "first_time": "first_seen", "last_time": "last_seen"})


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
    """The report table (columns in the module docstring), filtered, grouped by *by*, sorted by lookups."""
    by = list(by)
    filters = filters or Filters()
    summary, histogram = filters.apply(loaded.summary), filters.apply(loaded.histogram)
    aggs: dict[str, tuple[str, str]] = {}
    if "host" not in by:
        aggs["hosts"] = ("host", "nunique")
    if "process" not in by:
        aggs["processes"] = ("process", "nunique")
    aggs.update(lookups=("lookups", "sum"), failed=("failed", "sum"), first_seen=("first_seen", "min"),
                last_seen=("last_seen", "max"))
    columns = [*by, *[c for c in ("hosts", "processes") if c in aggs], "lookups", "failed", "p50_ms", "p95_ms",
               "first_seen", "last_seen"]
    if summary.empty:
        return _typed(pd.DataFrame({c: pd.Series(dtype=object) for c in columns}))
    table = summary.groupby(by, observed=True, sort=False, dropna=False).agg(**aggs).reset_index()
    if filters.failed_only:
        table = table[table["failed"] > 0]
    table = table.merge(percentiles(histogram, by), on=by, how="left")
    sort_keys = ["lookups", *by]
    table = table.sort_values(sort_keys, ascending=[False] + [True] * len(by), kind="stable", na_position="last")
    if top:
        table = table.head(top)
    return _typed(table[columns].reset_index(drop=True))


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
    ``p50_ms_a/_b``, ``p95_ms_a/_b``, ``lookups_delta``.

    ``disappeared`` means the key is gone although its host was completely captured in B; where the host was
    not (failed, partial, lost events), the change is ``not captured``: its absence proves nothing.
    ``changed``: lookups or failures differ, or p95 moved by at least one log2 bucket.
    """
    by = list(by)
    ta, tb = aggregate(a, by), aggregate(b, by)
    metrics = ["lookups", "failed", "p50_ms", "p95_ms"]
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
    for col in ("lookups", "failed"):
        merged[f"{col}_a"] = merged[f"{col}_a"].fillna(0)
        merged[f"{col}_b"] = merged[f"{col}_b"].fillna(0)
    merged["lookups_delta"] = merged["lookups_b"] - merged["lookups_a"]
    if not include_same:
        merged = merged[merged["change"] != "same"]
    merged["change"] = pd.Categorical(merged["change"], categories=DIFF_CHANGES)
    merged = merged.sort_values(["change", "lookups_delta", *by], key=_abs_delta_key, kind="stable")
    columns = [*by, "change", "lookups_a", "lookups_b", "lookups_delta", "failed_a", "failed_b",
               "p50_ms_a", "p50_ms_b", "p95_ms_a", "p95_ms_b"]
    out = merged[columns].reset_index(drop=True)
    return out.astype({c: "Int64" for c in ("lookups_a", "lookups_b", "lookups_delta", "failed_a", "failed_b")})


def _abs_delta_key(col: pd.Series) -> pd.Series:
    return -col.abs() if col.name == "lookups_delta" else col


# ---------------------------------------------------------------------------------------------- check

@dataclasses.dataclass
class CheckResult:
    """The answer to a change ticket.

    ``offenders``: host, process, pid, name, lookups, last_seen of every --absent match. ``missing``: the
    --present globs no host resolved. ``unproven``: coverage rows of the hosts whose capture is not complete.
    """

    offenders: pd.DataFrame
    missing: list[str]
    unproven: pd.DataFrame

    @property
    def verdict(self) -> str:
        """``violated`` (a host resolved an absent name, or a present name was seen nowhere while every host was
        fully captured), ``unproven`` (nothing wrong seen, but not every host was fully captured) or ``proven``."""
        if len(self.offenders) or (self.missing and self.unproven.empty):
            return "violated"
        return "unproven" if len(self.unproven) else "proven"


def check(loaded: Loaded, absent: Sequence[str], present: Sequence[str] = ()) -> CheckResult:
    """Check the --absent and --present name globs against every host of *loaded*."""
    if not absent and not present:
        raise UsageError("give at least one --absent or --present name glob")
    table = aggregate(loaded, ("host", "process", "pid", "name"))
    offenders = table[match_globs(table["name"], absent, fold_case=True)] if absent else table.iloc[0:0]
    missing = [g for g in present if not match_globs(table["name"], [g], fold_case=True).any()]
    unproven = loaded.coverage[~loaded.coverage["complete"].fillna(False).astype(bool)]
    return CheckResult(offenders[["host", "process", "pid", "name", "lookups", "last_seen"]].reset_index(drop=True),
                       missing, unproven.reset_index(drop=True))
