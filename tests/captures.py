"""Build capture files (format v1, docs/capture-format.md) and run stores the way the probe and gather write them,
so report tests start from real bytes: events mode, summary mode, odd bytes, damage.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field

from fleet import capture_format as cf
from fleet import store

OFFSET = 1_764_750_000_000_000_000  # 2025-12-03T08:20:00Z as UTC ns at boot_ns 0
MINUTE = 60_000_000_000


def key_of(name: bytes | None, af: int = 0) -> int:
    """A stable u64 name key (the probe uses FNV-1a; any distinct u64 serves the reader)."""
    return int.from_bytes(hashlib.blake2b(repr((name, af)).encode(), digest_size=8).digest(), "little")


def comm_ints(comm: bytes) -> tuple[int, int]:
    raw = comm.ljust(16, b"\0")
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


@dataclass
class Lookup:
    """One lookup an events-mode capture records."""

    name: bytes | None
    comm: bytes = b"curl"
    pid: int = 100
    t: int = 1_000_000_000  # boot ns
    latency_ns: int = 2_000_000
    fid: int = 1
    rc: int = 0
    herr: int = 0


@dataclass
class CaptureBuilder:
    host: str
    mode: str = "events"
    lines: list[bytes] = field(default_factory=list)
    named: set[int] = field(default_factory=set)

    def _name(self, name: bytes | None) -> int:
        key = key_of(name)
        if key not in self.named:
            self.named.add(key)
            length = -1 if name is None else len(name)
            data = name or b""
            self.lines.append(f"N {key} 0 {length} 0 {cf.hex_bytes(data[:128])}\n".encode())
            if len(data) > 128:
                self.lines.append(f"N {key} 0 {length} 128 {cf.hex_bytes(data[128:256])}\n".encode())
        return key

    def lookup(self, lk: Lookup, times: int = 1) -> CaptureBuilder:
        key = self._name(lk.name)
        c0, c1 = comm_ints(lk.comm)
        for i in range(times):
            self.lines.append(f"E {lk.t + i} {lk.pid} {lk.pid} 0 {lk.fid} {lk.rc} {lk.herr} {lk.latency_ns} "
                              f"{key} {c0} {c1}\n".encode())
        return self

    def summary_key(self, name: bytes, comm: bytes = b"curl", pid: int = 100, *, buckets: dict[int, int],
                    failures: int = 0, first: int = 1_000, last: int = 2_000) -> CaptureBuilder:
        """One summary-mode key in an ``end`` dump: histogram buckets {bucket: count}, failures, first/last."""
        key = self._name(name)
        signed = key - 2**64 if key >= 2**63 else key  # map dumps print keys signed
        c0, c1 = comm_ints(comm)
        k = f"{pid} 0 1 {signed} {c0} {c1}"
        rows = [f"X {k} {b} {n}" for b, n in buckets.items()] + [f"A {k} {first}", f"Z {k} {last}"]
        if failures:
            rows.append(f"F {k} -2 0 {failures}")
        rows.append(f"M {k} {(OFFSET + first) // MINUTE} {sum(buckets.values())}")
        self.lines += [b"S 5000 end\n", *(r.encode() + b"\n" for r in rows), b"Y 5001\n"]
        return self

    def bytes(self, *, trailer: bool = True, lost: int = 0) -> bytes:
        header = {"host": self.host, "boot_id": "b", "backend": "bpftrace", "mode": self.mode,
                  "wall_offset_ns": OFFSET, "start_time": "2025-12-03T08:20:00+00:00"}
        out = cf.header_line(header) + b"B 1\n" + b"".join(self.lines)
        if lost:
            out += f"L {lost}\n".encode()
        if trailer:
            out += cf.trailer_line({"exit_status": 0, "lost": lost, "end_time_ns": OFFSET + 600 * 10**9})
        return out


def make_run(hosts: dict[str, tuple[str, bytes | None]], *, options: dict | None = None,
             compress: set[str] = frozenset(), reasons: dict[str, str] | None = None) -> store.Run:
    """A run in the store ($FLEETDNS_REPORTS): ``hosts`` maps host → (status, capture bytes or None)."""
    run = store.new_run(options or {"mode": "events"}, "inventory/lab.ini", None, list(hosts))
    for host, (status, data) in hosts.items():
        fields = {"status": status, "reason": (reasons or {}).get(host),
                  "window": {"start": "2025-12-03T08:20:00+00:00", "end": "2025-12-03T08:30:00+00:00"}}
        if data is not None:
            gz = host in compress
            path = run.host_file(host, compressed=gz)
            path.write_bytes(gzip.compress(data) if gz else data)
            fields.update(file=str(path.relative_to(run.path)), bytes=path.stat().st_size)
        run.update_host(host, **fields)
    run.save()
    return run
