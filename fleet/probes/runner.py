"""Run the DNS probe on this machine and write a capture file (docs/capture-format.md).

API (what ``fleetdns probe`` and the host-side runner call)::

    from fleet.probes.render import ProbeOptions
    from fleet.probes.runner import run_probe, check_environment

    trailer: dict = run_probe(ProbeOptions(backend="bpftrace", mode="events"), "out.capture",
                              duration=10.0, table_callback=None, ready_callback=None)

* ``output``: a path, ``"-"`` (stdout) or a binary file object. The header is written before the backend
  starts, records as they come, the trailer last — also on Ctrl-C / SIGTERM / the duration running out /
  the backend dying.
* ``duration``: seconds from the moment the probes are attached (None: until SIGINT/SIGTERM).
* ``table_callback(row)``: events mode only; called per lookup with a dict: ``time`` (UTC datetime),
  ``pid``, ``tid``, ``uid``, ``comm``, ``function``, ``name`` (display text), ``result``, ``latency_ns``.
* ``ready_callback()``: called once the probes are attached (tests start their workload then).
* ``stop``: a ``threading.Event``; setting it ends the capture like SIGINT (for callers running the probe
  in a thread, where signal handlers cannot be installed).
* Returns the trailer dict: ``end_time_ns``, ``end_boot_ns``, ``wall_offset_end_ns``, ``exit_status``,
  ``stop_reason`` (``duration`` | ``signal`` | ``stopped`` | ``backend-exit``), ``lost``, ``records``,
  ``backend_messages``.
* Raises :class:`~fleet.errors.NotRoot`, :class:`~fleet.errors.MissingProgram`,
  :class:`~fleet.errors.EnvironmentProblem` (no tracefs; the backend failed to attach: its message is in
  the error), :class:`~fleet.errors.UsageError` / :class:`~fleet.errors.InputError` (bad options, bad libc).

Command line (stdlib only; this is what runs on fleet hosts)::

    python -m fleet.probes.runner [--backend bpftrace|stap] [--mode events|summary] [--duration S]
        [--output FILE|-] [--libc PATH] [--binary PATH]... [--names GLOB]... [--cgroup PATH]
        [--interval S] [--max-keys N] [--stap-runtime module|bpf] [--source libc|wire|both]
        [--wire-scope auto|all|netns] [--print-script]

SIGINT and SIGTERM end the capture cleanly: the runner forwards SIGINT to the backend's own pid (the backend
runs in its own session, so a terminal's Ctrl-C reaches only the runner), the backend prints its final maps
(summary) and exits, and the trailer is written.

stap: the module runtime runs as ``stap … dnsprobe.stp OFFSET`` and prints records itself. The bpf runtime's
script is compiled first (``stap -p4``) and its BPF program run by ``stapbpf`` directly (so SIGINT can go to its
main thread, see :func:`_interrupt_stapbpf`); its raw lines become records in :class:`StapBpfAssembler`. stap's
loss reports on stderr become ``L`` records. The runner never adds LD_PRELOAD or other sandbox accommodations:
the lab provides its memlock shim through the environment.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from fleet import capture_format as cf
from fleet.errors import EnvironmentProblem, FleetError, InputError, MissingProgram, NotRoot, UsageError
from fleet.private import open_private
from fleet.probes import render

_LOST_RE = re.compile(rb"^Lost (\d+) events")
_EMITTED_RE = re.compile(rb"^@emitted: (\d+)\n$")
#: after a stop request, wait for this long a quiet spell on the backend's output (at most DRAIN_MAX s) before
#: SIGINT: bpftrace exits without reading what is still in its perf buffers.
DRAIN_QUIET, DRAIN_MAX = 0.3, 3.0
#: the capture file is flushed at least this often (seconds), and at once when the probes attach, so a reader
#: (``fleetdns probe --output``, the host-side status) sees records while the probe runs
FLUSH_EVERY = 0.5
#: a backend that has not attached its probes after this long is killed (bpftrace compiling on a loaded host
#: takes seconds; minutes means it is stuck)
ATTACH_TIMEOUT = 300.0
#: a backend still running this long after its SIGINT is killed with its process group
STOP_TIMEOUT = 20.0
# a bpftrace summary map line: @name[pid, uid, fid, namekey, comm0, comm1, extra...]: value
_MAP_RE = re.compile(rb"^@(lat|first|last|fail|m0|m1)\[(-?\d+(?:, -?\d+)*)\]: (-?\d+)\n$")
_MAP_RECORD = {b"lat": b"X", b"first": b"A", b"last": b"Z", b"fail": b"F", b"m0": b"M", b"m1": b"M"}
# stderr lines of bpftrace that are expected and harmless here
_NOISE = (b"couldn't set RLIMIT_MEMLOCK", b"Addrspace is not set", b"available_filter_functions")
_TRACEFS = ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events")
_PACKAGES = {"bpftrace": "bpftrace", "stap": "systemtap"}
# stap's stderr: loss reports (stapbpf stops after its first lost event; the module runtime reports at exit)
_STAP_LOSS = (re.compile(rb"WARNING: lost (\d+) perf_events"), re.compile(rb"There were (\d+) transport failures"),
              re.compile(rb"skipped probes: (\d+)"))
# stderr lines of stap that are expected and harmless here
_STAP_NOISE = (b"Tip: /usr/share/doc/systemtap", b"Could not open /dev/kmsg", b"Number of errors: 0, skipped probes: 0")
#: after SIGINT to stapbpf's main thread, wait this long before SIGTERM to it (see _interrupt_stapbpf)
STAPBPF_TERM_AFTER = 3.0
_SYS_TGKILL = 234  # x86-64


def wall_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_BOOTTIME, in ns: add it to a probe's ``nsecs`` to get UTC epoch ns."""
    # read boottime between two realtime reads and use the midpoint, halving the error of the pair
    a = time.clock_gettime_ns(time.CLOCK_REALTIME)
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    b = time.clock_gettime_ns(time.CLOCK_REALTIME)
    return (a + b) // 2 - boot


def check_environment(opts: render.ProbeOptions) -> str:
    """Raise the error that stops a probe here (not root, backend missing, no tracefs); return the
    backend's path."""
    if os.geteuid() != 0:
        raise NotRoot("probing the resolver")
    program = shutil.which(opts.backend)
    if program is None:
        raise MissingProgram(opts.backend, _PACKAGES[opts.backend])
    if opts.backend == "bpftrace" and not any(os.path.exists(p) for p in _TRACEFS):
        raise EnvironmentProblem("tracefs is not mounted (uprobes need it)",
                                 hint="mount -t tracefs tracefs /sys/kernel/tracing")
    if opts.backend == "stap" and opts.resolved_stap_runtime() == "bpf":
        if shutil.which("stapbpf") is None:
            raise MissingProgram("stapbpf", _PACKAGES["stap"])
        if not os.path.exists(_TRACEFS[1]):  # stapbpf writes uprobe_events under debugfs only
            raise EnvironmentProblem("debugfs is not mounted (stap's bpf runtime uses /sys/kernel/debug/tracing)",
                                     hint="mount -t debugfs debugfs /sys/kernel/debug")
    return program


def _backend_version(program: str) -> str:
    try:
        out = subprocess.run([program, "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "unknown"


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _header(opts: render.ProbeOptions, program: str, offset: int) -> dict[str, Any]:
    libc = opts.resolved_libc()
    return {
        "host": socket.gethostname(), "boot_id": _boot_id(), "kernel": platform.release(),
        "backend": opts.backend, "backend_version": _backend_version(program),
        "libc_path": os.path.realpath(libc), "libc_build_id": render.elf_info(libc).build_id,
        "binaries": [{"path": os.path.realpath(p), "build_id": render.elf_info(p).build_id} for p in opts.binaries],
        "clock": "CLOCK_BOOTTIME", "wall_offset_ns": offset,
        "start_time": datetime.datetime.fromtimestamp(time.time(), datetime.UTC).isoformat(),
        "mode": opts.mode, "filters": {"names": list(opts.names), "cgroup": opts.cgroup},
        "interval_s": opts.interval, "max_keys": opts.max_keys,
        "functions": {str(k): v for k, v in render.FUNCTION_NAMES.items()},
        "runner_pid": os.getpid(),
        "sources": list(opts.sources),
        "wire_scope": None if "wire" not in opts.sources else
        "all" if opts.wire_netns is None else f"netns:{opts.wire_netns}",
        **(_stap_header(opts) if opts.backend == "stap" else {}),
    }


def _stap_header(opts: render.ProbeOptions) -> dict[str, Any]:
    """Header fields of a stap capture: the runtime, and the length from which names are truncated."""
    runtime = opts.resolved_stap_runtime()
    return {"backend_runtime": runtime,
            "name_max": render.STAP_BPF_NAME_MAX if runtime == "bpf" else render.NAME_MAX}


def _map_record(line: bytes) -> bytes | None:
    """Turn one bpftrace summary map line into a capture record (None: not a summary map line)."""
    m = _MAP_RE.match(line)
    if not m:
        return None
    name, keys, value = m.groups()
    return b" ".join([_MAP_RECORD[name], *keys.split(b", "), value]) + b"\n"


def _table_row(line: bytes, offset: int, names: dict[int, bytes]) -> dict[str, Any] | None:
    """An E record as the live table's row (``names``: name key → N record text, see capture_format)."""
    try:
        t0, pid, tid, uid, fid, rc, herr, lat, key, c0, c1 = (int(x) for x in line.split(b" ")[1:])
    except ValueError:
        return None
    return {"time": datetime.datetime.fromtimestamp((t0 + offset) / 1e9, datetime.UTC),
            "pid": pid, "tid": tid, "uid": uid, "comm": cf.display_bytes(cf.comm_bytes(c0, c1)),
            "function": cf.FUNCTIONS.get(fid, str(fid)), "name": names.get(key % 2**64, "?"),
            "result": cf.result_name(fid, rc, herr), "latency_ns": lat}


def name_key(af: int, name: bytes | None) -> int:
    """The probes' name key (docs/capture-format.md): FNV-1a over the address family (reverse lookups only)
    and the name bytes; 1 for a NULL name."""
    if name is None:
        return 1
    h = render._FNV_OFFSET
    if af:
        h = ((h ^ af) * render._FNV_PRIME) % 2**64
    for c in name:
        h = ((h ^ c) * render._FNV_PRIME) % 2**64
    return h


class StapBpfAssembler:
    """Turns the raw lines of stap's bpf-runtime script into capture records (N when a name key is new, E).

    Per lookup the script prints, from one return probe (so in order, on one CPU)::

        a <tid> <fid> <af> <len> <align> <boot_ns> <latency_ns>   len: -1 NULL, -2 a name (ends at its NUL)
        w <tid> <index> <word>                                    aligned 8-byte words from (pointer - align)
        r <tid> <pid> <uid> <rc> <herr> <comm0> <comm1>           the end: the lookup's record is complete

    Names are cut at :data:`render.STAP_BPF_NAME_MAX` bytes: a longer one gets length NAME_MAX (truncated).
    :meth:`feed` returns the record lines for one input line (other lines pass through unchanged);
    ``unfinished()`` counts lookups begun (``a``) but never ended (``r``), and ``stray`` lines without ``a``.
    """

    def __init__(self) -> None:
        self.pending: dict[int, tuple[list[int], dict[int, int]]] = {}
        self.defined: set[int] = set()
        self.stray = 0

    def feed(self, line: bytes) -> list[bytes]:
        kind = line[:2]
        if kind not in (b"a ", b"w ", b"r "):
            return [line]
        try:
            fields = [int(x) for x in line[2:].split()]
        except ValueError:
            self.stray += 1
            return []
        if kind == b"a " and len(fields) == 7:
            self.pending[fields[0]] = (fields[1:], {})
            return []
        lookup = self.pending.get(fields[0]) if fields else None
        if lookup is None:
            self.stray += 1
            return []
        if kind == b"w " and len(fields) == 3:
            lookup[1][fields[1]] = fields[2] % 2**64
            return []
        if kind == b"r " and len(fields) == 7:
            del self.pending[fields[0]]
            return self._records(fields, *lookup)
        self.stray += 1
        return []

    def unfinished(self) -> int:
        return len(self.pending)

    def _records(self, end: list[int], begin: list[int], words: dict[int, int]) -> list[bytes]:
        tid, pid, uid, rc, herr, c0, c1 = end
        fid, af, length, align, t0, lat = begin
        data = b"".join(words[i].to_bytes(8, "little") for i in range(len(words)) if i in words)[align:]
        if length == -1:
            name, key = b"", 1
        elif length == -2:  # a name: up to its NUL, or cut (flagged) at STAP_BPF_NAME_MAX bytes
            end_at = data.find(b"\0")
            if 0 <= end_at < render.STAP_BPF_NAME_MAX:
                name, length = data[:end_at], end_at
            else:
                name, length = data[:render.STAP_BPF_NAME_MAX], render.NAME_MAX
            key = name_key(0, name)
        else:  # an address of `length` bytes
            name = data[:length]
            key = name_key(af, name)
        out = []
        if key not in self.defined:
            self.defined.add(key)
            out.append(b"N %d %d %d 0 %s\n" % (key, af, length, cf.hex_bytes(name).encode()))
        out.append(b"E %d %d %d %d %d %d %d %d %d %d %d\n" % (t0, pid, tid, uid, fid, rc, herr, lat, key, c0, c1))
        return out


class WireAssembler:
    """Join the wire source's raw lines into ``W`` records (docs/capture-format.md).

    The probe prints ``w BOOT PID TID UID SID FD AF A0 A1 PORT LEN C0 C1 BYTES0`` per query, followed on the same
    thread by ``v TID 128 BYTES1`` and ``v TID 256 BYTES2`` when the payload is longer than 128 / 256 bytes (one
    printf cannot carry two 128-byte buffers on the BPF stack). A thread sends one query at a time, so the
    pieces are joined by thread id even when other records come in between. A query whose continuation never
    came (lost) is written with what arrived, when the thread's next query or the end comes.
    """

    def __init__(self) -> None:
        self._pending: dict[bytes, tuple[list[bytes], list[bytes | None]]] = {}  # tid → (fields, chunks)

    def feed(self, line: bytes) -> list[bytes]:
        """W records completed by this raw line (``w`` or ``v``); a malformed line is dropped (returns [])."""
        parts = line.rstrip(b"\n").split(b" ")
        if parts[0] == b"w" and len(parts) == 15:
            out = self._flush(parts[3])
            try:
                length = int(parts[11])
            except ValueError:
                return out
            chunks: list[bytes | None] = [parts[14]] + [None] * (length > render.HALF) + \
                [None] * (length > 2 * render.HALF)
            self._pending[parts[3]] = (parts[1:14], chunks)
            return out + self._complete(parts[3])
        if parts[0] == b"v" and len(parts) == 4 and parts[1] in self._pending and parts[2].isdigit():
            _fields, chunks = self._pending[parts[1]]
            index = int(parts[2]) // render.HALF
            if 0 < index < len(chunks):
                chunks[index] = parts[3]
            return self._complete(parts[1])
        return []

    def flush(self) -> list[bytes]:
        """The queries still waiting for a continuation (at the end of the capture)."""
        return [r for tid in list(self._pending) for r in self._flush(tid)]

    def _complete(self, tid: bytes) -> list[bytes]:
        return self._flush(tid) if all(c is not None for c in self._pending[tid][1]) else []

    def _flush(self, tid: bytes) -> list[bytes]:
        if tid not in self._pending:
            return []
        fields, chunks = self._pending.pop(tid)
        payload = [c or b"" for c in chunks] + [b""] * (3 - len(chunks))
        return [b"W " + b" ".join(fields + payload) + b"\n"]


class _Stopper:
    """Ends the backend once: on our SIGINT/SIGTERM, ``stop``, or the duration running out.

    It first lets the backend drain (DRAIN_QUIET of silence on its output, at most DRAIN_MAX), then sends
    SIGINT to the backend's own pid: bpftrace then runs END (final summary maps, @emitted) and exits.
    """

    def __init__(self, proc: subprocess.Popen[bytes], interrupt: Callable[[], None] | None = None) -> None:
        self.proc = proc
        self.interrupt = interrupt or (lambda: proc.send_signal(signal.SIGINT))
        self.reason: str | None = None
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.last_output = time.monotonic()
        self.killed: str | None = None

    def stop(self, reason: str) -> None:
        with self.lock:
            if self.reason is not None:
                return
            self.reason = reason
        threading.Thread(target=self._drain_then_interrupt, daemon=True).start()

    def _drain_then_interrupt(self) -> None:
        start = time.monotonic()
        while time.monotonic() - start < DRAIN_MAX and self.proc.poll() is None:
            quiet_since = max(self.last_output, start)
            if time.monotonic() - quiet_since >= DRAIN_QUIET:
                break
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.interrupt()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill(f"ignored SIGINT for {STOP_TIMEOUT:g}s")

    def kill(self, why: str) -> None:
        """Kill the backend's whole process group (it runs in its own session); ``why`` goes to the trailer."""
        self.killed = why
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def start_timer(self, duration: float) -> None:
        self.timer = threading.Timer(duration, self.stop, args=("duration",))
        self.timer.daemon = True
        self.timer.start()


def run_probe(opts: render.ProbeOptions, output: str | IO[bytes], *, duration: float | None = None,
              table_callback: Callable[[dict[str, Any]], None] | None = None,
              ready_callback: Callable[[], None] | None = None,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the probe until ``duration`` / SIGINT / SIGTERM / ``stop`` is set / the backend's exit; see the
    module docstring."""
    if duration is not None and duration <= 0:
        raise UsageError("the duration must be positive")
    program = check_environment(opts)
    script = render.render(opts)
    offset = wall_offset_ns()
    header = _header(opts, program, offset)
    with tempfile.NamedTemporaryFile("w", suffix=".bt" if opts.backend == "bpftrace" else ".stp",
                                     prefix="fleetdns-", delete=False) as f:
        f.write(script)
        script_path = f.name
    workdir = tempfile.mkdtemp(prefix="fleetdns-") if opts.backend == "stap" else None
    try:
        argv = _command(program, script_path, offset) if workdir is None else \
            stap_command(opts, program, script_path, workdir)
        out, close = _open_output(output)
        try:
            out.write(cf.header_line(header))
            out.flush()
            return _run(opts, argv, out, offset, duration, table_callback, ready_callback, stop)
        finally:
            if close:
                out.close()
    finally:
        os.unlink(script_path)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _open_output(output: str | IO[bytes]) -> tuple[IO[bytes], bool]:
    """The capture's file object and whether we close it; a new file is created 0600 (DNS logs are personal)."""
    if output == "-":
        return sys.stdout.buffer, False
    if isinstance(output, str):
        try:
            return open_private(output, "wb"), True
        except OSError as e:
            raise InputError(f"cannot write {output}: {e.strerror}") from None
    return output, False


class _Flusher:
    """Flushes the capture every FLUSH_EVERY seconds from a thread; writes and flushes share one lock."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.lock, self.done = out, threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.out.write(data)

    def flush(self) -> None:
        with self.lock:
            try:
                self.out.flush()
            except (BrokenPipeError, ValueError):  # a closed pipe or file: the final write reports it
                pass

    def _loop(self) -> None:
        while not self.done.wait(FLUSH_EVERY):
            self.flush()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.flush()


def _command(program: str, script_path: str, offset: int) -> list[str]:
    """bpftrace's command line; $1 is the wall-clock offset."""
    # -B line: flush each record as printed, so the file is current and a kill loses at most a line
    return [program, "-B", "line", script_path, str(offset)]


def stap_command(opts: render.ProbeOptions, program: str, script_path: str, workdir: str) -> list[str]:
    """stap's command line. The script's $1 is CLOCK_BOOTTIME − CLOCK_MONOTONIC (stap's clock is
    ktime_get_ns()). The bpf runtime's script is compiled here (into ``workdir``) and run by stapbpf
    directly, so that the runner can stop it (see _interrupt_stapbpf); raises EnvironmentProblem when stap
    cannot compile it."""
    # boottime between two monotonic reads (their midpoint); never negative (stap would take "-…" for an option)
    a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    script_args = [script_path, str(max(0, boot - (a + b) // 2))]
    if opts.resolved_stap_runtime() == "module":
        return [program, *render.stap_arguments(opts), *script_args]
    try:
        done = subprocess.run([program, "-p4", *render.stap_arguments(opts), "-m", "fleetdns_probe", *script_args],
                              cwd=workdir, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem("stap took more than 10 minutes to compile the probe") from None
    module = os.path.join(workdir, "fleetdns_probe.bo")
    if done.returncode != 0 or not os.path.exists(module):
        lines = [line for line in done.stderr.decode("utf-8", "replace").splitlines()
                 if line.strip() and not any(n.decode() in line for n in _STAP_NOISE)]
        raise EnvironmentProblem(f"stap could not compile the probe: {'; '.join(lines[-3:]) or done.returncode}")
    return [shutil.which("stapbpf") or "stapbpf", module]


def _interrupt_stapbpf(proc: subprocess.Popen[bytes]) -> None:
    """Stop stapbpf like Ctrl-C. Its SIGINT handler sets the exit flag and then ignores SIGINT; if a
    process-directed signal lands on its perf-reading thread, the main thread stays in pause() for good. So
    the signal goes to the main thread (tgkill), and SIGTERM (same handler, not yet ignored) follows if it
    has not exited after STAPBPF_TERM_AFTER seconds."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(_SYS_TGKILL, proc.pid, proc.pid, signal.SIGINT)
    try:
        proc.wait(STAPBPF_TERM_AFTER)
    except subprocess.TimeoutExpired:
        libc.syscall(_SYS_TGKILL, proc.pid, proc.pid, signal.SIGTERM)


def _run(opts, argv, file, offset, duration, table_callback, ready_callback, stop) -> dict[str, Any]:
    env = {**os.environ, **render.backend_env(opts)}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    stapbpf = opts.backend == "stap" and opts.resolved_stap_runtime() == "bpf"
    stopper = _Stopper(proc, (lambda: _interrupt_stapbpf(proc)) if stapbpf else None)
    out = _Flusher(file)
    attached = False
    attach_timer = threading.Timer(ATTACH_TIMEOUT, lambda: attached or stopper.kill(
        f"probes not attached after {ATTACH_TIMEOUT:g}s"))
    attach_timer.daemon = True
    attach_timer.start()
    messages: list[str] = []
    stap_losses: list[int] = []  # loss counts from stap's stderr
    err_thread = threading.Thread(target=_read_stderr, args=(proc.stderr, messages, stap_losses), daemon=True)
    err_thread.start()
    # the stap module runtime prints summary records itself; stapbpf's raw lines are assembled into records
    direct = b"ENSYBXAZFM" if opts.backend == "stap" else b"ENSYB"
    assembler = StapBpfAssembler() if stapbpf else None
    wire = WireAssembler()
    lines = proc.stdout if assembler is None else (r for line in proc.stdout for r in assembler.feed(line))
    if stop is not None:
        threading.Thread(target=lambda: stop.wait() and stopper.stop("stopped"), daemon=True).start()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stopper.stop("signal"))
    lost = records = printed = 0
    emitted: int | None = None  # the probe's own count of printf records, from END
    names: dict[int, str] = {}  # name key → display text, for the live table only
    try:
        for line in lines:
            stopper.last_output = time.monotonic()
            kind = line[:1]
            if kind in direct and line[1:2] == b" ":
                out.write(line)
                records += 1
                printed += kind in b"EN"
                if kind == b"B" and not attached:
                    attached = True
                    attach_timer.cancel()
                    out.flush()
                    if duration is not None:
                        stopper.start_timer(duration)
                    if ready_callback is not None:
                        ready_callback()
                elif kind == b"E" and table_callback is not None:
                    row = _table_row(line, offset, names)
                    if row is not None:
                        table_callback(row)
                elif kind == b"N" and table_callback is not None:
                    cf.add_display_name(names, line)
            elif kind in b"wv" and line[1:2] == b" ":
                printed += kind == b"w"
                for record in wire.feed(line):
                    out.write(record)
                    records += 1
            elif (m := _EMITTED_RE.match(line)) is not None:
                # END prints the count; bpftrace's own exit then prints the cleared map again as 0
                emitted = max(emitted or 0, int(m.group(1)))
            elif (record := _map_record(line)) is not None:
                out.write(record)
                records += 1
            elif (m := _LOST_RE.match(line)) is not None:
                lost += int(m.group(1))
                out.write(b"L %d\n" % int(m.group(1)))
            elif line.strip() and not line.startswith(b"Attaching "):
                messages.append(line.decode("utf-8", "replace").strip()[:200])
        proc.wait()
        for record in wire.flush():
            out.write(record)
            records += 1
        if emitted is not None and emitted > printed + lost:
            # records the backend produced but never delivered (left in its buffers at exit): lost too
            out.write(b"L %d\n" % (emitted - printed - lost))
            lost = emitted - printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if stopper.timer is not None:
            stopper.timer.cancel()
        attach_timer.cancel()
        out.done.set()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err_thread.join(timeout=5)
    if stopper.killed:
        messages.append(f"killed: {stopper.killed}")
    for count in stap_losses:
        out.write(b"L %d\n" % count)
        lost += count
    if assembler is not None and assembler.unfinished():
        # lookups whose last line never came (stapbpf stopped after a loss): lost as well
        out.write(b"L %d\n" % assembler.unfinished())
        lost += assembler.unfinished()
    trailer = {
        "end_time_ns": time.time_ns(), "end_boot_ns": time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        "wall_offset_end_ns": wall_offset_ns(), "exit_status": proc.returncode,
        "stop_reason": stopper.reason or "backend-exit", "lost": lost, "records": records, "emitted": emitted,
        "attached": attached, "backend_messages": messages[-20:],
    }
    out.write(cf.trailer_line(trailer))
    out.close()
    if not attached and stopper.reason is None:
        detail = "; ".join(messages[-5:]) or f"exit status {proc.returncode}"
        raise EnvironmentProblem(f"{opts.backend} failed to attach its probes: {detail}")
    return trailer


def _read_stderr(stream: IO[bytes], messages: list[str], losses: list[int]) -> None:
    """Collect the backend's unexpected stderr lines into ``messages`` and stap's loss reports into ``losses``."""
    for line in stream:
        for pattern in _STAP_LOSS:
            if (m := pattern.search(line)) is not None and int(m.group(1)):
                losses.append(int(m.group(1)))
        if line.strip() and not any(n in line for n in _NOISE + _STAP_NOISE):
            messages.append(line.decode("utf-8", "replace").strip()[:200])


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.probes.runner``: run the probe, write the capture; errors as one line, exit code."""
    p = argparse.ArgumentParser(prog="python -m fleet.probes.runner", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=render.BACKENDS, default="bpftrace")
    p.add_argument("--mode", choices=render.MODES, default="events")
    p.add_argument("--duration", type=float, default=None, help="seconds after attach (default: until SIGINT)")
    p.add_argument("--output", default="-", help="capture file, or - for stdout")
    p.add_argument("--libc", default=None)
    p.add_argument("--binary", action="append", default=[], help="extra program to hook (repeatable)")
    p.add_argument("--names", action="append", default=[], help="name glob (repeatable)")
    p.add_argument("--cgroup", default=None)
    p.add_argument("--interval", type=int, default=60)
    p.add_argument("--max-keys", type=int, default=65536)
    p.add_argument("--stap-runtime", choices=render.STAP_RUNTIMES, default=None,
                   help="stap's runtime (default: $FLEETDNS_STAP_RUNTIME, else module when kernel headers exist)")
    p.add_argument("--source", choices=render.SOURCE_CHOICES, default=None,
                   help="libc, wire or both (default: both with bpftrace, libc with stap)")
    p.add_argument("--wire-scope", choices=render.WIRE_SCOPES, default="auto",
                   help="the wire source's network namespaces (auto: this one inside a container, else all)")
    p.add_argument("--print-script", action="store_true", help="print the rendered script and exit")
    a = p.parse_args(argv)
    try:
        opts = render.ProbeOptions(backend=a.backend, mode=a.mode, libc=a.libc, binaries=tuple(a.binary),
                                   names=tuple(a.names), cgroup=a.cgroup, interval=a.interval,
                                   max_keys=a.max_keys, stap_runtime=a.stap_runtime,
                                   sources=render.resolve_sources(a.source, a.backend),
                                   wire_netns=render.wire_netns(a.wire_scope))
        if a.print_script:
            sys.stdout.write(render.render(opts))
            return 0
        trailer = run_probe(opts, a.output, duration=a.duration)
    except FleetError as e:
        print(f"fleetdns probe: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    if trailer["lost"]:
        print(f"fleetdns probe: {trailer['lost']} events lost (counted in the trailer)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
