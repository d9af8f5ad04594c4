"""The live table of ``fleetdns probe --table``: the seed's ``Process | PID | Name``, plus result and latency.

The probe's reader thread only appends rows to a bounded deque (:meth:`LookupTable.add`), so a slow terminal can
never hold up the backend's output pipe and make it lose events; rich's ``Live`` redraws from the deque a few
times a second on stderr. Names are shown with odd bytes escaped (``\\n``, ``\\x1b``…): a name can never move the
cursor or forge a row.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from rich.table import Table
from rich.text import Text

#: rows kept for display; older ones scroll away (the capture file keeps every lookup)
ROWS = 40


class LookupTable:
    """Rows of lookups for a rich ``Live`` display; ``add`` is the probe's ``table_callback``."""

    def __init__(self, rows: int = ROWS) -> None:
        self.rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=rows)
        self.total = 0
        self.failed = 0
        self.lock = threading.Lock()

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows.append(row)
            self.total += 1
            self.failed += row["result"] != "OK"

    def __rich__(self) -> Table:
        with self.lock:
            rows = list(self.rows)
            total, failed = self.total, self.failed
        table = Table("Time (UTC)", "Process", "PID", "Name", "Function", "Result", "Latency",
                      title=f"{total} lookups, {failed} failed", title_justify="left", expand=False)
        for r in rows:
            table.add_row(r["time"].strftime("%H:%M:%S.%f")[:-3], Text(r["comm"]), str(r["pid"]), Text(r["name"]),
                          r["function"], Text(r["result"], style="red" if r["result"] != "OK" else ""),
                          _latency(r["latency_ns"]))
        return table


def _latency(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} µs"
