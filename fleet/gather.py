"""Pull every host's capture of a run into the run store, verify it, and classify the host in the manifest.

API::

    pull(run, fleet, *, keep_remote=False, compress=False, wait=30.0, on_host=None) -> None
    classify(status) -> (manifest status, reason | None)        # pure: a host's final status.json → status
    summary(run) -> {status: count}

Per host (hosts in parallel, a bounded pool), skipping hosts whose file is already safely local and hosts that
never started: the final ``status.json`` with the host's SHA-256 (read over SFTP; from ``fleetdns-probe run
finish RUN --wait S`` while the recorder is still ending or was killed) → SFTP fetch into ``raw/HOST.capture.part``
(continued from its length on a re-run) → size and SHA-256 checked → renamed (or gzip'd with ``compress``) →
manifest updated → the host's run directory deleted unless ``keep_remote``. Before the capture, the host scan
(``scan.json``, small: read whole, through ``sudo -n cat`` with become) is copied to ``raw/HOST.scan.json`` and
summarised in the host's ``scan`` (fleet/store.py).
A host that fails keeps its reason in the manifest and what is on its disk; the others carry on.
"""

from __future__ import annotations

import gzip
import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleet.private import open_private
from fleet.ssh import Connection, IntegrityError, SshError
from fleet.store import Run, scan_summary

PROBE = "/opt/fleetdns/bin/fleetdns-probe"
REMOTE_RUNS = "/var/lib/fleetdns/runs"
POOL = 16
#: statuses whose local file is complete and verified: a later gather leaves them alone
GATHERED = ("captured", "empty", "partial")
OK_STATUSES = ("captured", "empty")


def remote_dir(run_id: str) -> str:
    return f"{REMOTE_RUNS}/{run_id}"


def classify(status: dict[str, Any]) -> tuple[str, str | None]:
    """The manifest status of a host from its final ``status.json`` (see fleet/hostrun.py) and why."""
    state = status.get("state")
    if not status.get("attached"):
        return "failed", status.get("error") or "the probe never attached"
    reasons = []
    if state == "failed":
        reasons.append(status.get("error") or "the recorder failed")
    elif state == "killed":
        reasons.append("the recorder was killed before it finished (no trailer)")
    stop = status.get("stop_reason")
    if stop == "max-bytes":
        reasons.append(f"--max-bytes reached at {status.get('bytes')} bytes: {status.get('dropped')} records dropped")
    elif stop in ("stopped", "signal"):
        reasons.append(f"stopped early at {status.get('ended')}")
    elif stop == "backend-exit":
        reasons.append(f"the backend exited early (exit status {status.get('exit_status')})")
    lost = status.get("lost") or 0
    if lost and stop != "max-bytes":
        reasons.append(f"{lost} events lost")
    if reasons:
        return "partial", "; ".join(r for r in reasons if r)
    # summary mode does not count lookups on the host (events is None): its file is "captured" whatever it holds
    return ("empty" if status.get("events") == 0 else "captured"), None


def host_fields(status: dict[str, Any]) -> dict[str, Any]:
    """Manifest fields taken from a host's status.json."""
    return {"backend": status.get("backend"), "libc": status.get("libc"), "marker": status.get("marker"),
            "records": status.get("records"), "events": status.get("events"), "lost": status.get("lost"),
            "dropped": status.get("dropped"), "stop_reason": status.get("stop_reason"),
            "window": {"start": status.get("attached_at"), "end": status.get("ended")}}


def summary(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in run.manifest["hosts"].values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts


class ManifestLock:
    """Serialises manifest updates from the host threads; every update is saved at once (atomically)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.lock = threading.Lock()

    def update(self, host: str, **fields: Any) -> None:
        with self.lock:
            self.run.update_host(host, **fields)
            self.run.save()


def _pull_host(run: Run, conn: Connection, manifest: ManifestLock, keep_remote: bool, compress: bool,
               wait: float) -> None:
    host = conn.host.name
    try:
        status, rc, err = _final_status(conn, run.id, wait)
    except SshError as exc:
        manifest.update(host, status="unreachable", reason=f"{exc} (the capture stays on the host: gather again)")
        return
    if status is None:
        manifest.update(host, status="failed", reason=(err.strip().splitlines() or [f"exit status {rc}"])[-1])
        return
    manifest.update(host, **host_fields(status))
    if rc != 0:
        manifest.update(host, status="running", reason=f"still {status.get('state')} after waiting {wait:g}s")
        return
    if not status.get("sha256"):
        manifest.update(host, status="failed", reason=status.get("error") or "the host has no capture file")
        return
    try:
        manifest.update(host, scan=pull_scan(run, conn))
    except SshError as exc:
        manifest.update(host, status="unreachable", reason=f"{exc} (the capture stays on the host: gather again)")
        return
    part = run.host_file(host).with_name(run.host_file(host).name + ".part")
    try:
        moved = conn.fetch(f"{remote_dir(run.id)}/capture", part, size=status["bytes"], sha256=status["sha256"])
    except SshError as exc:
        manifest.update(host, status="unreachable",
                        reason=f"{exc} (kept {part.name}: gather again to continue)")
        return
    except (IntegrityError, FileNotFoundError) as exc:
        manifest.update(host, status="failed", reason=f"{exc} (gather again to retry)")
        return
    if compress:
        target = run.host_file(host, compressed=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(part, "rb") as src, open_private(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                                                     compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(target)
        part.unlink()
    else:
        target = run.host_file(host)
        part.rename(target)
    result, reason = classify(status)
    manifest.update(host, status=result, reason=reason, file=str(target.relative_to(run.path)),
                    bytes=status["bytes"], sha256=status["sha256"], resumed_from=status["bytes"] - moved)
    if not keep_remote:
        _remove(conn, run.id)


def pull_scan(run: Run, conn: Connection) -> dict[str, Any]:
    """Copy the host's ``scan.json`` into ``raw/HOST.scan.json`` (0600; kept as the host wrote it, even when
    it does not parse) unless it is already there; return its manifest summary. A missing or unreadable scan is
    a summary with an error, never a failed host (the capture is what counts); SshError passes through."""
    target = run.scan_file(conn.host.name)
    if not target.exists():
        try:
            data = conn.read_file(f"{remote_dir(run.id)}/scan.json")
        except FileNotFoundError:
            return scan_summary(None, "the host wrote no scan.json (its fleetdns predates the host scan: deploy)")
        tmp = target.with_name(target.name + ".tmp")
        with open_private(tmp, "wb") as f:
            f.write(data)
        tmp.rename(target)
    try:
        scan = json.loads(target.read_bytes())
    except ValueError as exc:
        return scan_summary(None, f"unreadable {target.name}: {exc}")
    if not isinstance(scan, dict):
        return scan_summary(None, f"unreadable {target.name}: not a JSON object")
    return scan_summary(scan)


def _final_status(conn: Connection, run_id: str, wait: float) -> tuple[dict[str, Any] | None, int, str]:
    """(final status.json or None, exit status, stderr): read over SFTP when the recorder already finished
    (the common case: no process started on the host), else from ``run finish``, which waits and completes the
    status of a killed recorder."""
    try:
        status = json.loads(conn.read_file(f"{remote_dir(run_id)}/status.json"))
        if status.get("state") in ("finished", "failed") and status.get("ended"):
            return status, 0, ""
    except (FileNotFoundError, ValueError):
        pass  # ask the host: it says what is wrong
    rc, out, err = conn.run([PROBE, "run", "finish", run_id, "--wait", f"{wait:g}"], timeout=wait + 30)
    try:
        return json.loads(out), rc, err
    except ValueError:
        return None, rc, err


def _remove(conn: Connection, run_id: str) -> None:
    """Delete the host's run directory over SFTP (it holds only files the recorder wrote and has finished); with
    become, the files are root's: the host-side ``run remove`` deletes them."""
    if conn.host.become:
        try:
            conn.run([PROBE, "run", "remove", run_id], timeout=60)
        except SshError:
            pass  # the verified copy is local; the run directory stays on the host
        return
    try:
        sftp = conn.sftp()
        for name in sftp.listdir(remote_dir(run_id)):
            sftp.remove(f"{remote_dir(run_id)}/{name}")
        sftp.rmdir(remote_dir(run_id))
    except (SshError, OSError):
        pass  # the verified copy is local; `fleetdns-probe run remove RUN` on the host finishes the job


def pull(run: Run, fleet: dict[str, Connection], *, keep_remote: bool = False, compress: bool = False,
         wait: float = 30.0, on_host: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Gather every host of *fleet* ({host: Connection}) that still has something to gather."""
    manifest = ManifestLock(run)
    todo = []
    for host, conn in fleet.items():
        entry = run.manifest["hosts"].get(host, {})
        if entry.get("status") in GATHERED and entry.get("file") and (run.path / entry["file"]).exists():
            continue
        if not entry.get("started"):
            continue  # never recorded: nothing on the host to fetch
        todo.append(conn)

    def one(conn: Connection) -> None:
        _pull_host(run, conn, manifest, keep_remote, compress, wait)
        if on_host is not None:
            on_host(conn.host.name, run.manifest["hosts"][conn.host.name])

    with ThreadPoolExecutor(max(1, min(POOL, len(todo)))) as pool:
        list(pool.map(one, todo))
