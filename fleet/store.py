"""The local run store: one directory per capture run, its manifest the contract between the stages.

Layout (every directory 0700, every file 0600: DNS logs are personal data)::

    $FLEETDNS_REPORTS (default: $FLEETDNS_HOME/reports) /
        RUN/                       a run id: YYYYmmddTHHMMSSZ (UTC start), "-2", "-3"… on a clash
            manifest.json          written atomically (temp file + rename) after every change
            raw/HOST.capture       the host's capture file as written on the host (capture format v1)
            raw/HOST.capture.gz    … or gzip'd, when gathered with --compress
            raw/HOST.scan.json     the host scan taken when its capture started (fleet/hostscan.py, docs/scan.md)

``manifest.json`` (format ``fleetdns-run/1``)::

    {"format": "fleetdns-run/1", "run": RUN, "created": ISO-8601 UTC,
     "inventory": PATH, "limit": PATTERN | null,
     "options": {"backend", "mode", "duration_s", "names": [GLOB…], "cgroup", "interval_s", …},
     "hosts": {HOST: {"status": STATUS, "reason": TEXT | null, "file": "raw/HOST.capture" | null,
                      "bytes": N | null, "sha256": HEX | null, "lost": N | null, "records": N | null,
                      "backend": NAME | null, "window": {"start": ISO | null, "end": ISO | null},
                      "scan": null | {"blind_spots": N, "connections": N, "watch": N, "error": null | TEXT}}}}

``scan`` is null until gather pulled the host's scan (:func:`scan_summary`); the counts are null when there is no
scan to count (``error`` says why).

``STATUS`` is one of :data:`STATUSES`: ``pending`` (started, not gathered yet), ``running``, ``captured`` (the whole
window, trailer present), ``empty`` (captured, no lookups), ``partial`` (a file, but the capture ended early, lost
events or has no trailer), ``failed`` (the probe did not run or left no file), ``unreachable`` (no SSH).

API::

    new_run(options, inventory, limit, hosts) -> Run     # creates RUN/ with every host "pending"
    open_run(run_id | None) -> Run                       # None: the newest run; InputError on a bad or unknown id
    list_runs() -> list[Run]                             # newest first
    run.manifest (dict), run.path, run.id, run.raw_dir, run.host_file(host, compressed=False) -> Path
    run.scan_file(host) -> Path                          # raw/HOST.scan.json
    scan_summary(scan | None, error=None) -> dict        # a host entry's "scan"
    run.update_host(host, **fields); run.save()
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.errors import InputError
from fleet.home import home
from fleet.private import private_dir, write_json_atomic

FORMAT = "fleetdns-run/1"
STATUSES = ("pending", "running", "captured", "empty", "partial", "failed", "unreachable")
RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-\d{1,4})?$")
#: a host name safe as a file name: Ansible inventory names, no path separators, no leading dot
_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,252}$")


def reports_dir() -> Path:
    return Path(os.environ.get("FLEETDNS_REPORTS") or home() / "reports").resolve()


def check_host_name(host: str) -> str:
    if not _HOST_RE.match(host):
        raise InputError(f"host name {host!r} cannot name a file in the run store")
    return host


@dataclass
class Run:
    """One run directory and its manifest (a dict in the layout above)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def raw_dir(self) -> Path:
        return self.path / "raw"

    def host_file(self, host: str, compressed: bool = False) -> Path:
        return self.raw_dir / (check_host_name(host) + (".capture.gz" if compressed else ".capture"))

    def scan_file(self, host: str) -> Path:
        return self.raw_dir / (check_host_name(host) + ".scan.json")

    def update_host(self, host: str, **fields: Any) -> None:
        entry = self.manifest["hosts"].setdefault(host, _host_entry())
        entry.update(fields)

    def save(self) -> None:
        write_json_atomic(self.path / "manifest.json", self.manifest)


def _host_entry() -> dict[str, Any]:
    return {"status": "pending", "reason": None, "file": None, "bytes": None, "sha256": None, "lost": None,
            "records": None, "backend": None, "window": {"start": None, "end": None}, "scan": None}


def scan_summary(scan: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """A host entry's ``scan``: how many blind spots, connections and watched names its scan.json holds, and
    its first error (with how many more) — or, with no scan (*scan* None), null counts and *error*."""
    if scan is None:
        return {"blind_spots": None, "connections": None, "watch": None, "error": error or "no scan"}

    def count(key: str) -> int | None:
        value = scan.get(key)
        return len(value) if isinstance(value, list) else None

    errors = scan.get("errors") if isinstance(scan.get("errors"), list) else []
    if error is None and errors:
        error = str(errors[0]) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
    return {"blind_spots": count("blind_spots"), "connections": count("connections"), "watch": count("watch"),
            "error": error}


def new_run_id(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def new_run(options: dict[str, Any], inventory: str, limit: str | None, hosts: list[str]) -> Run:
    """Create a run directory (a unique id, ``-2``… on a clash) with every host ``pending``."""
    root = private_dir(reports_dir())
    base = new_run_id()
    for n in range(1, 10000):
        run_id = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(root / run_id, 0o700)
        except FileExistsError:
            continue
        break
    path = root / run_id
    private_dir(path / "raw")
    manifest = {"format": FORMAT, "run": run_id,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "inventory": inventory, "limit": limit, "options": options,
                "hosts": {check_host_name(h): _host_entry() for h in hosts}}
    run = Run(path, manifest)
    run.save()
    return run


def _load(path: Path) -> Run:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"run {path.name}: no manifest.json in {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"run {path.name}: unreadable manifest.json ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"run {path.name}: manifest.json is not {FORMAT}")
    return Run(path, manifest)


def list_runs() -> list[Run]:
    """Every run in the store, newest first (directories that are not runs are ignored)."""
    root = reports_dir()
    if not root.is_dir():
        return []
    runs = []
    for p in sorted(root.iterdir(), key=lambda p: _sort_key(p.name), reverse=True):
        if RUN_ID_RE.match(p.name) and (p / "manifest.json").exists():
            try:
                runs.append(_load(p))
            except InputError:
                continue
    return runs


def _sort_key(run_id: str) -> tuple[str, int]:
    base, _, n = run_id.partition("-")
    return base, int(n) if n.isdigit() else 1


def open_run(run_id: str | None = None) -> Run:
    """The run *run_id*, or the newest one when None."""
    if run_id is None:
        runs = list_runs()
        if not runs:
            raise InputError(f"no runs in {reports_dir()} (start one with 'fleetdns capture')")
        return runs[0]
    if not RUN_ID_RE.match(run_id):
        raise InputError(f"bad run id {run_id!r}: expected YYYYmmddTHHMMSSZ, e.g. 20261125T213000Z")
    path = reports_dir() / run_id
    if not path.is_dir():
        raise InputError(f"no run {run_id} in {reports_dir()}")
    return _load(path)
