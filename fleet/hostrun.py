"""Host side of a capture run: start a recorder that outlives the SSH session, report on it, stop it, clean up.

Deployed in the host zip and run as ``fleetdns-probe run ACTION RUN …`` (standard library only)::

    run start  RUN --duration S [--backend auto|bpftrace|stap] [--mode events|summary] [--names GLOB]…
                   [--source libc|wire|both] [--wire-scope auto|all|netns]
                   [--max-bytes N] [--start-timeout S]     # exit 0 once recording, 1 if it could not start
                   [--watch NAME]…                         # names the host scan resolves (docs/scan.md)
    run status RUN                                         # status.json (a dead recorder shows as "killed")
    run stop   RUN                                         # ask the recorder to end now (trailer written)
    run finish RUN [--wait S]                              # wait for the end; the final status with sha256
    run remove RUN                                         # delete the run directory (after a verified gather)

Every action prints the run's status as one JSON object on stdout. Files, under ``--dir`` (default
``/var/lib/fleetdns``)::

    runs/RUN/              0700
        capture            0600, capture format v1 (docs/capture-format.md)
        status.json        0600, replaced atomically about every second while recording
        recorder.log       0600, the recorder's stderr
        stop               present once a stop was asked for
        scan.json          0600, the host scan taken before the recorder starts (fleet/hostscan.py, docs/scan.md)

``status.json``::

    {"run", "state": "starting"|"attaching"|"recording"|"finished"|"failed"|"killed", "pid", "backend", "mode",
     "libc", "marker": "127.x.y.z", "selftest": bool, "attached": bool, "sources", "records", "events",
     "wire" (W records: queries seen on the wire), "lost",
     "dropped", "bytes", "max_bytes", "capped": bool, "duration_s", "started", "attached_at", "deadline",
     "ended" (ISO-8601 UTC or null), "stop_reason": "duration"|"stopped"|"max-bytes"|"signal"|
     "backend-exit"|"killed"|null, "exit_status", "error", "sha256" (final states only)}

``events`` counts the lookups recorded apart from the self-test (one ``getaddrinfo`` of ``marker``, a random
loopback address answered by libc without traffic, made right after the probes attach; reports drop it); it is
null in summary mode, whose lookups are only in the dumps.
A host is *recording* once the probe saw that lookup (summary mode: once attached, as the lookup only shows in
the dumps). ``start`` runs the recorder in its own session under ``timeout -k 15 <duration + slack>``, so neither
a dropped SSH connection nor a killed controller keeps it from ending on time.

Before it launches the recorder, ``start`` takes the host scan (fleet/hostscan.py: blind spots, established TCP
connections, what each ``--watch`` name resolves to, resolver files) into ``scan.json`` — first, so that the
scan's own lookups are never captured. A failed scan is written into the file's ``errors``; it never stops the
capture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from fleet import hostscan
from fleet.errors import FleetError, InputError
from fleet.preflight import LOOKUP
from fleet.private import open_private, private_dir, sha256_file, write_json_atomic
from fleet.probes import render
from fleet.probes.runner import run_probe
from fleet.store import RUN_ID_RE

DEFAULT_DIR = "/var/lib/fleetdns"
FINAL_STATES = ("finished", "failed", "killed")
#: time allowed for the backend to attach before the host's own deadline kills everything
ATTACH_SLACK = 60
#: bytes kept free under --max-bytes for the trailer (and its L record), so a capped file still ends cleanly
TRAILER_ROOM = 4096
#: seconds after attaching within which the self-test lookup must show up
SELFTEST_TIMEOUT = 15.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


class _CountingWriter:
    """The capture file as run_probe sees it: counts records, events and lost events, and enforces max_bytes.

    Header and trailer always pass; a record that would push the file past ``max_bytes - TRAILER_ROOM`` is dropped
    (counted), the capture is asked to stop, and an ``L`` record with the dropped count precedes the trailer so a
    reader counts them as lost.
    """

    def __init__(self, f: IO[bytes], max_bytes: int | None, on_cap) -> None:
        self.f, self.max_bytes, self.on_cap = f, max_bytes, on_cap
        self.bytes = self.records = self.events = self.wire = self.lost = self.dropped = 0
        self.lock = threading.Lock()

    def write(self, data: bytes) -> int:
        kind = data[:1]
        with self.lock:
            if kind == b"T" and self.dropped:
                self._put(b"L %d\n" % self.dropped)
            if kind not in (b"H", b"T"):
                if self.max_bytes and self.bytes + len(data) > self.max_bytes - TRAILER_ROOM:
                    self.dropped += 1
                    self.on_cap()
                    return len(data)
                self.records += 1
                if kind == b"E":
                    self.events += 1
                elif kind == b"W":
                    self.wire += 1
                elif kind == b"L":
                    self.lost += int(data.split()[1])
            self._put(data)
        return len(data)

    def _put(self, data: bytes) -> None:
        self.f.write(data)
        self.bytes += len(data)

    def flush(self) -> None:
        with self.lock:
            if not self.f.closed:
                self.f.flush()


class Recorder:
    """One run's recorder process: runs the probe into ``capture`` and keeps ``status.json`` current."""

    def __init__(self, run_dir: Path, opts: render.ProbeOptions, duration: float, max_bytes: int | None) -> None:
        self.dir, self.opts, self.duration = run_dir, opts, duration
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.marker = "127." + ".".join(str(random.randint(1, 254)) for _ in range(3))
        self.marker_hits = 0
        self.writer: _CountingWriter | None = None
        self.status: dict[str, Any] = {
            "run": run_dir.name, "state": "attaching", "pid": os.getpid(), "backend": opts.backend,
            "mode": opts.mode, "libc": opts.libc, "marker": self.marker, "selftest": False, "attached": False,
            "sources": list(opts.sources), "records": 0, "events": 0, "wire": 0, "lost": 0, "dropped": 0,
            "bytes": 0, "max_bytes": max_bytes,
            "capped": False, "duration_s": duration, "started": _now(), "attached_at": None, "deadline": None,
            "ended": None, "stop_reason": None, "exit_status": None, "error": None, "sha256": None}
        self.max_bytes = max_bytes

    def _request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def _on_attach(self) -> None:
        now = time.time()
        self.status.update(attached=True, attached_at=_iso(now), deadline=_iso(now + self.duration))
        if self.opts.mode == "summary" or "libc" not in self.opts.sources:
            # the self-test only shows in the dumps, or (wire source alone) not at all: it sends no packet
            self.status["state"] = "recording"
        child = subprocess.Popen([sys.executable, "-c", LOOKUP, self.marker])
        threading.Thread(target=child.wait, daemon=True).start()

    def _on_row(self, row: dict[str, Any]) -> None:
        if row.get("name") == self.marker:
            self.marker_hits += 1
            self.status.update(selftest=True, state="recording")

    def _publish(self) -> None:
        w = self.writer
        if w is not None:
            w.flush()
            # summary mode has no per-lookup records to count: its lookups are in the dumps (events: null)
            events = max(0, w.events - self.marker_hits) if self.opts.mode == "events" else None
            self.status.update(records=w.records, events=events, wire=w.wire, lost=w.lost + w.dropped,
                               dropped=w.dropped, bytes=w.bytes, capped=w.dropped > 0)
        write_json_atomic(self.dir / "status.json", self.status)

    def _tick(self) -> None:
        """Every ~second: publish the status, notice a stop request, fail a probe that never saw its self-test."""
        while not self.stop.wait(0.5):
            if (self.dir / "stop").exists():
                self._request_stop("stopped")
            attached_at = self.status["attached_at"]
            if (attached_at and not self.status["selftest"] and self.status["state"] != "recording"
                    and time.time() - datetime.datetime.fromisoformat(attached_at).timestamp() > SELFTEST_TIMEOUT):
                self.status["error"] = f"the probe attached but never saw its self-test lookup of {self.marker}"
                self._request_stop("selftest")
            self._publish()

    def record(self) -> int:
        self._publish()
        with open_private(self.dir / "capture", "wb") as f:
            self.writer = _CountingWriter(f, self.max_bytes, lambda: self._request_stop("max-bytes"))
            ticker = threading.Thread(target=self._tick, daemon=True)
            ticker.start()
            try:
                trailer = run_probe(self.opts, self.writer, duration=self.duration, table_callback=self._on_row,
                                    ready_callback=self._on_attach, stop=self.stop)
                reason = self.stop_reason or trailer.get("stop_reason")
                self.status.update(exit_status=trailer.get("exit_status"), stop_reason=reason,
                                   state="failed" if reason == "selftest" else "finished")
            except FleetError as exc:
                self.status.update(state="failed", error=str(exc), stop_reason=self.stop_reason)
            finally:
                self.stop.set()
                ticker.join(timeout=5)
        self.status.update(ended=_now(), sha256=sha256_file(self.dir / "capture"))
        self._publish()
        return 0 if self.status["state"] == "finished" else 1


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json; a recorder that died without a final state (SIGKILL, reboot) shows as ``killed``."""
    try:
        status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no run {run_dir.name} on this host") from None
    if status.get("state") not in FINAL_STATES and not _alive(status.get("pid")):
        status.update(state="killed", stop_reason="killed")
    return status


def _host_info(base: Path) -> dict[str, Any]:
    try:
        return json.loads((base / "host.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def take_scan(run_dir: Path, libc: str | None, watch: list[str]) -> None:
    """Write ``scan.json`` (fleet/hostscan.py) into *run_dir*, 0600. Never raises: the capture matters more
    than the scan, so a failure is written into the file's ``errors`` (or, when even that fails, to stderr)."""
    try:
        if libc is None:
            try:
                libc = render.find_libc()  # what the recorder hooks when host.json names no libc
            except FleetError:
                libc = None
        result = hostscan.scan(libc, watch)
    except Exception as exc:  # noqa: BLE001 — hostscan.scan never raises; this is the belt to its braces
        result = hostscan.empty(libc, [f"the scan failed: {type(exc).__name__}: {exc}"])
    try:
        write_json_atomic(run_dir / "scan.json", result)
    except OSError as exc:
        print(f"fleetdns-probe run: warning: scan.json not written: {exc}", file=sys.stderr)


def start(base: Path, run_id: str, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Launch the recorder detached, wait until it records (or fails); (status, exit code)."""
    info = _host_info(base)
    backend = args.backend
    if backend == "auto":
        ready = info.get("ready") or []
        if not ready:
            raise FleetError("no working backend in host.json: run 'fleetdns deploy' first")
        backend = ready[0]
    run_dir = base / "runs" / run_id
    private_dir(run_dir.parent)
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        raise InputError(f"run {run_id} already exists on this host") from None
    take_scan(run_dir, info.get("libc"), args.watch)
    limit = int(args.duration) + ATTACH_SLACK + 30
    command = [shutil.which("timeout") or "timeout", "-k", "15", str(limit), sys.executable, "-m", "fleet.hostrun",
               "record", run_id, "--dir", str(base), "--duration", str(args.duration), "--backend", backend,
               "--mode", args.mode, f"--wire-scope={args.wire_scope}", *(f"--names={n}" for n in args.names)]
    if args.source:
        command.append(f"--source={args.source}")
    if info.get("libc"):
        command.append(f"--libc={info['libc']}")
    if args.max_bytes:
        command.append(f"--max-bytes={args.max_bytes}")
    with open_private(run_dir / "recorder.log", "wb") as log:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         cwd="/")
    deadline = time.monotonic() + args.start_timeout
    while True:
        time.sleep(0.2)
        try:
            status = read_status(run_dir)
        except FleetError:  # the recorder has not written its first status yet
            if time.monotonic() > deadline:
                return {"run": run_id, "state": "failed", "error": "the recorder never started"}, 1
            continue
        if status["state"] == "recording":
            return status, 0
        if status["state"] in FINAL_STATES:
            return status, 1
        if time.monotonic() > deadline:
            (run_dir / "stop").touch()
            status["error"] = f"the probe did not start recording within {args.start_timeout:g}s"
            return status, 1


def finish(run_dir: Path, wait: float) -> tuple[dict[str, Any], int]:
    """Wait (at most *wait* s) for the recorder's end; a killed recorder's status is completed here."""
    deadline = time.monotonic() + wait
    status = read_status(run_dir)
    while status["state"] not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.2)
        status = read_status(run_dir)
    if status["state"] == "killed" and not status.get("sha256"):
        capture = run_dir / "capture"
        status.update(ended=status.get("ended") or _now(), bytes=capture.stat().st_size if capture.exists() else 0,
                      sha256=sha256_file(capture) if capture.exists() else None)
        write_json_atomic(run_dir / "status.json", status)
    return status, 0 if status["state"] in FINAL_STATES else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleetdns-probe run", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("start", "status", "stop", "finish", "remove", "record"))
    p.add_argument("run")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--backend", choices=("auto", *render.BACKENDS), default="auto")
    p.add_argument("--mode", choices=render.MODES, default="events")
    p.add_argument("--names", action="append", default=[])
    p.add_argument("--source", choices=render.SOURCE_CHOICES, default=None)
    p.add_argument("--wire-scope", choices=render.WIRE_SCOPES, default="auto")
    p.add_argument("--libc", default=None)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--start-timeout", type=float, default=45.0)
    p.add_argument("--wait", type=float, default=0.0)
    p.add_argument("--watch", action="append", default=[])
    a = p.parse_args(argv)
    if not RUN_ID_RE.match(a.run):
        print(f"fleetdns-probe run: error: bad run id {a.run!r}", file=sys.stderr)
        return 3
    base = Path(a.dir)
    run_dir = base / "runs" / a.run
    code = 0
    try:
        if a.action == "record":
            opts = render.ProbeOptions(backend=a.backend, mode=a.mode, libc=a.libc, names=tuple(a.names),
                                       sources=render.resolve_sources(a.source, a.backend),
                                       wire_netns=render.wire_netns(a.wire_scope))
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # belt and braces: the session is ours already
            return Recorder(run_dir, opts, a.duration, a.max_bytes).record()
        if a.action == "start":
            status, code = start(base, a.run, a)
        elif a.action == "status":
            status = read_status(run_dir)
        elif a.action == "stop":
            status = read_status(run_dir)
            if status["state"] not in FINAL_STATES:
                (run_dir / "stop").touch()
        elif a.action == "finish":
            status, code = finish(run_dir, a.wait)
        else:
            status = read_status(run_dir)
            if status["state"] not in FINAL_STATES:
                raise FleetError(f"run {a.run} is still {status['state']}: stop it first")
            shutil.rmtree(run_dir)
            status["state"] = "removed"
    except FleetError as exc:
        print(f"fleetdns-probe run: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(json.dumps(status, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
