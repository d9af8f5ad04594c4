"""Render the DNS probe script for one backend from :class:`ProbeOptions`.

The hooked functions are described once, in :data:`FUNCTIONS` (symbol, DWARF name and parameters, where the
name / address, the result pointer and the ``h_errno`` pointer live); the probe bodies of both backends are
generated from that table into the templates ``dnsprobe.bt.tmpl`` (+ ``summary.bt.tmpl``) and
``dnsprobe.stp.tmpl`` (+ ``summary.stp.tmpl``); placeholders are ``{{NAME}}``, because ``$``, ``%`` and ``@``
already mean something in the probe languages. stap has two runtimes (:func:`stap_runtime`): the module
runtime does everything in the kernel as bpftrace does; the bpf runtime (events only) prints raw lines that
the runner assembles (``fleet.probes.runner.StapBpfAssembler``); docs/capture-format.md lists their limits.

API::

    opts = ProbeOptions(backend="bpftrace", mode="events", libc="/lib/x86_64-linux-gnu/libc.so.6",
                        binaries=(), names=("*.corp.example",), cgroup=None)
    script: str = render(opts)            # raises UsageError / InputError on bad options
    env: dict[str, str] = backend_env(opts)   # environment the backend needs for this script
    stap_arguments(opts) -> list[str]     # stap's options for this script (runtime, limits)
    stap_runtime() -> "module" | "bpf"    # FLEETDNS_STAP_RUNTIME, else by the kernel build tree
    find_libc() -> str                    # this machine's libc (the one /bin/sh maps)
    elf_info(path) -> ElfInfo(build_id, symbols)

What the rendered script prints is the record layer of ``docs/capture-format.md``: ``N`` name definitions,
then ``E`` records (events mode) or map dumps between ``S``/``Y`` markers (summary mode). The runner adds the
header, turns bpftrace's map dumps (and stap bpf-runtime raw lines) into records and adds the trailer.

Stdlib only: this module runs on fleet hosts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import struct
from collections.abc import Iterable
from importlib import resources

from fleet.errors import EnvironmentProblem, InputError, UsageError

BACKENDS = ("bpftrace", "stap")
MODES = ("events", "summary")
#: where lookups are seen: libc's resolver functions (uprobes), or DNS queries on the wire (syscall tracepoints)
SOURCES = ("libc", "wire")
STAP_RUNTIMES = ("module", "bpf")

#: Longest name reported byte-exactly; a name of this many bytes or more is flagged as truncated
#: (DNS names are at most 253 text bytes, so 255 leaves room for a trailing dot and one more byte).
NAME_MAX = 256
#: bpftrace prints a ``buf()`` of at most BPFTRACE_STRLEN bytes: names are read as two halves of this size.
HALF = NAME_MAX // 2


@dataclasses.dataclass(frozen=True)
class Function:
    """One hooked libc function.

    ``kind`` is ``fwd`` (a name string at ``name_arg``) or ``rev`` (an address: ``gethostbyaddr`` style
    ``addr, len, type`` at args 0-2, or ``getnameinfo``'s ``struct sockaddr *``). ``returns`` is ``int``
    (EAI_* or errno), ``ptr`` (NULL on failure, then h_errno) or ``r`` (the ``_r`` convention: errno
    return, ``*result == NULL`` on failure, h_errno through ``h_errnop``). Argument positions are 0-based;
    positions ≥ 6 are on the stack (x86-64 SysV). ``params`` are the DWARF parameter names in order (stap
    reads arguments as ``$name``; its bpf runtime cannot read registers by position).
    """

    fid: int
    symbol: str
    dwarf: str
    kind: str
    returns: str
    params: tuple[str, ...]
    result_arg: int | None = None
    herrp_arg: int | None = None


#: Function ids are part of the capture format (docs/capture-format.md); never renumber.
FUNCTIONS: tuple[Function, ...] = (
    Function(1, "getaddrinfo", "getaddrinfo", "fwd", "int", ("name", "service", "hints", "pai")),
    Function(2, "gethostbyname", "gethostbyname", "fwd", "ptr", ("name",)),
    Function(3, "gethostbyname2", "gethostbyname2", "fwd", "ptr", ("name", "af")),
    Function(4, "gethostbyname_r", "__gethostbyname_r", "fwd", "r",
             ("name", "resbuf", "buffer", "buflen", "result", "h_errnop"), result_arg=4, herrp_arg=5),
    Function(5, "gethostbyname2_r", "__gethostbyname2_r", "fwd", "r",
             ("name", "af", "resbuf", "buffer", "buflen", "result", "h_errnop"), result_arg=5, herrp_arg=6),
    Function(6, "gethostbyaddr", "gethostbyaddr", "rev", "ptr", ("addr", "len", "type")),
    Function(7, "gethostbyaddr_r", "__gethostbyaddr_r", "rev", "r",
             ("addr", "len", "type", "resbuf", "buffer", "buflen", "result", "h_errnop"), result_arg=6, herrp_arg=7),
    Function(8, "getnameinfo", "getnameinfo", "rev", "int", ("sa", "addrlen", "host", "hostlen", "serv", "servlen",
                                                              "flags")),
)
FUNCTION_NAMES: dict[int, str] = {f.fid: f.symbol for f in FUNCTIONS}


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """What to probe and how.

    ``libc`` is the libc file to hook (default: this machine's, :func:`find_libc`); ``binaries`` are extra
    programs (static ones carrying their own resolver) hooked the same way, on whichever of the functions
    they define. ``names`` are shell globs matched case-insensitively in the kernel (``*`` at most once,
    ``?`` anywhere; reverse lookups are dropped when globs are given). ``cgroup`` is a cgroup v2 directory
    (bpftrace only). ``interval`` is the summary dump period in seconds (per-minute counts are flushed each
    wall-clock minute regardless); ``max_keys`` bounds every BPF map (bpftrace) or array (stap).
    ``stap_runtime`` is ``module`` or ``bpf`` (None: :func:`stap_runtime` decides).
    ``sources`` are ``libc`` and/or ``wire`` (bpftrace only: UDP/53 queries leaving any process, read at the
    send syscalls); ``wire_netns`` limits the wire source to one network namespace (its inode; None: all).
    """

    backend: str = "bpftrace"
    mode: str = "events"
    libc: str | None = None
    binaries: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    cgroup: str | None = None
    interval: int = 60
    max_keys: int = 65536
    stap_runtime: str | None = None
    sources: tuple[str, ...] = ("libc",)
    wire_netns: int | None = None

    def resolved_libc(self) -> str:
        return self.libc or find_libc()

    def resolved_stap_runtime(self) -> str:
        """``module`` or ``bpf``: ``stap_runtime`` if given, else :func:`stap_runtime`."""
        return self.stap_runtime or stap_runtime()


# ---------------------------------------------------------------------------------------------- ELF helpers

@dataclasses.dataclass(frozen=True)
class ElfInfo:
    """A file's GNU build id (hex, or None) and its defined function symbols (dynamic and static tables)."""

    build_id: str | None
    symbols: frozenset[str]


def elf_info(path: str) -> ElfInfo:
    """Read a 64-bit little-endian ELF file's build id and defined function symbols (versions stripped).

    Raises InputError when the file is missing or not such an ELF file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise InputError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    build_id = None
    symbols: set[str] = set()
    for _name, stype, _flags, _addr, off, size, link, _info, _align, entsize in sections:
        if stype == 7:  # SHT_NOTE: look for NT_GNU_BUILD_ID (type 3, owner "GNU")
            pos = off
            while pos + 12 <= off + size:
                namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
                name_end = pos + 12 + ((namesz + 3) & ~3)
                if ntype == 3 and data[pos + 12:pos + 12 + namesz] == b"GNU\0":
                    build_id = data[name_end:name_end + descsz].hex()
                pos = name_end + ((descsz + 3) & ~3)
        elif stype in (2, 11) and entsize:  # SHT_SYMTAB, SHT_DYNSYM
            strtab_off = sections[link][4]
            for i in range(size // entsize):
                st_name, st_info, _o, st_shndx, _v, _s = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
                if st_info & 0xF == 2 and st_shndx != 0:  # STT_FUNC, defined here
                    end = data.index(b"\0", strtab_off + st_name)
                    symbols.add(data[strtab_off + st_name:end].decode("ascii", "replace").split("@")[0])
    return ElfInfo(build_id, frozenset(symbols))


def find_libc() -> str:
    """This machine's libc file, as mapped by a dynamically linked program (``/bin/sh``'s loader path)."""
    for candidate in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                      "/lib64/libc.so.6", "/usr/lib64/libc.so.6", "/usr/lib/libc.so.6", "/lib/libc.so.6"):
        if os.path.exists(candidate):
            return os.path.realpath(candidate)
    raise InputError("no libc.so.6 found in the usual places", hint="pass the libc path explicitly")


# ---------------------------------------------------------------------------------------------- validation

_GLOB_OK = re.compile(r"^[^*\[\]]*\*?[^*\[\]]*$")


def _check(opts: ProbeOptions) -> list[tuple[str, list[Function]]]:
    """Validate options; return the hooked files with the functions each defines."""
    if opts.backend not in BACKENDS:
        raise UsageError(f"unknown backend {opts.backend!r} (choose from {', '.join(BACKENDS)})")
    if opts.mode not in MODES:
        raise UsageError(f"unknown mode {opts.mode!r} (choose from {', '.join(MODES)})")
    if opts.interval < 1:
        raise UsageError("the summary interval must be at least 1 second")
    if not 16 <= opts.max_keys <= 4_000_000:
        raise UsageError("max_keys must be between 16 and 4000000")
    for glob in opts.names:
        if not glob or not _GLOB_OK.match(glob) or len(glob.encode()) > 200:
            raise UsageError(
                f"name glob {glob!r} cannot be matched in the kernel",
                hint="use at most one '*' (prefix*, *suffix, prefix*suffix) and '?'; no [classes]")
    if opts.backend == "stap":
        runtime = opts.resolved_stap_runtime()
        if runtime not in STAP_RUNTIMES:
            raise UsageError(f"unknown stap runtime {runtime!r} (choose from {', '.join(STAP_RUNTIMES)})")
        if runtime == "bpf" and opts.mode == "summary":
            raise UsageError("summary mode needs stap's module runtime (its bpf runtime has no loops to dump maps)",
                             hint="use --backend bpftrace, or events mode")
        if runtime == "bpf" and opts.names:
            raise UsageError("name globs need stap's module runtime (its bpf runtime cannot match them in the "
                             "kernel)", hint="use --backend bpftrace")
    if not opts.sources or any(s not in SOURCES for s in opts.sources) or len(set(opts.sources)) != len(opts.sources):
        raise UsageError(f"sources must be one or both of {', '.join(SOURCES)}, not {', '.join(opts.sources)!r}")
    if "wire" in opts.sources:
        if opts.backend != "bpftrace":
            raise UsageError("the wire source needs the bpftrace backend", hint="use --source libc with stap")
        if "libc" not in opts.sources and opts.mode == "summary":
            raise UsageError("summary mode needs the libc source (wire queries are always single records)",
                             hint="use --source both, or events mode")
    if opts.cgroup is not None:
        if opts.backend != "bpftrace":
            raise UsageError("--cgroup needs the bpftrace backend")
        if not os.path.isdir(opts.cgroup):
            raise InputError(f"cgroup {opts.cgroup} is not a directory")
    files = []
    for path in (opts.resolved_libc(), *opts.binaries):
        if not os.path.isfile(path):
            raise InputError(f"{path} does not exist or is not a file")
        syms = elf_info(path).symbols
        funcs = [f for f in FUNCTIONS if f.symbol in syms]
        if not funcs:
            raise InputError(f"{path} defines none of the resolver functions "
                             f"({', '.join(f.symbol for f in FUNCTIONS)})")
        files.append((os.path.realpath(path), funcs))
    return files


SOURCE_CHOICES = ("libc", "wire", "both")
WIRE_SCOPES = ("auto", "all", "netns")
#: /proc/self/ns/pid's inode in the initial pid namespace (the kernel's PROC_PID_INIT_INO)
_INIT_PID_NS_INO = 0xEFFFFFFC


def resolve_sources(choice: str | None, backend: str) -> tuple[str, ...]:
    """``--source libc|wire|both`` as the sources tuple; None (the default): both with bpftrace, libc with stap."""
    if choice is None:
        choice = "both" if backend == "bpftrace" else "libc"
    if choice not in SOURCE_CHOICES:
        raise UsageError(f"unknown source {choice!r} (choose from {', '.join(SOURCE_CHOICES)})")
    return SOURCES if choice == "both" else (choice,)


def wire_netns(scope: str = "auto") -> int | None:
    """The network namespace (inode) the wire source is limited to, for ``--wire-scope``: ``all`` → None (every
    namespace: a real host, whose containers are its own processes); ``netns`` → this process's; ``auto`` →
    ``netns`` when this process is not in the initial pid namespace (a probe inside a container or a lab host
    sees that one's traffic, not its neighbours'), else ``all``."""
    if scope not in WIRE_SCOPES:
        raise UsageError(f"unknown wire scope {scope!r} (choose from {', '.join(WIRE_SCOPES)})")
    if scope == "auto":
        scope = "all" if os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS_INO else "netns"
    return None if scope == "all" else os.stat("/proc/self/ns/net").st_ino


def glob_parts(glob: str) -> tuple[bytes, bytes | None]:
    """Split a glob into (prefix, suffix); suffix is None when the glob has no ``*`` (exact length match)."""
    raw = glob.lower().encode()
    if b"*" not in raw:
        return raw, None
    pre, suf = raw.split(b"*")
    return pre, suf


def glob_checks(glob: str) -> tuple[int, bool, list[tuple[int, bool, int]]]:
    """What a probe tests for one glob, in either language: ``(length, exact, checks)``. The name must be
    exactly ``length`` bytes long when ``exact`` (no ``*``), else at least that long; each check
    ``(index, from_end, byte)`` says the lowercased byte at ``index`` (counted back from the name's end when
    ``from_end``: 1 is the last byte) must be ``byte``. ``?`` positions are not checked."""
    pre, suf = glob_parts(glob)
    checks = [(i, False, ch) for i, ch in enumerate(pre) if ch != ord("?")]
    checks += [(len(suf) - i, True, ch) for i, ch in enumerate(suf or b"") if ch != ord("?")]
    return len(pre) + len(suf or b""), suf is None, checks


def name_matches(name: bytes, globs: Iterable[str]) -> bool:
    """The in-kernel match, in Python (tests and user-side filtering): case-insensitive ASCII, bytes."""
    globs = list(globs)
    if not globs:
        return True
    low = name.lower()
    return any(fnmatch.fnmatchcase(low.decode("latin-1"), g.lower().encode().decode("latin-1")) for g in globs)


# ---------------------------------------------------------------------------------------------- bpftrace

def task_comm_offset(btf_path: str = "/sys/kernel/btf/vmlinux") -> int:
    """Byte offset of ``comm`` in the kernel's ``struct task_struct``, from the kernel's BTF.

    The probe reads comm as two u64 at ``curtask + offset``: integers print unambiguously and an order of
    magnitude faster than bpftrace's ``%rx`` hex. Raises EnvironmentProblem without kernel BTF.
    """
    try:
        with open(btf_path, "rb") as f:
            data = f.read()
    except OSError:
        raise EnvironmentProblem("kernel BTF (/sys/kernel/btf/vmlinux) is missing",
                                 hint="the bpftrace backend needs a kernel built with CONFIG_DEBUG_INFO_BTF") from None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != 0xEB9F:
        raise EnvironmentProblem(f"{btf_path} is not BTF")
    strs = hdr_len + str_off

    def name(off: int) -> bytes:
        return data[strs + off:data.index(b"\0", strs + off)]

    # bytes following the 12-byte common header, by BTF kind (vlen = number of members/params/values)
    extra = {1: lambda v: 4, 3: lambda v: 12, 4: lambda v: 12 * v, 5: lambda v: 12 * v, 6: lambda v: 8 * v,
             13: lambda v: 8 * v, 14: lambda v: 4, 15: lambda v: 12 * v, 17: lambda v: 4, 19: lambda v: 12 * v}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind == 4 and name(name_off) == b"task_struct":
            for i in range(vlen):
                member_name, _type, offset = struct.unpack_from("<III", data, pos + 12 * i)
                if name(member_name) == b"comm":
                    return ((offset & 0xFFFFFF) if kflag else offset) // 8
        pos += extra.get(kind, lambda v: 0)(vlen)
    raise EnvironmentProblem("struct task_struct has no comm in the kernel's BTF")


def _bt_arg(n: int) -> str:
    """bpftrace expression for a 0-based integer/pointer argument at a uprobe's entry (stack past 6)."""
    return f"arg{n}" if n < 6 else f'*(uint64*)(reg("sp") + {8 * (n - 5)})'


def _bt_byte(offset: str) -> str:
    """One byte of the name at ``$p + offset``, ASCII-lowercased into ``$l``."""
    # $l is 64-bit on purpose: bpftrace 0.17 silently drops `$l = $l + 32` when $l is a uint8 variable, which
    # made uppercase names miss lowercase globs
    return f"$l = (uint64)*(uint8*)($p + {offset}); if ($l >= 65 && $l <= 90) {{ $l = $l + 32; }}"


def _bt_glob(globs: tuple[str, ...]) -> str:
    """Statements setting ``$m`` to 1 when the name at ``$p`` (length ``$n``) matches one of the globs."""
    if not globs:
        return "$m = 1;"
    out = ["$m = 0;"]
    for glob in globs:
        length, exact, checks = glob_checks(glob)
        body = ["$g = 1;"]
        for index, from_end, ch in checks:
            offset = f"(uint64)($n - {index})" if from_end else str(index)
            body.append(f"{_bt_byte(offset)} if ($l != {ch}) {{ $g = 0; }}")
        body.append("if ($g) { $m = 1; }")
        out.append(f"if ($m == 0 && $n {'==' if exact else '>='} {length}) {{ " + " ".join(body) + " }")
    return "\n    ".join(out)


_FNV_OFFSET, _FNV_PRIME = 14695981039346656037, 1099511628211


def _bt_name(f: Function, opts: ProbeOptions) -> list[str]:
    """Entry statements setting ``$p`` (the bytes to report), ``$n`` (their length; NAME_MAX = truncated,
    -1 = NULL), ``$af`` (0 = a name, else the address family), ``$h`` (the name key: FNV-1a of af and the
    bytes, 1 for NULL) and ``$m`` (1 = passes the name globs)."""
    if f.kind == "fwd":
        return [
            f"$p = (uint64)arg0; $af = (int64)0; $h = (uint64){_FNV_OFFSET}; $n = (int64)0;",
            "if ($p == 0) { $n = -1; $h = 1; } else {",
            f"  while ($n < {NAME_MAX}) {{ $c = *(uint8*)($p + (uint64)$n); if ($c == 0) {{ break; }} "
            f"$h = ($h ^ $c) * {_FNV_PRIME}; $n++; }}",
            "}",
            _bt_glob(opts.names)]
    if f.symbol == "getnameinfo":
        # struct sockaddr: family at 0; sin_addr at 4 (AF_INET), sin6_addr at 8 (AF_INET6)
        lines = ["$af = (int64)*(uint16*)arg0; $p = (uint64)arg0 + 4; $n = (int64)4;",
                 "if ($af == 10) { $p = (uint64)arg0 + 8; $n = 16; } else { if ($af != 2) { $n = 0; } }"]
    else:  # gethostbyaddr(addr, len, type)
        lines = ["$af = (int64)arg2; $n = (int64)arg1; $p = (uint64)arg0; if ($n > 16) { $n = 16; }"]
    return lines + [
        f"$h = ((uint64){_FNV_OFFSET} ^ (uint64)$af) * {_FNV_PRIME}; $i = (int64)0;",
        "if ($p == 0) { $n = -1; $h = 1; }",
        f"while ($i < $n) {{ $c = *(uint8*)($p + (uint64)$i); $h = ($h ^ $c) * {_FNV_PRIME}; $i++; }}",
        "$m = 1;"]


def _bt_define_name() -> list[str]:
    """Entry statements printing the N record(s) of a name key not yet seen (@nd remembers them)."""
    return [
        "if (@nd[$h] == 0) {",
        f"  @nd[$h] = 1; $a = $n; if ($a > {HALF}) {{ $a = {HALF}; }} if ($a < 0) {{ $a = 0; }}",
        f"  $b = $n - {HALF}; if ($b < 0) {{ $b = 0; }} if ($b > {HALF}) {{ $b = {HALF}; }}",
        '  printf("N %lu %d %d 0 %rx\\n", $h, $af, $n, buf($p, $a)); @emitted = count();',
        f'  if ($b > 0) {{ printf("N %lu %d %d {HALF} %rx\\n", $h, $af, $n, buf($p + {HALF}, $b)); '
        "@emitted = count(); }",
        "}"]


def _bt_entry(f: Function, files: list[tuple[str, list[Function]]], pred: str, opts: ProbeOptions) -> str:
    """The entry probe: nesting depth, the ``h_errnop`` of any ``_r`` call, and for the outermost call the
    name key (with its N record when new) and @e[tid] = (entry time, name key, result pointer).

    Names are read here, not at return: at return the callee may have changed nothing, but the return
    probe's record already uses much of the 512-byte BPF stack. A name failing the globs leaves no @e.
    """
    points = ", ".join(f"uprobe:{path}:{f.symbol}" for path, funcs in files if f in funcs)
    resp = _bt_arg(f.result_arg) if f.result_arg is not None else "0"
    herr = f"\n  @he[tid] = {_bt_arg(f.herrp_arg)};" if f.herrp_arg is not None else ""
    if f.kind == "rev" and opts.names:
        body = "// name globs are given: reverse lookups are not reported"
    else:
        body = "\n    ".join(["$t = nsecs;", *_bt_name(f, opts), "if ($m) {",
                              *("  " + line for line in _bt_define_name()),
                              f"  @e[tid] = ($t, $h, (uint64){resp});", "}"])
    return (f"{points}{pred}\n{{\n  $d = @d[tid] + 1;\n  @d[tid] = $d;{herr}\n"
            f"  if ($d == 1) {{\n    {body}\n  }}\n}}")


def _bt_result(f: Function) -> str:
    """Statements setting ``$rc`` and ``$herr`` from ``retval`` (see Function.returns)."""
    if f.returns == "int":
        return "$rc = (int32)retval; $herr = 0;"
    read_herr = "$hp = @he[tid]; if ($hp != 0) { $herr = *(int32*)$hp; } else { $herr = -1; }"
    if f.returns == "ptr":
        return f"$herr = 0; $rc = 0; if (retval == 0) {{ $rc = -1; {read_herr} }}"
    return ("$rc = (int32)retval; $herr = 0;\n    "
            f"if ($rc == 0 && $e.2 != 0) {{ if (*(uint64*)$e.2 == 0) {{ {read_herr} }} }}")


def _bt_emit(f: Function, opts: ProbeOptions, comm_offset: int) -> str:
    """The outermost return's output: one E record, or the summary map updates. Comm is two u64 read from
    the task struct (bytes 0-7, 8-15)."""
    comm = (f"$cp = (uint64)curtask + {comm_offset}; $c0 = *(uint64*)kptr($cp); "
            "$c1 = *(uint64*)kptr($cp + 8);")
    if opts.mode == "events":
        return (f"{comm}\n      printf(\"E %lld %d %d %d {f.fid} %d %d %lld %lu %lu %lu\\n\", $e.0, pid, tid, "
                f"uid, $rc, $herr, $lat, $e.1, $c0, $c1);\n      @emitted = count();")
    key = f"pid, uid, {f.fid}, $e.1, $c0, $c1"
    return "\n      ".join([
        comm,
        # log2 bucket of the latency: [2^$k, 2^($k+1)) ns
        "$v = (uint64)$lat; $k = 0;",
        "if ($v >= 4294967296) { $v = $v >> 32; $k = $k + 32; }",
        "if ($v >= 65536) { $v = $v >> 16; $k = $k + 16; }",
        "if ($v >= 256) { $v = $v >> 8; $k = $k + 8; }",
        "if ($v >= 16) { $v = $v >> 4; $k = $k + 4; }",
        "if ($v >= 4) { $v = $v >> 2; $k = $k + 2; }",
        "if ($v >= 2) { $k = $k + 1; }",
        f"@lat[{key}, $k] = count();",
        # bpftrace 0.17's min() drops values ≥ 2^32, so the first time is kept by a plain map write
        f"if (@first[{key}] == 0) {{ @first[{key}] = $e.0; }}",
        f"@last[{key}] = max($e.0);",
        f"if ($rc != 0 || $herr != 0) {{ @fail[{key}, $rc, $herr] = count(); }}",
        # per-minute counts by completion minute, into the map of the minute's parity (see the template)
        "$min = (nsecs + $1) / 60000000000;",
        f"if ($min & 1) {{ @m1[{key}, $min] = count(); }} else {{ @m0[{key}, $min] = count(); }}",
    ])


def _bt_return(f: Function, files: list[tuple[str, list[Function]]], pred: str, opts: ProbeOptions,
               comm_offset: int) -> str:
    points = ", ".join(f"uretprobe:{path}:{f.symbol}" for path, funcs in files if f in funcs)
    return (
        f"{points}{pred}\n{{\n  $d = @d[tid] - 1;\n  if ($d > 0) {{ @d[tid] = $d; }} else {{\n"
        f"    delete(@d[tid]); $e = @e[tid]; delete(@e[tid]);\n"
        f"    if ($e.0 != 0) {{\n      $lat = (int64)(nsecs - $e.0);\n      {_bt_result(f)}\n"
        f"      {_bt_emit(f, opts, comm_offset)}\n    }}\n    delete(@he[tid]);\n  }}\n}}")


# ---------------------------------------------------------------------------------------------- bpftrace wire

#: the send syscalls the wire source reads, by the ``sid`` of a W record (docs/capture-format.md)
WIRE_SYSCALLS: dict[int, str] = {1: "write", 2: "sendto", 3: "sendmsg", 4: "sendmmsg"}
#: messages of one sendmmsg() call looked at (glibc sends two: the A and the AAAA query); each is its own probe
WIRE_MMSG = 4
#: payload bytes reported per query: a DNS header (12) plus the longest question (255 + 4) and then some
WIRE_PAYLOAD = 272
# x86-64 user ABI offsets: struct user_msghdr {name 0, namelen 8, iov 16, iovlen 24, ...} (56 bytes), struct
# mmsghdr {msg_hdr, msg_len} (64 bytes), struct iovec {base 0, len 8}; sockaddr_in(6): family 0, port 2 (network
# order), sin_addr 4, sin6_addr 8
_MSGHDR_NAME, _MSGHDR_IOV, _MMSGHDR_SIZE = 0, 16, 64


def _bt_sockaddr(expr: str) -> str:
    """Statements reading the ``struct sockaddr`` at user address ``expr`` into ``$af`` ``$port`` ``$a0``
    ``$a1`` (the address as little-endian integers: 4 bytes for AF_INET, 8 + 8 for AF_INET6)."""
    return (f"$sa = (uint64)({expr}); $af = (int64)0; $port = (uint64)0; $a0 = (uint64)0; $a1 = (uint64)0;\n"
            "  if ($sa != 0) {\n"
            "    $af = (int64)*(uint16*)uptr($sa);\n"
            "    $port = ((uint64)*(uint8*)uptr($sa + 2) << 8) | (uint64)*(uint8*)uptr($sa + 3);\n"
            "    if ($af == 2) { $a0 = (uint64)*(uint32*)uptr($sa + 4); }\n"
            "    if ($af == 10) { $a0 = *(uint64*)uptr($sa + 8); $a1 = *(uint64*)uptr($sa + 16); }\n"
            "  }")


def _bt_connected() -> str:
    """Statements taking ``$af`` … ``$a1`` from the socket's port-53 connect() (@wc), when it was seen."""
    return ("$w = @wc[pid, $fd]; $af = $w.0; $a0 = $w.1; $a1 = $w.2; $port = (uint64)0;\n"
            "  if ($af != 0) { $port = 53; }")


def _bt_wire_emit(sid: int, comm_offset: int) -> str:
    """Statements printing one query (payload at ``$p``, ``$n`` bytes) sent to UDP port 53: the raw line ``w``
    with the first 128 bytes, then ``v TID OFFSET BYTES`` lines with the rest. A printf of two 128-byte buffers
    does not fit the 512-byte BPF stack, so the runner joins them into one W record
    (:class:`fleet.probes.runner.WireAssembler`); @emitted counts the ``w`` lines."""
    return "\n    ".join([
        # the process's name (its main thread's comm), not the sending thread's: dig sends from "isc-net-0000"
        f"$cp = (uint64)curtask->group_leader + {comm_offset}; $c0 = *(uint64*)kptr($cp); "
        "$c1 = *(uint64*)kptr($cp + 8);",
        f"$x = $n; if ($x > {HALF}) {{ $x = {HALF}; }} if ($x < 0) {{ $x = 0; }}",
        f'printf("w %lld %d %d %d {sid} %d %d %lu %lu %d %d %lu %lu %rx\\n", nsecs, pid, tid, uid, $fd, $af, $a0, '
        "$a1, $port, $n, $c0, $c1, buf(uptr($p), $x)); @emitted = count();",
        f"if ($n > {HALF}) {{ $y = $n - {HALF}; if ($y > {HALF}) {{ $y = {HALF}; }} "
        f'printf("v %d {HALF} %rx\\n", tid, buf(uptr($p + {HALF}), $y)); }}',
        f"if ($n > {2 * HALF}) {{ $z = $n - {2 * HALF}; if ($z > {WIRE_PAYLOAD - 2 * HALF}) "
        f"{{ $z = {WIRE_PAYLOAD - 2 * HALF}; }} "
        f'printf("v %d {2 * HALF} %rx\\n", tid, buf(uptr($p + {2 * HALF}), $z)); }}'])


def _bt_wire(pred: str, comm_offset: int) -> list[str]:
    """The wire source's probes: connect() remembers sockets connected to port 53 (@wc, until close() or
    another connect()), and every send syscall whose destination — its own address, or the connected one — is
    port 53 prints its payload. ``pred`` is the probes' common predicate (cgroup, network namespace)."""
    def when(extra: str) -> str:
        conds = [c for c in (pred, extra) if c]
        return f" /{' && '.join(conds)}/" if conds else ""

    def send(sid: int, where: str, body: str) -> str:
        return (f"tracepoint:syscalls:sys_enter_{WIRE_SYSCALLS[sid]}{where}\n{{\n  $fd = (uint64)args->fd;\n"
                f"  {body}\n  if ($port == 53) {{\n    {_bt_wire_emit(sid, comm_offset)}\n  }}\n}}")

    def own_or_connected(addr: str) -> str:
        return f"{_bt_sockaddr(addr)}\n  if ($sa == 0) {{ {_bt_connected()} }}"

    probes = [
        f"tracepoint:syscalls:sys_enter_connect{when('')}\n{{\n"
        f"  $fd = (uint64)args->fd;\n  {_bt_sockaddr('args->uservaddr')}\n"
        "  if (($af == 2 || $af == 10) && $port == 53) { @wc[pid, $fd] = ($af, $a0, $a1); }\n"
        "  else { delete(@wc[pid, $fd]); }\n}",
        # only sockets that were connected to port 53 cost a map update here
        "tracepoint:syscalls:sys_enter_close /@wc[pid, (uint64)args->fd].0 != 0/\n{\n"
        "  delete(@wc[pid, (uint64)args->fd]);\n}",
        send(1, when("@wc[pid, (uint64)args->fd].0 != 0"),
             f"{_bt_connected()}\n  $p = (uint64)args->buf; $n = (int64)args->count;"),
        send(2, when(""), f"{own_or_connected('args->addr')}\n  $p = (uint64)args->buff; $n = (int64)args->len;"),
        send(3, when(""), f"$m = (uint64)args->msg;\n  {own_or_connected(f'*(uint64*)uptr($m + {_MSGHDR_NAME})')}\n"
                          f"  $iov = *(uint64*)uptr($m + {_MSGHDR_IOV}); $p = *(uint64*)uptr($iov); "
                          "$n = (int64)*(uint64*)uptr($iov + 8);"),
    ]
    for k in range(WIRE_MMSG):
        probes.append(send(4, when(f"args->vlen > {k}"),
                           f"$m = (uint64)args->mmsg + {k * _MMSGHDR_SIZE};\n"
                           f"  {own_or_connected(f'*(uint64*)uptr($m + {_MSGHDR_NAME})')}\n"
                           f"  $iov = *(uint64*)uptr($m + {_MSGHDR_IOV}); $p = *(uint64*)uptr($iov); "
                           "$n = (int64)*(uint64*)uptr($iov + 8);"))
    return probes


def _render_bpftrace(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    cgroup = f'cgroup == cgroupid("{opts.cgroup}")' if opts.cgroup else ""
    pred = f" /{cgroup}/" if cgroup else ""
    comm_offset = task_comm_offset()
    hooked = sorted({f.fid for _p, funcs in files for f in funcs}) if "libc" in opts.sources else []
    probes = []
    for f in FUNCTIONS:
        if f.fid in hooked:
            probes.append(_bt_entry(f, files, pred, opts))
            probes.append(_bt_return(f, files, pred, opts, comm_offset))
    end_clear = ""
    if "wire" in opts.sources:
        netns = f"curtask->nsproxy->net_ns->ns.inum == {opts.wire_netns}" if opts.wire_netns is not None else ""
        probes += _bt_wire(" && ".join(c for c in (cgroup, netns) if c), comm_offset)
        end_clear = " clear(@wc);"
    if opts.mode == "summary":
        mode_blocks = (_template("summary.bt.tmpl").replace("{{INTERVAL}}", str(opts.interval))
                       .replace("clear(@he);", "clear(@he);" + end_clear))
        begin = "\n  @cur = (nsecs + $1) / 60000000000;\n  @tick = 0;"
    else:
        mode_blocks = ("END\n{\n  print(@emitted);\n  clear(@emitted); clear(@nd); clear(@d); clear(@e); clear(@he);"
                       f"{end_clear}\n}}")
        begin = ""
    return (_template("dnsprobe.bt.tmpl")
            .replace("{{FILES}}", ", ".join(p for p, _f in files) if hooked else "none (libc source off)")
            .replace("{{WIRE}}", _wire_text(opts))
            .replace("{{MODE}}", opts.mode)
            .replace("{{BEGIN}}", begin)
            .replace("{{FILTERS}}", _filters_text(opts))
            .replace("{{PROBES}}", "\n\n".join(probes))
            .replace("{{MODE_BLOCKS}}", mode_blocks))


def _wire_text(opts: ProbeOptions) -> str:
    if "wire" not in opts.sources:
        return "off"
    scope = f"network namespace {opts.wire_netns} only" if opts.wire_netns is not None else "every network namespace"
    return f"{', '.join(WIRE_SYSCALLS.values())} to UDP port 53 (and connect, close); {scope}"


# ---------------------------------------------------------------------------------------------- common

def _filters_text(opts: ProbeOptions) -> str:
    parts = []
    if opts.names:
        parts.append("names " + " ".join(opts.names))
    if opts.cgroup:
        parts.append(f"cgroup {opts.cgroup}")
    return "; ".join(parts) or "none"


def _template(name: str) -> str:
    return resources.files("fleet.probes").joinpath(name).read_text(encoding="utf-8")


def render(opts: ProbeOptions) -> str:
    """The probe script text for ``opts`` (bpftrace or stap language). Validates ``opts`` first."""
    files = _check(opts)
    if opts.backend == "bpftrace":
        return _render_bpftrace(opts, files)
    return _render_stap(opts, files)


def backend_env(opts: ProbeOptions) -> dict[str, str]:
    """Environment variables the backend needs for a script rendered from ``opts`` (added to os.environ)."""
    if opts.backend == "bpftrace":
        return {
            "BPFTRACE_STRLEN": str(HALF),            # buf() reads at most this many bytes
            "BPFTRACE_MAP_KEYS_MAX": str(opts.max_keys),
            "BPFTRACE_PERF_RB_PAGES": "1024",        # 4 MiB per CPU: absorbs bursts in events mode
            "BPFTRACE_NO_CPP_DEMANGLE": "1",
        }
    return {}


# ---------------------------------------------------------------------------------------------- stap

#: stap's bpf runtime reads a name as aligned 8-byte words, at most this many of them (no loops; each read is
#: one unrolled step): they cover at least the name's first STAP_BPF_NAME_MAX bytes.
STAP_BPF_WORDS = 9
#: Longest name the bpf runtime reports byte-exactly is one byte less; a name of this many bytes or more is
#: reported as its first STAP_BPF_NAME_MAX bytes with length NAME_MAX (truncated). The capture header says
#: ``name_max`` so the reader knows that such a name is complete as far as it goes.
STAP_BPF_NAME_MAX = 64
#: Stage handlers of the bpf runtime's return probe read this many words each (its register allocator runs out
#: of the 512-byte BPF stack at about ten values in one handler).
_STAP_BPF_STAGE_WORDS = (3, 3, 3)
_FNV_OFFSET_SIGNED = _FNV_OFFSET - 2**64  # stap literals are signed 64-bit


def stap_runtime(environ: dict[str, str] | None = None, build: str | None = None) -> str:
    """Which stap runtime to use here: ``FLEETDNS_STAP_RUNTIME`` (module|bpf) if set; else ``bpf`` when the
    kernel build tree (default ``/lib/modules/$(uname -r)/build``) has no Makefile (no kernel headers to build
    a module with: the lab's stub), else ``module``."""
    environ = os.environ if environ is None else environ
    if environ.get("FLEETDNS_STAP_RUNTIME"):
        return environ["FLEETDNS_STAP_RUNTIME"]
    build = build or os.path.join("/lib/modules", os.uname().release, "build")
    return "module" if os.path.exists(os.path.join(build, "Makefile")) else "bpf"


def _stp_points(f: Function, files: list[tuple[str, list[Function]]], suffix: str = "") -> str:
    return ", ".join(f'process("{path}").function("{f.dwarf}"){suffix}' for path, funcs in files if f in funcs)


def _stp_arg(f: Function, n: int) -> str:
    return "$" + f.params[n]


#: Entry: the nesting depth of this thread's resolver calls. A thread that died inside a lookup leaves its depth
#: behind; the pid stored with it (``dp``) keeps a thread of another process that reuses the tid from inheriting it.
_STP_DEPTH = ("t = tid(); dd = d[t] + 1; if (dd > 1 && dp[t] != pid()) { dd = 1 }; d[t] = dd; "
              "if (dd == 1) { dp[t] = pid() }")


def _stp_glob(globs: tuple[str, ...]) -> list[str]:
    """Module runtime: statements setting ``m`` to 1 when the name at ``p`` (length ``n``) matches a glob."""
    if not globs:
        return ["m = 1"]

    def byte(offset: str) -> str:
        return f"c = user_char(p + {offset}) & 255; if (c >= 65 && c <= 90) c += 32"

    out = ["m = 0"]
    for glob in globs:
        length, exact, checks = glob_checks(glob)
        body = ["g = 1"] + [f"{byte(f'n - {index}' if from_end else str(index))}; if (c != {ch}) g = 0"
                            for index, from_end, ch in checks]
        out.append(f"if (m == 0 && n {'==' if exact else '>='} {length}) {{ " + "; ".join(body) + "; if (g) m = 1 }")
    return out


def _stp_name(f: Function, opts: ProbeOptions) -> list[str]:
    """Module runtime: statements setting ``p``, ``n`` (NAME_MAX = truncated, -1 = NULL), ``af``, ``h`` (the
    name key, as in :func:`_bt_name`) and ``m`` (passes the globs)."""
    if f.kind == "fwd":
        return [f"p = {_stp_arg(f, 0)}; af = 0; n = 0; h = {_FNV_OFFSET_SIGNED}",
                f"if (p == 0) {{ n = -1; h = 1 }} else while (n < {NAME_MAX}) {{",
                f"  c = user_char(p + n) & 255; if (c == 0) break; h = (h ^ c) * {_FNV_PRIME}; n++",
                "}", *_stp_glob(opts.names)]
    if f.symbol == "getnameinfo":
        lines = ["af = $sa->sa_family; p = $sa + 4; n = 4",
                 "if (af == 10) { p = $sa + 8; n = 16 } else if (af != 2) n = 0"]
    else:
        lines = ["af = $type; n = $len; p = $addr; if (n > 16) n = 16"]
    return lines + [f"h = ({_FNV_OFFSET_SIGNED} ^ af) * {_FNV_PRIME}",
                    "if (p == 0) { n = -1; h = 1 }",
                    f"for (i = 0; i < n; i++) h = (h ^ (user_char(p + i) & 255)) * {_FNV_PRIME}",
                    "m = 1"]


def _stp_define_name() -> list[str]:
    """Module runtime: print the N record(s) of a name key not yet seen (``nd`` remembers them)."""
    def half(offset: int) -> str:
        return (f'printf("N %d %d %d {offset} ", h, af, n); '
                f'for (i = {offset}; i < {offset} + k; i++) printf("\\\\x%02x", user_char(p + i) & 255); '
                'printf("\\n"); emitted <<< 1')
    return ["if (!(h in nd)) {",
            f"  nd[h] = 1; k = n; if (k > {HALF}) k = {HALF}; if (k < 0) k = 0",
            f"  {half(0)}",
            f"  if (n > {HALF}) {{ k = n - {HALF}; if (k > {HALF}) k = {HALF}; {half(HALF)} }}",
            "}"]


def _stp_entry(f: Function, files: list[tuple[str, list[Function]]], opts: ProbeOptions) -> str:
    """Module runtime entry probe: nesting depth (``d``), the innermost ``_r`` call's ``h_errnop`` (``he``), and
    for the outermost call the name key (N record when new) and entry time / key / result pointer by tid."""
    herr = f"\n  he[t] = {_stp_arg(f, f.herrp_arg)}" if f.herrp_arg is not None else ""
    resp = _stp_arg(f, f.result_arg) if f.result_arg is not None else "0"
    if f.kind == "rev" and opts.names:
        body = ["// name globs are given: reverse lookups are not reported"]
    else:
        body = ["now = ktime_get_ns() + $1", *_stp_name(f, opts), "if (m) {",
                *("  " + line for line in _stp_define_name()), f"  t0[t] = now; nk[t] = h; rp[t] = {resp}", "}"]
    inner = "\n    ".join(body)
    return (f"probe {_stp_points(f, files)}\n{{\n  {_STP_DEPTH}{herr}\n  if (dd == 1) {{\n    {inner}\n  }}\n}}")


def _stp_result(f: Function, hp: str, rp: str) -> str:
    """Statements setting ``rc`` and ``herr`` from ``$return`` (see Function.returns); ``hp`` / ``rp`` are the
    saved h_errnop / result pointer (both runtimes)."""
    read_herr = f"if ({hp} != 0) herr = user_int({hp}) else herr = -1"
    if f.returns == "int":
        return "rc = $return; herr = 0"
    if f.returns == "ptr":
        return f"herr = 0; rc = 0; if ($return == 0) {{ rc = -1; {read_herr} }}"
    return f"rc = $return; herr = 0; if (rc == 0 && {rp} != 0) {{ if (user_long({rp}) == 0) {{ {read_herr} }} }}"


def _stp_emit(f: Function, opts: ProbeOptions) -> list[str]:
    """Module runtime: the outermost return's output, one E record or the summary array updates."""
    comm = ["s = execname(); c0 = 0; c1 = 0",
            "for (i = 0; i < 16 && i < strlen(s); i++) {",
            "  c = stringat(s, i) & 255; if (i < 8) c0 |= c << (8 * i) else c1 |= c << (8 * (i - 8))",
            "}"]
    if opts.mode == "events":
        return comm + [f'printf("E %d %d %d %d {f.fid} %d %d %d %d %d %d\\n", e0, pid(), t, uid(), rc, herr, '
                       "lat, h, c0, c1)", "emitted <<< 1"]
    key = f"kp, ku, {f.fid}, h, c0, c1"
    return comm + [
        "kp = pid(); ku = uid()",
        # a key beyond max_keys is not counted (as in bpftrace): every array is bounded, and stap stops the
        # whole script when an array overflows
        f"if (!([{key}] in first)) {{ if (nkeys >= {opts.max_keys}) next; nkeys++; first[{key}] = e0 }}",
        f"if (e0 > last[{key}]) last[{key}] = e0",
        # log2 bucket of the latency: [2^b, 2^(b+1)) ns
        "v = lat; b = 0",
        "if (v >= 4294967296) { v >>= 32; b += 32 }", "if (v >= 65536) { v >>= 16; b += 16 }",
        "if (v >= 256) { v >>= 8; b += 8 }", "if (v >= 16) { v >>= 4; b += 4 }",
        "if (v >= 4) { v >>= 2; b += 2 }", "if (v >= 2) b += 1",
        f"if ([{key}, b] in lat_h || nlat < {opts.max_keys * 4}) {{ if (!([{key}, b] in lat_h)) nlat++; "
        f"lat_h[{key}, b]++ }}",
        f"if ((rc != 0 || herr != 0) && ([{key}, rc, herr] in fail || nfail < {opts.max_keys})) "
        f"{{ if (!([{key}, rc, herr] in fail)) nfail++; fail[{key}, rc, herr]++ }}",
        # per-minute counts by completion minute, into the array of the minute's parity (see the dump)
        "mn = gettimeofday_ns() / 60000000000",
        f"if (mn & 1) {{ if ([{key}, mn] in m1 || n1 < {opts.max_keys}) {{ if (!([{key}, mn] in m1)) n1++; "
        f"m1[{key}, mn]++ }} }}",
        f"else {{ if ([{key}, mn] in m0 || n0 < {opts.max_keys}) {{ if (!([{key}, mn] in m0)) n0++; "
        f"m0[{key}, mn]++ }} }}",
    ]


def _stp_return(f: Function, files: list[tuple[str, list[Function]]], opts: ProbeOptions) -> str:
    body = "\n      ".join([_stp_result(f, "he[t]", "rp[t]"), *_stp_emit(f, opts)])
    return (f"probe {_stp_points(f, files, '.return')}\n{{\n  now = ktime_get_ns() + $1; t = tid(); "
            f"dd = d[t] - 1\n  if (dd > 0) d[t] = dd else {{\n    delete d[t]\n    if (t in t0) {{\n"
            f"      e0 = t0[t]; h = nk[t]; delete t0[t]; delete nk[t]\n"
            f"      lat = now - e0\n      {body}\n    }}\n    delete he[t]; delete rp[t]\n  }}\n}}")


def _stp_summary_dump(arrays: list[tuple[str, str, int]], when: str) -> str:
    """Statements printing ``S <when>``, then each (array, record type, extra indexes) as records, then ``Y``."""
    out = [f'printf("S %d {when}\\n", ktime_get_ns() + $1)']
    for array, record, extra in arrays:
        idx = ", ".join(f"k{i}" for i in range(6 + extra))
        fmt = " ".join(["%d"] * (7 + extra))
        out.append(f'foreach ([{idx}] in {array}) printf("{record} {fmt}\\n", {idx}, {array}[{idx}])')
    out.append('printf("Y %d\\n", ktime_get_ns() + $1)')
    return "\n    ".join(out)


def _render_stap_module(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    hooked = [f for f in FUNCTIONS if any(f in funcs for _p, funcs in files)]
    probes = [p for f in hooked for p in (_stp_entry(f, files, opts), _stp_return(f, files, opts))]
    per_tid = "global d%[16384], dp%[16384], t0%[16384], nk%[16384], rp%[16384], he%[16384]"
    if opts.mode == "events":
        globals_ = f"{per_tid}\nglobal nd%[{opts.max_keys}], emitted"
        blocks = 'probe end\n{\n  printf("@emitted: %d\\n", @count(emitted))\n}'
    else:
        k = opts.max_keys
        globals_ = (f"{per_tid}\nglobal nd%[{k}], emitted, first[{k}], last[{k}], lat_h[{k * 4}], fail[{k}], "
                    f"m0[{k}], m1[{k}], nkeys, nlat, nfail, n0, n1, cur, tick")
        totals = [("lat_h", "X", 1), ("first", "A", 0), ("last", "Z", 0), ("fail", "F", 2)]
        blocks = _template("summary.stp.tmpl").replace("{{INTERVAL}}", str(opts.interval)).replace(
            "{{DUMP_M0}}", _stp_summary_dump([("m0", "M", 1)], "minute")).replace(
            "{{DUMP_M1}}", _stp_summary_dump([("m1", "M", 1)], "minute")).replace(
            "{{DUMP_TOTALS}}", _stp_summary_dump(totals, "totals")).replace(
            "{{DUMP_END}}", _stp_summary_dump(totals + [("m0", "M", 1), ("m1", "M", 1)], "end"))
    return "\n\n".join([globals_, _STP_ATTACHED, *probes, _STP_THREAD_END, blocks]) + "\n"


#: Module runtime: a thread that dies inside a lookup leaves no state behind (as bpftrace's sched_process_exit;
#: the bpf runtime ignores utrace probes and has no tracepoints without kernel headers, see _STP_DEPTH).
_STP_THREAD_END = """probe process.thread.end
{
  t = tid(); delete d[t]; delete dp[t]; delete t0[t]; delete nk[t]; delete rp[t]; delete he[t]
}"""


#: Both runtimes print B from the first timer tick: by then the uprobes are enabled (stapbpf enables them only
#: after the begin probe), and stapbpf needs some probe to run after SIGINT to notice its exit flag.
_STP_ATTACHED = """global started
probe timer.ms(100)
{
  if (!started) { started = 1; printf("B %ld\\n", ktime_get_ns() + $1) }
}"""


# -- stap's bpf runtime: events only; raw lines that the runner assembles (StapBpfAssembler in runner.py)

def _stb_haszero() -> str:
    """bpf runtime: statements setting ``z`` non-zero when the word ``w`` has a zero byte. The 64-bit
    constants are computed: stap 4.8's bpf code generator miscompiles 64-bit immediates in arithmetic."""
    return "k = 16843009; z = k << 32; k = k | z; z = w - k; z = z & ~w; k = k << 7; z = z & k"


def _stb_stages(f: Function, comm_offset: int) -> list[list[str]]:
    """bpf runtime return-probe bodies, in the order they must run. The first decides whether this return ends
    the outermost call (``out[t]``) and prints the ``a`` line and the first name words; the middle ones print
    more name words while the name goes on (``more[t]``, last word in ``lw[t]``); the last prints ``r``."""
    first = ["t = tid(); dd = d[t] - 1",
             "if (dd > 0) { d[t] = dd } else {",
             "  delete d[t]",
             "  if (!(t in t0)) { delete he[t] } else {",
             "    out[t] = 1; e0 = t0[t]; p = np[t]; lat = ktime_get_ns() + $1; lat = lat - e0",
             "    af = naf[t]; n = nn[t]; o = p & 7; a = p - o; if (p == 0) { n = -1 }",
             f'    printf("a %ld {f.fid} %ld %ld %ld %ld %ld\\n", t, af, n, o, e0, lat)']
    if f.kind == "rev":
        # the address (at most 16 bytes): the aligned words that hold its bytes, at most 3
        first += ["    e = o + n",
                  *(f'    if (e > {8 * i}) {{ w = user_long(a + {8 * i}); printf("w %ld {i} %ld\\n", t, w) }}'
                    for i in range(3)),
                  "  }", "}"]
        return [first, _stb_last(f, comm_offset)]
    first += ["    if (p != 0) {",
              '      w = user_long(a); printf("w %ld 0 %ld\\n", t, w)',
              # the bytes before the name are not its end: make them non-zero
              "      m = o * 8; m = 1 << m; m = m - 1; w = w | m"]
    stages, index = [first], 1
    for n, count in enumerate(_STAP_BPF_STAGE_WORDS):
        ind = "      " if n == 0 else "  "
        lines = [] if n == 0 else ["t = tid()", "if (out[t] && more[t]) {", "  a = np[t]; a = a & -8; w = lw[t]"]
        for i in range(index, min(index + count, STAP_BPF_WORDS)):
            # read the next aligned word only while no zero byte has ended the name: an aligned word never
            # crosses a page, so nothing is read from a page the name does not reach
            lines += [f"{ind}{_stb_haszero()}",
                      f'{ind}if (z == 0) {{ w = user_long(a + {8 * i}); printf("w %ld {i} %ld\\n", t, w) }}']
        index += count
        lines += [f"{ind}{_stb_haszero()}", f"{ind}more[t] = z == 0; lw[t] = w"]
        if n == 0:
            stages[0] = first + lines + ["    }", "  }", "}"]
        else:
            stages.append(lines + ["}"])
    return stages + [_stb_last(f, comm_offset)]


def _stb_last(f: Function, comm_offset: int) -> list[str]:
    """bpf runtime: the last stage prints the ``r`` line (result, pid, uid, comm) and forgets the thread."""
    return ["t = tid()", "if (out[t]) {",
            f"  {_stp_result(f, 'he[t]', 'rp[t]')}",
            f"  ts = fleetdns_task(); c0 = user_long(ts + {comm_offset}); c1 = user_long(ts + {comm_offset + 8})",
            '  printf("r %ld %ld %ld %ld %ld %ld %ld\\n", t, pid(), uid(), rc, herr, c0, c1)',
            "  delete out[t]; delete more[t]; delete lw[t]; delete t0[t]; delete np[t]; delete rp[t]; "
            "delete he[t]; delete naf[t]; delete nn[t]",
            "}"]


def _stb_entry(f: Function, files: list[tuple[str, list[Function]]]) -> str:
    """bpf runtime entry probe: depth, the innermost ``h_errnop``, and for the outermost call the entry time
    and the pointers the return probe reads (the name is read at return: the caller's buffer is still there)."""
    lines = ["now = ktime_get_ns() + $1", _STP_DEPTH]
    if f.herrp_arg is not None:
        lines.append(f"he[t] = {_stp_arg(f, f.herrp_arg)}")
    save = [f"t0[t] = now; rp[t] = {_stp_arg(f, f.result_arg) if f.result_arg is not None else 0}"]
    if f.kind == "fwd":
        save.append(f"np[t] = {_stp_arg(f, 0)}; naf[t] = 0; nn[t] = -2")
    elif f.symbol == "getnameinfo":
        # sa_family is the first u16 (an unaligned read stays inside the sockaddr's 16 bytes)
        save += ["s = $sa; af = user_long(s); af = af & 65535; naf[t] = af",
                 "if (af == 10) { np[t] = s + 8; nn[t] = 16 } "
                 "else { np[t] = s + 4; if (af == 2) { nn[t] = 4 } else { nn[t] = 0 } }"]
    else:
        # the length follows from the family: stap 4.8's bpf code generator miscompiles reads of unsigned
        # 32-bit DWARF values such as $len (socklen_t)
        save += ["af = $type; naf[t] = af; np[t] = $addr",
                 "if (af == 10) { nn[t] = 16 } else { if (af == 2) { nn[t] = 4 } else { nn[t] = 0 } }"]
    lines.append("if (dd == 1) { " + "; ".join(save) + " }")
    return f"probe {_stp_points(f, files)}\n{{\n  " + "\n  ".join(lines) + "\n}"


def _render_stap_bpf(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    comm_offset = task_comm_offset()
    hooked = [f for f in FUNCTIONS if any(f in funcs for _p, funcs in files)]
    probes = []
    for f in hooked:
        probes.append(_stb_entry(f, files))
        # stapbpf runs the handlers of one probe point last-registered first: print them in reverse
        for stage in reversed(_stb_stages(f, comm_offset)):
            body = "\n  ".join(stage)
            probes.append(f"probe {_stp_points(f, files, '.return')}\n{{\n  {body}\n}}")
    globals_ = ("global d%[16384], dp%[16384], he%[16384], t0%[16384], np%[16384], rp%[16384], naf%[16384], "
                "nn%[16384], out%[16384], more%[16384], lw%[16384]")
    task = ("// the current task_struct (the tapset's task_current() needs kernel debuginfo; this needs -g)\n"
            "function fleetdns_task:long () %{ /* bpf */ /* pure */\n  call, $$, get_current_task;\n%}")
    return "\n\n".join([task, globals_, _STP_ATTACHED, *probes]) + "\n"


def _render_stap(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    runtime = opts.resolved_stap_runtime()
    body = _render_stap_module(opts, files) if runtime == "module" else _render_stap_bpf(opts, files)
    return (_template("dnsprobe.stp.tmpl")
            .replace("{{FILES}}", ", ".join(p for p, _f in files))
            .replace("{{MODE}}", opts.mode)
            .replace("{{RUNTIME}}", runtime)
            .replace("{{FILTERS}}", _filters_text(opts))
            .replace("{{BODY}}", body))


def stap_arguments(opts: ProbeOptions) -> list[str]:
    """stap's options for a script rendered from ``opts`` (before the script path; the script's $1, the
    CLOCK_BOOTTIME − CLOCK_MONOTONIC offset in ns, goes after it)."""
    if opts.resolved_stap_runtime() == "bpf":
        # -g for fleetdns_task(); -r RELEASE finds the build tree with the System.map that return probes need
        return ["-g", "--runtime=bpf", "-r", os.uname().release]
    # the name loops (256 bytes, read, hashed, printed) need more statements than the default 1000 a probe;
    # a summary dump prints every key in one timer probe
    return [f"-DMAXACTION={max(20_000, opts.max_keys * 64)}", "-DMAXSKIPPED=1000000"]
