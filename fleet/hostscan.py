"""Host scan: what the libc probe cannot see on this host, and what was already connected when a capture began.

Taken by ``fleetdns-probe run start`` (fleet/hostrun.py) *before* the recorder starts — so the scan's own
``getaddrinfo()`` of the watched names is never captured — and written as ``runs/RUN/scan.json`` (0600). Standard
library only: it runs on the fleet's hosts. Every fact is a read of ``/proc`` or ``/etc`` plus a pure parser
(bytes in, values out), so the parsers are tested on literal text.

API::

    scan(hooked_libc, watch) -> dict       # the scan.json object below; never raises (failures go to "errors")
    check_watch_name(name) -> str | None   # why NAME cannot be a --watch name, or None when it can
    empty(hooked_libc, errors) -> dict     # a scan.json object with nothing found (what a failed scan leaves)

Pure parsers (never raise on malformed lines: they skip them)::

    parse_stat(data) -> ProcStat | None           # /proc/PID/stat: comm, state, flags
    parse_maps(data) -> list[Mapping]             # /proc/PID/maps: file-backed mappings (dev, ino, path)
    parse_tcp(data) -> list[TcpSocket]            # /proc/net/tcp or tcp6: established sockets only
    socket_inode(link) -> int | None              # a /proc/PID/fd link "socket:[N]" → N
    classify_elf(read) -> ElfFacts                # ValueError when it is not a readable ELF file
    classify(elf, maps, hooked, same_mount_ns, mount_ns) -> (reason, detail) | None
    nsswitch_hosts(data) -> str | None            # the "hosts:" line of /etc/nsswitch.conf
    hosts_lines(data, names) -> list[str]         # /etc/hosts lines that name one of *names*

``scan.json`` (format ``fleetdns-scan/1``; docs/scan.md)::

    {"format": "fleetdns-scan/1", "host": "lab1", "taken_at": "2026-12-03T13:00:00.123Z",
     "hooked_libc": {"path": "/lib/x86_64-linux-gnu/libc.so.6", "dev": 2049, "ino": 131090},
     "processes": 57,                                   # processes looked at
     "blind_spots": [{"pid", "comm", "exe", "reason": "static"|"go"|"musl"|"other-libc"|"other-mount-ns",
                      "detail": "one human line"}],
     "connections": [{"pid": int|null, "comm": str|null, "local": "10.213.0.11:40000",
                      "remote": "10.213.0.5:5432", "remote_addr": "10.213.0.5", "remote_port": 5432}],
     "watch": [{"name": "old-db.lab", "addresses": ["10.213.0.5"], "error": null | "EAI_NONAME: …"}],
     "resolver": {"resolv_conf": str|null, "nsswitch_hosts": "hosts: files dns"|null, "hosts_lines": [str]},
     "errors": ["pid 77: /proc/77/exe: permission denied", …]}

Every string that comes from the host (comm, exe, paths, file text) is JSON-safe: UTF-8 where valid, ``\\xNN``
for other bytes and control characters escaped (``fleet.capture_format.display_bytes``, as reports show names).
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import mmap
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from fleet.capture_format import display_bytes

FORMAT = "fleetdns-scan/1"
REASONS = ("static", "go", "musl", "other-libc", "other-mount-ns")

# Bounds: a scan must stay cheap on a host with many processes and connections, and must not hold up the capture.
MAX_PROCESSES = 20_000
#: socket links read in all (/proc/PID/fd); connections of sockets beyond it have no owner (pid null)
MAX_FDS = 200_000
MAX_FDS_PER_PROCESS = 65_536
MAX_CONNECTIONS = 20_000
#: network namespaces whose TCP tables are read (the scanner's own, then one per container-like namespace)
MAX_NETNS = 64
MAX_WATCH = 64
MAX_ERRORS = 100
MAPS_BYTES = 4 << 20
NET_BYTES = 32 << 20
TEXT_BYTES = 1 << 20
#: ELF program/section header tables and the section name table, each
ELF_TABLE_BYTES = 1 << 20
NOTE_BYTES = 64 << 10
#: seconds for the process walk; processes left after it are counted in an error line, not looked at
SCAN_SECONDS = 20.0
#: seconds for resolving every watched name (a dead resolver takes 5 s per try); unanswered names get an error
RESOLVE_SECONDS = 10.0

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread (no user memory, nothing to probe)
PT_INTERP, PT_NOTE = 3, 4
NT_GO_BUILDID = 4  # cmd/internal/buildid: the note Go's linker writes, owner "Go"
SHN_XINDEX = 0xFFFF

_GLIBC = re.compile(rb"libc(?:\.so\.6|-\d[\d.]*\.so)")
_MUSL = re.compile(rb"(?:ld-musl.*|libc\.musl.*)")


# ---------------------------------------------------------------------------------------------- pure parsers

@dataclass(frozen=True)
class ProcStat:
    comm: bytes
    state: bytes
    flags: int


def parse_stat(data: bytes) -> ProcStat | None:
    """``/proc/PID/stat`` → comm, state and flags; None when malformed. comm may hold spaces and ``)``, so the
    fields after it are found from the *last* ``)``."""
    head, sep, rest = data.rpartition(b")")
    _, paren, comm = head.partition(b"(")
    fields = rest.split()
    if not sep or not paren or len(fields) < 7:
        return None
    try:
        return ProcStat(comm, fields[0], int(fields[6]))
    except ValueError:
        return None


@dataclass(frozen=True)
class Mapping:
    dev: int  # os.makedev(major, minor), comparable with os.stat().st_dev
    ino: int
    path: bytes  # without the " (deleted)" suffix
    deleted: bool


def parse_maps(data: bytes) -> list[Mapping]:
    """``/proc/PID/maps`` → its distinct file-backed mappings, in order (anonymous ones, inode 0, are left out).

    A line: ``start-end perms offset major:minor inode path``; dev numbers are hex, the inode decimal; the path
    may hold spaces (newlines are escaped by the kernel) and ends in `` (deleted)`` once the file was removed."""
    seen: dict[tuple[int, int, bytes], Mapping] = {}
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        major, _, minor = parts[3].partition(b":")
        try:
            dev, ino = os.makedev(int(major, 16), int(minor, 16)), int(parts[4])
        except (ValueError, OverflowError):
            continue
        if ino == 0:
            continue
        path, deleted = parts[5], parts[5].endswith(b" (deleted)")
        if deleted:
            path = path[: -len(b" (deleted)")]
        seen.setdefault((dev, ino, path), Mapping(dev, ino, path, deleted))
    return list(seen.values())


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]  # (address text, port)
    remote: tuple[str, int]
    inode: int


def _address(hex_addr: bytes) -> str:
    """An address as /proc/net/tcp* prints it — 32-bit words in host byte order, each as 8 hex digits — as text.
    An IPv4-mapped IPv6 address (an AF_INET6 socket talking IPv4) is shown as the IPv4 address, so it compares
    equal to what getaddrinfo() returns for a name."""
    if len(hex_addr) not in (8, 32):
        raise ValueError("not an IPv4 or IPv6 address")
    raw = b"".join(struct.pack("=I", int(hex_addr[i:i + 8], 16)) for i in range(0, len(hex_addr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def endpoint_text(addr: str, port: int) -> str:
    """``10.0.0.5:5432`` or ``[::1]:53``."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def parse_tcp(data: bytes) -> list[TcpSocket]:
    """``/proc/net/tcp`` or ``tcp6`` → the established sockets (state ``01``), with their socket inodes.

    A line after the heading: ``sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …``,
    an address ``HEX:PORT`` (port in hex)."""
    out = []
    for line in data.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or f[3] != b"01":
            continue
        try:
            (la, _, lp), (ra, _, rp) = f[1].partition(b":"), f[2].partition(b":")
            out.append(TcpSocket((_address(la), int(lp, 16)), (_address(ra), int(rp, 16)), int(f[9])))
        except ValueError:
            continue
    return out


def socket_inode(link: bytes) -> int | None:
    """The inode of a ``/proc/PID/fd`` link ``socket:[12345]``; None for any other file."""
    if link.startswith(b"socket:[") and link.endswith(b"]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class ElfFacts:
    interp: bytes | None  # PT_INTERP's path: a dynamically linked program; None: statically linked
    go: str | None  # how it is known to be a Go program, e.g. ".go.buildinfo section"; None: not Go


def _notes(data: bytes, order: str) -> Iterable[tuple[bytes, int]]:
    """(owner, type) of each ELF note in *data* (4-byte aligned, as Go and most toolchains write them)."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(order + "III", data, pos)
        pos += 12
        yield data[pos:pos + namesz].rstrip(b"\0"), ntype
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3


def classify_elf(read: Callable[[int, int], bytes]) -> ElfFacts:
    """What matters about a program file for the libc probe: is it dynamically linked (PT_INTERP), is it Go.

    ``read(offset, size)`` returns the file's bytes there (fewer at its end). Only the headers, the notes and the
    section names are read, each bounded. Go is known by a ``.go.buildinfo`` section (every Go ≥ 1.13 binary) or
    by the build-id note Go's linker writes (owner ``Go``, type 4), which survives stripped section headers.
    ELF32 and ELF64, either byte order. Raises ValueError when this is no ELF file or its headers are cut short.
    """
    ident = read(0, 64)
    if ident[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if ident[4:5] not in (b"\1", b"\2") or ident[5:6] not in (b"\1", b"\2"):
        raise ValueError("unknown ELF class or byte order")
    order = "<" if ident[5] == 1 else ">"
    if ident[4] == 2:
        header, phdr, shdr = order + "HHIQQQIHHHHHH", order + "IIQQQQQQ", order + "IIQQQQIIQQ"
    else:
        header, phdr, shdr = order + "HHIIIIIHHHHHH", order + "IIIIIIII", order + "IIIIIIIIII"
    try:
        (_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
         shstrndx) = struct.unpack_from(header, ident, 16)
        interp, go = None, None
        if phnum and phentsize >= struct.calcsize(phdr) and phnum * phentsize <= ELF_TABLE_BYTES:
            table = read(phoff, phnum * phentsize)
            for i in range(phnum):
                ph = struct.unpack_from(phdr, table, i * phentsize)
                # ELF64 puts p_flags second, ELF32 seventh: offset and file size move with it
                p_type, offset, size = (ph[0], ph[2], ph[5]) if ident[4] == 2 else (ph[0], ph[1], ph[4])
                if p_type == PT_INTERP:
                    interp = read(offset, min(size, 4096)).split(b"\0")[0]
                elif p_type == PT_NOTE and go is None and any(
                        owner == b"Go" and ntype == NT_GO_BUILDID
                        for owner, ntype in _notes(read(offset, min(size, NOTE_BYTES)), order)):
                    go = "Go build-id note"
        if go is None and shoff and shentsize >= struct.calcsize(shdr):
            first = struct.unpack_from(shdr, read(shoff, shentsize))
            if shnum == 0:  # more sections than e_shnum holds: the count is in section 0's sh_size
                shnum = first[5]
            if shstrndx == SHN_XINDEX:
                shstrndx = first[6]
            if 0 < shnum and shnum * shentsize <= ELF_TABLE_BYTES and shstrndx < shnum:
                table = read(shoff, shnum * shentsize)
                strtab = struct.unpack_from(shdr, table, shstrndx * shentsize)
                names = read(strtab[4], min(strtab[5], ELF_TABLE_BYTES))
                for i in range(shnum):
                    start = struct.unpack_from(shdr, table, i * shentsize)[0]
                    end = names.find(b"\0", start)
                    if start < len(names) and names[start:end if end >= 0 else None] == b".go.buildinfo":
                        go = ".go.buildinfo section"
                        break
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"damaged ELF headers ({exc})") from None
    return ElfFacts(interp, go)


def _base(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[-1]


def is_musl(path: bytes) -> bool:
    """musl's loader/libc: ``ld-musl-*.so.1`` or ``libc.musl-*`` (Alpine), or a ``libc.so`` in a musl directory
    (Debian's musl: ``/usr/lib/x86_64-linux-musl/libc.so``, which maps shows for the ``ld-musl`` symlink)."""
    return bool(_MUSL.fullmatch(_base(path))) or (_base(path) == b"libc.so" and b"musl" in path)


def is_glibc(path: bytes) -> bool:
    return bool(_GLIBC.fullmatch(_base(path)))


def classify(elf: ElfFacts | None, maps: list[Mapping], hooked: Collection[tuple[int, int]], same_mount_ns: bool,
             mount_ns: str = "") -> tuple[str, str] | None:
    """Why the libc probe (a uprobe on the hooked libc file, known by the ``(dev, ino)`` pairs in *hooked*;
    empty when unknown) cannot see this process's lookups: ``(reason, detail)``, or None when it can (or nothing
    says it cannot). *elf* is None when the program file could not be read; the maps still decide musl and other
    libcs then.

    First match wins: ``go`` (Go resolves with its own code, cgo or not, unless told otherwise), ``static``
    (no PT_INTERP and no shared libc mapped: any libc is inside the program), ``musl``, then a glibc that is
    not the hooked file: ``other-mount-ns`` when the process is in another mount namespace (a container), else
    ``other-libc`` (another copy, or the old file after an upgrade: ``(deleted)``)."""
    if elf is not None and elf.go:
        return "go", f"Go program ({elf.go}): Go resolves names with its own code, not libc's"
    # no PT_INTERP but a shared libc mapped: a program started through the loader itself (ld.so PROGRAM), whose
    # exe is ld.so: the maps decide
    if elf is not None and elf.interp is None and not any(is_glibc(m.path) or is_musl(m.path) for m in maps):
        return "static", "statically linked, no dynamic loader: any libc is inside the program"
    musl = [m.path for m in maps if is_musl(m.path)]
    if not musl and elf is not None and elf.interp and is_musl(elf.interp):
        musl = [elf.interp]
    if musl:
        return "musl", f"musl libc {display_bytes(musl[0])}, not the hooked glibc"
    libcs = [m for m in maps if is_glibc(m.path)]
    if not hooked or not libcs or any((m.dev, m.ino) in hooked for m in libcs):
        return None
    m = libcs[0]
    what = (f"{display_bytes(m.path)}{' (deleted)' if m.deleted else ''} "
            f"(dev {os.major(m.dev)}:{os.minor(m.dev)} ino {m.ino})")
    if not same_mount_ns:
        return "other-mount-ns", f"maps {what} in another mount namespace ({mount_ns}), not the hooked file"
    return "other-libc", f"maps {what}, not the hooked libc file"


def nsswitch_hosts(data: bytes) -> str | None:
    """The ``hosts:`` line of nsswitch.conf, comment removed and spaces squeezed (``hosts: files dns``)."""
    for line in data.splitlines():
        words = line.split(b"#", 1)[0].split()
        if words and words[0] == b"hosts:":
            return display_bytes(b" ".join(words))
    return None


def hosts_lines(data: bytes, names: Iterable[str]) -> list[str]:
    """The lines of an /etc/hosts file that give an address for one of *names* (any case), as written."""
    wanted = {n.lower().encode("utf-8", "backslashreplace") for n in names}
    out = []
    for line in data.splitlines():
        fields = line.split(b"#", 1)[0].split()
        if len(fields) > 1 and any(f.lower() in wanted for f in fields[1:]):
            out.append(display_bytes(line.strip()))
    return out


def check_watch_name(name: str) -> str | None:
    """Why *name* cannot be a watched name, or None: 1 to 253 bytes (a DNS name's limit), no whitespace or
    control characters (a name is one argument on a command line and one token in reports), UTF-8 (what
    getaddrinfo() is given: a byte that is not UTF-8 arrives from the command line as a lone surrogate)."""
    if any("\ud800" <= c <= "\udfff" for c in name):
        return "a name is UTF-8 text"
    size = len(name.encode("utf-8"))
    if not 1 <= size <= 253:
        return f"a name is 1 to 253 bytes, not {size}"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "a name has no whitespace or control characters"
    return None


# ---------------------------------------------------------------------------------------------- reading the host

class _Errors(list):
    """The scan's error lines, at most MAX_ERRORS; the rest are counted in one last line."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def add(self, line: str) -> None:
        if len(self) < MAX_ERRORS:
            self.append(line)
        else:
            self.more += 1

    def lines(self) -> list[str]:
        return [*self, *([f"… and {self.more} more errors"] if self.more else [])]


class _Vanished(Exception):
    """The process ended during the scan: skipped, not an error."""


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _read(path: str, limit: int) -> tuple[bytes, bool]:
    """At most *limit* bytes of *path* (in blocks: /proc files have no size) and whether there was more."""
    chunks, size = [], 0
    with open(path, "rb", buffering=0) as f:
        while size <= limit:
            block = f.read(min(1 << 16, limit + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
    return b"".join(chunks)[:limit], size > limit


def _proc_read(pid: int, what: str, limit: int) -> tuple[bytes, bool]:
    try:
        return _read(f"/proc/{pid}/{what}", limit)
    except (FileNotFoundError, ProcessLookupError):
        raise _Vanished() from None


def _link(path: str) -> bytes | None:
    try:
        return os.readlink(os.fsencode(path))
    except OSError:
        return None


def _as_mapped(path: str) -> tuple[int, int] | None:
    """The ``(dev, ino)`` that /proc/PID/maps shows for *path*: one page of it mapped here and looked up in our
    own maps. On overlayfs it differs from ``os.stat``'s (maps names the overlay's device, stat a per-layer one:
    seen on 6.18), so comparing other processes' maps with stat alone would call the hooked file another libc.
    None when it cannot be mapped."""
    try:
        with open(path, "rb") as f:
            # private and writable only so that ctypes can take its address; never written
            page = mmap.mmap(f.fileno(), mmap.PAGESIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    try:
        view = ctypes.c_char.from_buffer(page)
        start = b"%x-" % ctypes.addressof(view)
        del view  # the buffer export would keep the mapping from closing
        data, _ = _read("/proc/self/maps", MAPS_BYTES)
        line = next((line for line in data.splitlines() if line.startswith(start)), b"")
        mapped = parse_maps(line)
        return (mapped[0].dev, mapped[0].ino) if mapped else None
    except (OSError, TypeError, ValueError):
        return None
    finally:
        try:
            page.close()
        except BufferError:  # still exported: the page goes with the garbage collector
            pass


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _resolve(names: list[str], timeout: float) -> list[dict[str, Any]]:
    """Each name through getaddrinfo() (the host's own resolver: files, DNS, whatever nsswitch says), all at once
    in daemon threads so that one dead server costs *timeout* in all, not per name."""
    codes = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}
    results = [{"name": n, "addresses": [], "error": f"no answer within {timeout:g}s"} for n in names]

    def one(i: int) -> None:
        try:
            infos = socket.getaddrinfo(names[i], None, type=socket.SOCK_STREAM)
            results[i] = {"name": names[i], "addresses": list(dict.fromkeys(str(info[4][0]) for info in infos)),
                          "error": None}
        except socket.gaierror as exc:
            results[i] = {"name": names[i], "addresses": [],
                          "error": f"{codes.get(exc.errno, f'EAI {exc.errno}')}: {exc.strerror}"}
        except (OSError, UnicodeError) as exc:  # e.g. a name IDNA cannot encode
            results[i] = {"name": names[i], "addresses": [], "error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(names))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [dict(r) for r in results]


def _resolver(watch: list[str], errors: _Errors) -> dict[str, Any]:
    out: dict[str, Any] = {"resolv_conf": None, "nsswitch_hosts": None, "hosts_lines": []}
    texts = {}
    for path in ("/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/hosts"):
        try:
            texts[path], more = _read(path, TEXT_BYTES)
        except FileNotFoundError:
            continue  # legitimate: glibc has defaults for each
        except OSError as exc:
            errors.add(f"{path}: {_why(exc)}")
            continue
        if more:
            errors.add(f"{path}: only its first {TEXT_BYTES} bytes were read")
    if "/etc/resolv.conf" in texts:
        out["resolv_conf"] = "\n".join(display_bytes(line) for line in texts["/etc/resolv.conf"].splitlines())
    if "/etc/nsswitch.conf" in texts:
        out["nsswitch_hosts"] = nsswitch_hosts(texts["/etc/nsswitch.conf"])
    if "/etc/hosts" in texts and watch:
        out["hosts_lines"] = hosts_lines(texts["/etc/hosts"], watch)
    return out


def _pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


class _ProcessWalk:
    """One pass over /proc: blind spots, the owner of every socket, the network namespaces to read TCP from."""

    def __init__(self, hooked: set[tuple[int, int]], errors: _Errors) -> None:
        self.hooked, self.errors = hooked, errors
        self.me = os.getpid()
        self.my_mnt, self.my_net = _link("/proc/self/ns/mnt"), _link("/proc/self/ns/net")
        self.looked_at = 0
        self.blind_spots: list[dict[str, Any]] = []
        self.owners: dict[int, tuple[int, str]] = {}  # socket inode → (lowest pid holding it, comm)
        self.netns: dict[bytes, int] = {}  # other network namespace → a pid in it (to read its TCP tables)
        self.fds = 0
        self.elf_cache: dict[tuple[int, int], ElfFacts | str] = {}

    def run(self, max_processes: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        pids = [p for p in _pids() if p != self.me]
        for n, pid in enumerate(pids):
            if n >= max_processes or time.monotonic() > deadline:
                why = f"the first {max_processes}" if n >= max_processes else f"{seconds:g}s"
                self.errors.add(f"{len(pids) - n} processes not looked at: the scan stops after {why}")
                return
            try:
                self.process(pid)
            except _Vanished:
                continue
            except PermissionError as exc:
                self.errors.add(f"pid {pid}: {exc.filename}: {_why(exc)}")
            except OSError as exc:
                self.errors.add(f"pid {pid}: {exc.filename or ''}: {_why(exc)}")

    def process(self, pid: int) -> None:
        stat = parse_stat(_proc_read(pid, "stat", 4096)[0])
        if stat is None:
            self.errors.add(f"pid {pid}: unreadable /proc/{pid}/stat")
            return
        if stat.flags & PF_KTHREAD or stat.state in (b"Z", b"X"):
            return  # kernel threads and zombies run no user code: nothing to probe
        self.looked_at += 1
        comm = display_bytes(stat.comm)
        mnt = _link(f"/proc/{pid}/ns/mnt")
        net = _link(f"/proc/{pid}/ns/net")
        if net is not None and net != self.my_net and net not in self.netns and len(self.netns) < MAX_NETNS:
            self.netns[net] = pid
        self.sockets(pid, comm)
        exe = _link(f"/proc/{pid}/exe")
        if exe is None and not os.path.exists(f"/proc/{pid}"):
            raise _Vanished()
        maps_data, more = _proc_read(pid, "maps", MAPS_BYTES)
        if more:
            self.errors.add(f"pid {pid}: /proc/{pid}/maps: only its first {MAPS_BYTES} bytes were read")
        reason = classify(self.elf(pid), parse_maps(maps_data), self.hooked,
                          mnt is None or mnt == self.my_mnt, display_bytes(mnt or b"?"))
        if reason is not None:
            self.blind_spots.append({"pid": pid, "comm": comm, "exe": display_bytes(exe) if exe else None,
                                     "reason": reason[0], "detail": reason[1]})

    def elf(self, pid: int) -> ElfFacts | None:
        """The program's ELF facts, read through /proc/PID/exe (the very file it runs, whatever its mount
        namespace or a later rename); cached per file. None (and an error line) when unreadable."""
        path = f"/proc/{pid}/exe"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            if not os.path.exists(f"/proc/{pid}"):
                raise _Vanished() from None
            self.errors.add(f"pid {pid}: {path}: {_why(exc)}")
            return None
        except OSError as exc:
            self.errors.add(f"pid {pid}: {path}: {_why(exc)}")
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key not in self.elf_cache:
                def read(offset: int, size: int) -> bytes:
                    return os.pread(fd, size, offset) if 0 <= offset < 1 << 62 else b""
                try:
                    self.elf_cache[key] = classify_elf(read)
                except (ValueError, OSError) as exc:
                    self.elf_cache[key] = str(exc)
        finally:
            os.close(fd)
        facts = self.elf_cache[key]
        if isinstance(facts, str):
            self.errors.add(f"pid {pid}: {path}: {facts}")
            return None
        return facts

    def sockets(self, pid: int, comm: str) -> None:
        """Record *pid* as the owner of the sockets it holds (the lowest pid wins: pids are walked in order)."""
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            raise _Vanished() from None
        except OSError as exc:
            self.errors.add(f"pid {pid}: {fd_dir}: {_why(exc)}")
            return
        if len(names) > MAX_FDS_PER_PROCESS or self.fds + len(names) > MAX_FDS:
            self.errors.add(f"pid {pid}: {len(names)} open files: only part of them read (connection owners "
                            f"may be missing)")
            names = names[:max(0, min(MAX_FDS_PER_PROCESS, MAX_FDS - self.fds))]
        self.fds += len(names)
        for name in names:
            link = _link(f"{fd_dir}/{name}")
            inode = socket_inode(link) if link else None
            if inode is not None:
                self.owners.setdefault(inode, (pid, comm))


def _connections(walk: _ProcessWalk, errors: _Errors) -> list[dict[str, Any]]:
    """The established TCP connections of this network namespace and of each other one a process lives in."""
    sources = [("self", "/proc/self/net")] + [(display_bytes(ns), f"/proc/{pid}/net") for ns, pid in walk.netns.items()]
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for _ns, base in sources:
        for table in ("tcp", "tcp6"):
            path = f"{base}/{table}"
            try:
                data, more = _read(path, NET_BYTES)
            except FileNotFoundError:
                continue  # no IPv6 in this kernel, or the namespace's process ended
            except OSError as exc:
                errors.add(f"{path}: {_why(exc)}")
                continue
            if more:
                errors.add(f"{path}: only its first {NET_BYTES} bytes were read")
            for s in parse_tcp(data):
                if s.inode in seen:  # 0 (a socket in teardown) is kept, never deduplicated
                    continue
                if s.inode:
                    seen.add(s.inode)
                if len(out) >= MAX_CONNECTIONS:
                    errors.add(f"more than {MAX_CONNECTIONS} established connections: the rest are left out")
                    return out
                pid, comm = walk.owners.get(s.inode, (None, None)) if s.inode else (None, None)
                out.append({"pid": pid, "comm": comm, "local": endpoint_text(*s.local),
                            "remote": endpoint_text(*s.remote), "remote_addr": s.remote[0],
                            "remote_port": s.remote[1]})
    return out


def empty(hooked_libc: str | None, errors: list[str]) -> dict[str, Any]:
    """A scan.json object with nothing found yet: what a scan starts from, and what a failed one leaves."""
    return {"format": FORMAT, "host": display_bytes(os.fsencode(socket.gethostname())), "taken_at": _utc_now(),
            "hooked_libc": {"path": hooked_libc, "dev": None, "ino": None}, "processes": 0, "blind_spots": [],
            "connections": [], "watch": [],
            "resolver": {"resolv_conf": None, "nsswitch_hosts": None, "hosts_lines": []}, "errors": errors}


def scan(hooked_libc: str | None, watch: list[str], *, max_processes: int = MAX_PROCESSES,
         seconds: float = SCAN_SECONDS, resolve_seconds: float = RESOLVE_SECONDS) -> dict[str, Any]:
    """The scan.json object (module docstring) of this host, now. Never raises: each part that fails leaves
    its list empty and says why in ``errors``; one bad process is one error line, a vanished one none.

    *hooked_libc* is the libc file the probe hooks (host.json's ``libc``); *watch* the names to resolve (a name
    :func:`check_watch_name` refuses is listed with that error, never resolved)."""
    errors = _Errors()
    result = empty(hooked_libc, errors)
    names = list(dict.fromkeys(watch))
    if len(names) > MAX_WATCH:
        errors.add(f"{len(names) - MAX_WATCH} watched names left out: at most {MAX_WATCH}")
        names = names[:MAX_WATCH]
    bad = {n: why for n in names if (why := check_watch_name(n))}
    good = [n for n in names if n not in bad]
    hooked: set[tuple[int, int]] = set()  # the hooked file's (dev, ino) as stat and as maps show it

    def hooked_libc_file() -> None:
        if not hooked_libc:
            errors.add("no hooked libc known (other-libc and other-mount-ns not checked)")
            return
        try:
            st = os.stat(hooked_libc)
        except OSError as exc:
            errors.add(f"hooked libc {hooked_libc}: {_why(exc)} (other-libc and other-mount-ns not checked)")
            return
        result["hooked_libc"].update(dev=st.st_dev, ino=st.st_ino)
        hooked.add((st.st_dev, st.st_ino))
        mapped = _as_mapped(hooked_libc)
        if mapped is not None:
            hooked.add(mapped)

    def resolve() -> None:
        answers = {r["name"]: r for r in _resolve(good, resolve_seconds)}
        result["watch"] = [answers.get(n) or {"name": display_bytes(n.encode("utf-8", "backslashreplace")),
                                              "addresses": [], "error": bad[n]} for n in names]

    def processes() -> None:
        walk = _ProcessWalk(hooked, errors)
        walk.run(max_processes, seconds)
        result.update(processes=walk.looked_at, blind_spots=walk.blind_spots,
                      connections=_connections(walk, errors))

    # names first, connections last: the connections are then the ones open closest to the capture's start
    steps = [("hooked libc", hooked_libc_file), ("watched names", resolve),
             ("resolver configuration", lambda: result.update(resolver=_resolver(good, errors))),
             ("processes", processes)]
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 — the capture must start whatever the scan meets
            errors.add(f"{what}: the scan failed: {type(exc).__name__}: {exc}")
    result["errors"] = errors.lines()
    return result
