"""Report tables out: the terminal (rich), CSV, JSON, Parquet and a self-contained HTML page.

Every format gets the same columns (:func:`fleet.report.aggregate`); names and processes are already escaped text
(:func:`fleet.report.escape_bytes`), so they are one printable line in every format. On top of that:

* CSV: RFC 4180 quoting, UTF-8, timestamps ISO 8601 UTC with ``Z``; a text cell starting with ``=`` ``+`` ``-``
  ``@`` tab CR — or ``'`` itself, so the rule stays reversible — gets one leading ``'`` (OWASP's advice against
  formula injection). A reader strips one leading ``'`` from a text cell whose next character is one of those.
* JSON: an array of records, the same text and timestamps (no ``'`` prefix: JSON is not opened by spreadsheets).
* Parquet: typed columns (categoricals as dictionaries, timestamps as UTC timestamps).

Files are written private (0600, ``fleet/private.py``); ``-`` means stdout.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from fleet.private import open_private

#: characters that make a spreadsheet run a cell as a formula, and the quote that marks a neutralised one
FORMULA_START = r"^[=+\-@\t\r']"


# ---------------------------------------------------------------------------------------------- text cells

def iso_utc(col: pd.Series) -> pd.Series:
    """Timestamps as ISO 8601 UTC text with ``Z`` (microseconds), missing ones as <NA>."""
    naive = col.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    text = pd.Series(np.datetime_as_string(naive, unit="us"), index=col.index, dtype="string") + "Z"
    return text.mask(col.isna())  # numpy's C formatter: strftime would run per element in Python


def neutralise_formulas(col: pd.Series) -> pd.Series:
    """Prefix ``'`` to text that a spreadsheet would run as a formula (vectorised; once per category)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories.to_series().astype(str)
        return col.cat.rename_categories(cats.where(~cats.str.match(FORMULA_START), "'" + cats).to_numpy())
    text = col.astype("string")
    return text.where(~text.str.match(FORMULA_START).fillna(False), "'" + text)


def _is_text(col: pd.Series) -> bool:
    return isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(col.dtype) \
        or col.dtype == object


def as_text_table(table: pd.DataFrame, *, csv_safe: bool) -> pd.DataFrame:
    """The table with timestamps as ISO text and, for CSV, formula-like text cells neutralised."""
    out = {}
    for name, col in table.items():
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            out[name] = iso_utc(col)
        elif csv_safe and _is_text(col):
            out[name] = neutralise_formulas(col)
        else:
            out[name] = col
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------- files

@contextlib.contextmanager
def _text_out(dest: str | Path) -> Iterator[IO[str]]:
    """A UTF-8 text stream to *dest* (a private file) or, for ``-``, to stdout — UTF-8 whatever the locale."""
    if str(dest) == "-":
        sys.stdout.flush()
        stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
        try:
            yield stream
        finally:
            stream.flush()
            stream.detach()  # leave sys.stdout open
    else:
        with open_private(dest, "wb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as stream:
            yield stream


def _csv_cells(col: pd.Series) -> np.ndarray:
    """One column as CSV cell values: floats with 3 decimals, missing values as None (an empty cell)."""
    if pd.api.types.is_float_dtype(col.dtype):
        values = col.to_numpy(dtype="float64", na_value=np.nan)
        return np.where(np.isnan(values), None, np.char.mod("%.3f", values).astype(object))
    return col.to_numpy(dtype=object, na_value=None)


def write_csv(table: pd.DataFrame, dest: str | Path) -> None:
    """RFC 4180 CSV (minimal quoting, quotes doubled), one column at a time into the csv module's C writer
    (pandas' to_csv is several times slower on categorical and nullable columns)."""
    text = as_text_table(table, csv_safe=True)
    with _text_out(dest) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(text.columns)
        writer.writerows(zip(*(_csv_cells(col) for _, col in text.items()), strict=True))


def write_json(table: pd.DataFrame, dest: str | Path) -> None:
    text = as_text_table(table, csv_safe=False).to_json(orient="records", force_ascii=False, indent=1)
    with _text_out(dest) as f:
        f.write(text + "\n")


def write_parquet(table: pd.DataFrame, dest: str | Path) -> None:
    if str(dest) == "-":
        raise ValueError("Parquet goes to a file, not stdout")
    with open_private(dest, "wb") as f:
        table.to_parquet(f, engine="pyarrow", index=False)


# ---------------------------------------------------------------------------------------------- terminal

def _cell(value) -> Text:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return Text("-")
    if isinstance(value, pd.Timestamp):
        return Text(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, float):
        return Text(f"{value:.2f}")
    return Text(str(value))  # Text: a name like "[red]x" is shown as is, never read as rich markup


HEADINGS = {"host": "Host", "process": "Process", "pid": "PID", "name": "Name", "function": "Function",
            "hosts": "Hosts", "processes": "Processes", "lookups": "Lookups", "failed": "Failed",
            "p50_ms": "p50 ms", "p95_ms": "p95 ms", "first_seen": "First", "last_seen": "Last", "source": "Source",
            "exe": "Executable", "reason": "Why"}


def rich_table(table: pd.DataFrame, title: str, headings: dict[str, str] | None = None) -> Table:
    headings = {**HEADINGS, **(headings or {})}
    out = Table(*(Column(headings.get(c, c), overflow="fold") for c in table.columns), title=title)
    for row in table.itertuples(index=False, name=None):  # display only: a bounded number of rows
        out.add_row(*(_cell(v) for v in row))
    return out


def coverage_table(coverage: pd.DataFrame, title: str) -> Table:
    """The coverage rows: status, window, lookups, loss, damage, completeness, the sources that ran and the
    blind spots of the host scan (``no scan`` when there is none)."""
    out = Table(*(Column(h, overflow="fold") for h in ("Host", "Status", "Window (UTC)", "Lookups", "Lost", "Damage",
                                                       "Complete", "Sources", "Blind spots", "Reason")), title=title)
    for r in coverage.itertuples(index=False):
        start = "?" if r.window_start is pd.NaT else r.window_start.strftime("%Y-%m-%d %H:%M:%S")
        end = "?" if r.window_end is pd.NaT else r.window_end.strftime("%H:%M:%S")
        damage = "0" if not r.damage else f"{r.damage} ({r.damage_kinds})"
        style = "green" if r.complete else ("yellow" if r.status in ("partial", "empty", "captured") else "red")
        out.add_row(Text(r.host), Text(str(r.status), style=style), Text(f"{start} – {end}"), Text(str(r.lookups)),
                    Text(str(r.lost)), Text(damage), Text("yes" if r.complete else "no", style=style),
                    Text("-" if r.sources is pd.NA else str(r.sources)),
                    Text("no scan" if r.blind_spots is pd.NA else str(r.blind_spots)),
                    Text("" if r.reason is pd.NA else str(r.reason)))
    return out


def print_tables(console: Console, *tables: Table) -> None:
    """Print tables; into a pipe or file at full width (a terminal's width would fold every long name)."""
    if not console.is_terminal:
        console = Console(file=console.file, highlight=False, soft_wrap=True, width=250)
    for t in tables:
        console.print(t)


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}.bad{color:#b00}.ok{color:#070}svg{background:#fafafa;border:1px solid #ddd}
h2{margin-top:1.5em}.note{color:#666}"""
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def _e(value) -> str:
    return html.escape("" if value is None or value is pd.NA or value is pd.NaT else str(value), quote=True)


def _html_table(df: pd.DataFrame) -> str:
    text = as_text_table(df, csv_safe=False)
    head = "".join(f"<th>{_e(c)}</th>" for c in text.columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                   for row in text.itertuples(index=False, name=None))
    return f"<table><tr>{head}</tr>{body}</table>"


def _bars(labels: list[str], values: list[float], *, failed: list[float] | None = None, color: str = "#1f77b4",
          width: int = 720) -> str:
    """Horizontal bars (an inline SVG), optionally with the failed share in red."""
    if not values:
        return '<p class="note">nothing to plot</p>'
    row, label_w = 18, 260
    top = max(values) or 1
    parts = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        y = i * row
        w = (width - label_w - 70) * v / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{_e(label[:40])}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{color}"/>')
        if failed:
            fw = (width - label_w - 70) * failed[i] / top
            parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{fw:.1f}" height="{row - 6}" fill="#d62728"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="12">{_e(f"{v:g}")}</text>')
    return f'<svg width="{width}" height="{len(values) * row + 4}">{"".join(parts)}</svg>'


def _lines(minutes: pd.DataFrame, width: int = 720, height: int = 240) -> str:
    """Lookups per minute, one line per host (the 10 busiest), as an inline SVG."""
    if minutes.empty:
        return '<p class="note">nothing to plot</p>'
    per = minutes.groupby(["host", "minute"], observed=True)["count"].sum().reset_index()
    busiest = per.groupby("host", observed=True)["count"].sum().nlargest(10).index
    per = per[per["host"].isin(busiest)]
    t0, t1 = per["minute"].min(), per["minute"].max()
    span = max((t1 - t0).total_seconds(), 60.0)
    top = float(per["count"].max()) or 1.0
    pad, legend_w = 40, 140
    plot_w = width - pad - legend_w
    parts = [f'<text x="4" y="14" font-size="11">{top:g}/min</text>',
             f'<text x="4" y="{height - 24}" font-size="11">0</text>',
             f'<text x="{pad}" y="{height - 4}" font-size="11">{_e(t0.strftime("%Y-%m-%d %H:%M"))} UTC</text>',
             f'<text x="{pad + plot_w}" y="{height - 4}" font-size="11" text-anchor="end">'
             f'{_e(t1.strftime("%H:%M"))}</text>']
    for i, (host, g) in enumerate(per.groupby("host", observed=True)):
        x = pad + (g["minute"] - t0).dt.total_seconds().to_numpy() / span * plot_w
        y = (height - 24) - g["count"].to_numpy(dtype=float) / top * (height - 44)
        color = _PALETTE[i % len(_PALETTE)]
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{width - legend_w + 8}" y="{20 + i * 16}" font-size="12" fill="{color}">'
                     f'{_e(host)}</text>')
    return f'<svg width="{width}" height="{height}">{"".join(parts)}</svg>'


def write_html(dest: str | Path, *, run_id: str, coverage: pd.DataFrame, table: pd.DataFrame,
               by_name: pd.DataFrame, minutes: pd.DataFrame, histogram: pd.DataFrame,
               blind_spots: pd.DataFrame | None = None) -> None:
    """One self-contained page (inline CSS and SVG, no scripts, every text escaped): coverage, the host scans'
    blind spots (when any), lookups over time per host, top names, failures, latency distribution, and the report
    table (first 500 rows)."""
    known = by_name.assign(failed=by_name["failed"].fillna(0))  # wire-only names: result unknown
    top = known.head(25)
    failing = known[known["failed"] > 0].sort_values("failed", ascending=False).head(25)
    per_bucket = histogram.groupby("bucket")["count"].sum().sort_index() if len(histogram) else pd.Series()
    bucket_labels = [_latency_label(int(b)) for b in per_bucket.index]
    incomplete = coverage[~coverage["complete"].fillna(False).astype(bool)]
    warning = (f'<p class="bad">{len(incomplete)} of {len(coverage)} hosts not completely captured: '
               "no lookups there does not mean none happened.</p>") if len(incomplete) else \
        '<p class="ok">Every host was captured for the whole window, nothing lost.</p>'
    blind = "" if blind_spots is None or blind_spots.empty else (
        '<h2>Processes the libc probe cannot see</h2><p class="note">host scan at capture start; the wire source '
        f"sees their UDP/53 queries</p>{_html_table(blind_spots)}")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fleetdns report {_e(run_id)}</title>
<style>{_CSS}</style></head><body>
<h1>fleetdns report {_e(run_id)}</h1>
<h2>Coverage</h2>{warning}{_html_table(coverage)}
{blind}<h2>Lookups over time, per host</h2>{_lines(minutes)}
<h2>Top names</h2><p class="note">lookups; failed in red</p>
{_bars(list(top["name"].astype(str)), [float(v) for v in top["lookups"]], failed=[float(v) for v in top["failed"]])}
<h2>Failures by name</h2>
{_bars(list(failing["name"].astype(str)), [float(v) for v in failing["failed"]], color="#d62728")}
<h2>Latency distribution</h2><p class="note">lookups per latency band (log2 buckets), all hosts</p>
{_bars(bucket_labels, [float(v) for v in per_bucket.to_numpy()])}
<h2>Report</h2>{_html_table(table.head(500))}
</body></html>
"""
    with _text_out(dest) as f:
        f.write(page)


def _latency_label(bucket: int) -> str:
    lo = 2.0**bucket / 1e6
    return f"{lo:.3g}–{2 * lo:.3g} ms"
