"""Start a capture run on every host at once, watch it with cheap status polls, stop it; then gather.

API::

    fleet = connect(hosts) -> {host: Connection}              # lazily opened, one per host
    run = new(inventory, limit, hosts, options, argv)         # the run directory, every host pending
    start(run, fleet, options, on_host) -> None               # concurrently; manifest: running | failed | unreachable
    watch(run, fleet, view, until=None) -> None               # polls status.json until every host ended
    stop(run, fleet) -> None                                  # asks every running host to end now

``options`` (also the manifest's ``options``): ``backend``, ``mode``, ``duration_s``, ``names``, ``max_bytes``,
``label``, ``source`` (libc|wire|both; None: the host's default), ``wire_scope`` (auto|all|netns), ``watch``
(names each host's scan resolves: docs/scan.md). The host side is fleet/hostrun.py; statuses are those of
fleet/store.py.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.table import Table

from fleet import store
from fleet.gather import PROBE, ManifestLock, host_fields, remote_dir
from fleet.hostrun import ATTACH_SLACK, FINAL_STATES
from fleet.inventory import Host
from fleet.ssh import Connection, SshError
from fleet.store import Run

POOL = 32
POLL = 1.0
#: after the last deadline, how long a host may take to write its trailer before the watch gives up on it
END_GRACE = 20.0


def connect(hosts: list[Host]) -> dict[str, Connection]:
    return {h.name: Connection(h) for h in hosts}


def new(inventory: str, limit: str | None, hosts: list[Host], options: dict[str, Any], argv: list[str]) -> Run:
    run = store.new_run(options, inventory, limit, [h.name for h in hosts])
    created = datetime.datetime.fromisoformat(run.manifest["created"])
    run.manifest["command"] = argv
    run.manifest["requested"] = {
        "start": run.manifest["created"],
        "end": (created + datetime.timedelta(seconds=options["duration_s"])).isoformat(timespec="seconds")}
    for entry in run.manifest["hosts"].values():
        entry["started"] = False
    run.save()
    return run


def _start_argv(run: Run, options: dict[str, Any]) -> list[str]:
    argv = [PROBE, "run", "start", run.id, "--duration", f"{options['duration_s']:g}",
            "--backend", options["backend"], "--mode", options["mode"]]
    argv += [f"--names={n}" for n in options.get("names") or ()]
    argv += [f"--watch={n}" for n in options.get("watch") or ()]
    if options.get("source"):
        argv.append(f"--source={options['source']}")
    if options.get("wire_scope"):
        argv.append(f"--wire-scope={options['wire_scope']}")
    if options.get("max_bytes"):
        argv.append(f"--max-bytes={options['max_bytes']}")
    return argv


def start(run: Run, fleet: dict[str, Connection], options: dict[str, Any],
          on_host: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Start the recorder on every host concurrently; each host ends ``running``, ``failed`` or ``unreachable``."""
    manifest = ManifestLock(run)

    def one(conn: Connection) -> None:
        host = conn.host.name
        try:
            rc, out, err = conn.run(_start_argv(run, options), timeout=90)
        except SshError as exc:
            status = "unreachable" if exc.kind == "unreachable" else "failed"
            manifest.update(host, status=status, reason=str(exc))
        else:
            try:
                result = json.loads(out)
            except ValueError:
                result = {}
            if result:
                manifest.update(host, **host_fields(result), started=bool(result.get("pid")))
            if rc == 0:
                manifest.update(host, status="running", reason=None)
            else:
                reason = result.get("error") or (err.strip().splitlines() or [f"exit status {rc}"])[-1]
                manifest.update(host, status="failed", reason=f"could not start: {reason}")
        if on_host is not None:
            on_host(host, run.manifest["hosts"][host])

    with ThreadPoolExecutor(max(1, min(POOL, len(fleet)))) as pool:
        list(pool.map(one, fleet.values()))


def _poll(conn: Connection, run_id: str) -> dict[str, Any]:
    """A host's status.json through SFTP (no process started on the host); {"error": …} when it cannot be read."""
    try:
        return json.loads(conn.read_file(f"{remote_dir(run_id)}/status.json"))
    except (SshError, FileNotFoundError, ValueError) as exc:
        return {"error": str(exc) or type(exc).__name__}


def stop(run: Run, fleet: dict[str, Connection]) -> None:
    """Ask every started host to end its capture now (the recorder writes its trailer)."""
    targets = [c for h, c in fleet.items() if run.manifest["hosts"][h].get("started")]

    def one(conn: Connection) -> None:
        try:
            conn.run([PROBE, "run", "stop", run.id], timeout=30)
        except SshError:
            pass  # an unreachable host ends at its own deadline; gather reports it

    with ThreadPoolExecutor(max(1, min(POOL, len(targets) or 1))) as pool:
        list(pool.map(one, targets))


class LiveView:
    """The table the live view shows: per host state, events, lost, bytes; time left in the title."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rows: dict[str, dict[str, Any]] = {}
        self.ends_at: float | None = None

    def __rich__(self) -> Table:
        left = "" if self.ends_at is None else f" — {max(0, self.ends_at - time.time()):.0f}s left"
        table = Table("host", "state", "events", "lost", "bytes", title=f"run {self.run.id}{left}",
                      title_justify="left")
        for host, entry in self.run.manifest["hosts"].items():
            row = self.rows.get(host)
            if not entry.get("started") or row is None:
                table.add_row(host, entry["status"], "", "", "")
            elif "error" in row:
                table.add_row(host, f"[yellow]no answer[/] ({row['error'][:40]})", "", "", "")
            else:
                table.add_row(host, row.get("state", "?"), str(row.get("events", 0)), str(row.get("lost", 0)),
                              str(row.get("bytes", 0)))
        return table


def _deadline(status: dict[str, Any]) -> float | None:
    d = status.get("deadline")
    return datetime.datetime.fromisoformat(d).timestamp() if d else None


def watch(run: Run, fleet: dict[str, Connection], view: LiveView, until: float | None = None) -> None:
    """Poll every started host about once a second until each has ended (or, for a host that stops answering,
    its deadline plus END_GRACE has passed); ``until`` (epoch s) caps the wait."""
    requested_end = datetime.datetime.fromisoformat(run.manifest["requested"]["end"]).timestamp()
    give_up = requested_end + ATTACH_SLACK + END_GRACE
    if until is not None:
        give_up = min(give_up, until)
    hosts = [h for h in fleet if run.manifest["hosts"][h].get("started")]
    with ThreadPoolExecutor(max(1, min(POOL, len(hosts) or 1))) as pool:
        while hosts:
            results = dict(zip(hosts, pool.map(lambda h: _poll(fleet[h], run.id), hosts), strict=True))
            for h, r in results.items():  # a host that does not answer keeps its last known status
                view.rows[h] = r if "state" in r else {**view.rows.get(h, {}), "error": r["error"]}
            deadlines = [d for r in view.rows.values() if (d := _deadline(r)) is not None]
            view.ends_at = max(deadlines) if deadlines else requested_end
            now = time.time()
            hosts = [h for h in hosts
                     if view.rows[h].get("state") not in FINAL_STATES
                     and now < (_deadline(view.rows[h]) or requested_end) + END_GRACE]
            if now > give_up:
                return
            if hosts:
                time.sleep(POLL)
