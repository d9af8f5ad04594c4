"""Build capture files (format v1, docs/capture-format.md) and run stores the way the probe and gather write them,
so report tests start from real bytes: events mode, summary mode, W records carrying real DNS query packets (built
with struct), odd bytes, damage; and the host scans (``raw/HOST.scan.json``) the capture stage gathers.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import struct
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
    af: int = 0  # a reverse lookup's address family (name: the raw address)


def dns_query(name: bytes | list[bytes], qtype: int = 1, *, qid: int = 0x1234, flags: int = 0x0100,
              qdcount: int = 1) -> bytes:
    """A DNS query packet as a resolver sends it: header (recursion desired), one question of class IN.
    ``name`` is dotted bytes, or a list of labels (so a label may hold a ``.`` or a NUL byte)."""
    labels = name if isinstance(name, list) else ([] if name == b"" else name.split(b"."))
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0" + struct.pack("!HH", qtype, 1)
    return struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, 0) + question


def reverse_query_name(address: str) -> bytes:
    """The in-addr.arpa / ip6.arpa name a resolver asks for the address (PTR)."""
    return ipaddress.ip_address(address).reverse_pointer.encode()


@dataclass
class Query:
    """One DNS query packet a W record carries."""

    payload: bytes
    comm: bytes = b"curl"
    pid: int = 100
    tid: int | None = None  # None: the pid
    t: int = 1_000_000_000  # boot ns
    sid: int = 2  # sendto
    server: str = "10.213.0.2"
    port: int = 53
    sent: int | None = None  # bytes the process sent; None: the payload's length


def wire_record(q: Query) -> bytes:
    """The W record of one query packet (docs/capture-format.md): address halves as little-endian integers (the
    second printed signed, as bpftrace may), payload split into its three byte-string fields."""
    addr = ipaddress.ip_address(q.server)
    if addr.version == 4:
        af, a0, a1 = 2, struct.unpack("<I", addr.packed)[0], 0
    else:
        af, (a0, a1) = 10, struct.unpack("<QQ", addr.packed)
        a1 = a1 - 2**64 if a1 >= 2**63 else a1
    sent = len(q.payload) if q.sent is None else q.sent
    data = q.payload[:min(sent, cf.WIRE_MAX)]
    c0, c1 = comm_ints(q.comm)
    parts = " ".join(cf.hex_bytes(data[a:b]) for a, b in ((0, 128), (128, 256), (256, 272)))
    tid = q.pid if q.tid is None else q.tid
    return (f"W {q.t} {q.pid} {tid} 0 {q.sid} 5 {af} {a0} {a1} {q.port} {sent} {c0} {c1} {parts}\n").encode()


@dataclass
class CaptureBuilder:
    host: str
    mode: str = "events"
    lines: list[bytes] = field(default_factory=list)
    named: set[int] = field(default_factory=set)
    sources: list[str] | None = None  # the header's "sources" (None: absent, an older capture)
    name_globs: list[str] | None = None  # the header's filters.names

    def _name(self, name: bytes | None, af: int = 0) -> int:
        key = key_of(name, af)
        if key not in self.named:
            self.named.add(key)
            length = -1 if name is None else len(name)
            data = name or b""
            self.lines.append(f"N {key} {af} {length} 0 {cf.hex_bytes(data[:128])}\n".encode())
            if len(data) > 128:
                self.lines.append(f"N {key} {af} {length} 128 {cf.hex_bytes(data[128:256])}\n".encode())
        return key

    def lookup(self, lk: Lookup, times: int = 1) -> CaptureBuilder:
        key = self._name(lk.name, lk.af)
        c0, c1 = comm_ints(lk.comm)
        for i in range(times):
            self.lines.append(f"E {lk.t + i} {lk.pid} {lk.pid} 0 {lk.fid} {lk.rc} {lk.herr} {lk.latency_ns} "
                              f"{key} {c0} {c1}\n".encode())
        return self

    def query(self, q: Query, times: int = 1, gap_ns: int = 0) -> CaptureBuilder:
        """W records of a query packet, ``times`` times, ``gap_ns`` apart."""
        for i in range(times):
            self.lines.append(wire_record(Query(**{**q.__dict__, "t": q.t + i * gap_ns})))
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
        if self.sources is not None:
            header.update(sources=self.sources, wire_scope="all" if "wire" in self.sources else None)
        if self.name_globs is not None:
            header["filters"] = {"names": self.name_globs, "cgroup": None}
        out = cf.header_line(header) + b"B 1\n" + b"".join(self.lines)
        if lost:
            out += f"L {lost}\n".encode()
        if trailer:
            out += cf.trailer_line({"exit_status": 0, "lost": lost, "end_time_ns": OFFSET + 600 * 10**9})
        return out


def make_run(hosts: dict[str, tuple[str, bytes | None]], *, options: dict | None = None,
             compress: set[str] = frozenset(), reasons: dict[str, str] | None = None,
             scans: dict[str, dict | bytes] | None = None) -> store.Run:
    """A run in the store ($FLEETDNS_REPORTS): ``hosts`` maps host → (status, capture bytes or None); ``scans``
    host → a scan (a dict, written as JSON, or raw bytes) for ``raw/HOST.scan.json``."""
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
    for host, scan in (scans or {}).items():
        (run.raw_dir / f"{host}.scan.json").write_bytes(scan if isinstance(scan, bytes) else json.dumps(scan).encode())
    run.save()
    return run


def scan(host: str, *, blind_spots: list[dict] = (), connections: list[dict] = (), watch: list[dict] = (),
         hosts_lines: list[str] = (), errors: list[str] = ()) -> dict:
    """A host scan in the shape of the spec (fleetdns-scan/1)."""
    return {"format": "fleetdns-scan/1", "host": host, "taken_at": "2025-12-03T08:19:59.900Z",
            "hooked_libc": {"path": "/lib/x86_64-linux-gnu/libc.so.6", "dev": 2049, "ino": 131090},
            "processes": 57, "blind_spots": list(blind_spots), "connections": list(connections),
            "watch": list(watch), "resolver": {"resolv_conf": "nameserver 10.213.0.2\nsearch lab\n",
                                               "nsswitch_hosts": "hosts: files dns", "hosts_lines": list(hosts_lines)},
            "errors": list(errors)}
