"""Render the DNS probe script for one backend from :class:`ProbeOptions`.

The hooked functions are described once, in :data:`FUNCTIONS` (symbol, DWARF name, where the name / address,
the result pointer and the ``h_errno`` pointer live); the probe bodies are generated from that table into
the template ``dnsprobe.bt.tmpl`` (+ ``summary.bt.tmpl``; placeholders are ``{{NAME}}``, because ``$``,
``%`` and ``@`` already mean something in the probe languages). The stap backend is not rendered yet
(:func:`render` raises UsageError for it); its DWARF names are in the table for when it is.

API::

    opts = ProbeOptions(backend="bpftrace", mode="events", libc="/lib/x86_64-linux-gnu/libc.so.6",
                        binaries=(), names=("*.corp.example",), cgroup=None)
    script: str = render(opts)            # raises UsageError / InputError on bad options
    env: dict[str, str] = backend_env(opts)   # environment the backend needs for this script
    find_libc() -> str                    # this machine's libc (the one /bin/sh maps)
    elf_info(path) -> ElfInfo(build_id, symbols)

What the rendered script prints is the record layer of ``docs/capture-format.md``: ``N`` name definitions,
then ``E`` records (events mode) or map dumps between ``S``/``Y`` markers (summary mode). The runner adds the
header, turns bpftrace's map dumps into records and adds the trailer.

Stdlib only: this module runs on fleet hosts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import struct
from importlib import resources
from typing import Iterable

from fleet.errors import EnvironmentProblem, InputError, UsageError

BACKENDS = ("bpftrace", "stap")
MODES = ("events", "summary")

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
    positions ≥ 6 are on the stack (x86-64 SysV).
    """

    fid: int
    symbol: str
    dwarf: str
    kind: str
    returns: str
    result_arg: int | None = None
    herrp_arg: int | None = None


#: Function ids are part of the capture format (docs/capture-format.md); never renumber.
FUNCTIONS: tuple[Function, ...] = (
    Function(1, "getaddrinfo", "getaddrinfo", "fwd", "int"),
    Function(2, "gethostbyname", "gethostbyname", "fwd", "ptr"),
    Function(3, "gethostbyname2", "gethostbyname2", "fwd", "ptr"),
    Function(4, "gethostbyname_r", "__gethostbyname_r", "fwd", "r", result_arg=4, herrp_arg=5),
    Function(5, "gethostbyname2_r", "__gethostbyname2_r", "fwd", "r", result_arg=5, herrp_arg=6),
    Function(6, "gethostbyaddr", "gethostbyaddr", "rev", "ptr"),
    Function(7, "gethostbyaddr_r", "__gethostbyaddr_r", "rev", "r", result_arg=6, herrp_arg=7),
    Function(8, "getnameinfo", "getnameinfo", "rev", "int"),
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
    """

    backend: str = "bpftrace"
    mode: str = "events"
    libc: str | None = None
    binaries: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    cgroup: str | None = None
    interval: int = 60
    max_keys: int = 65536

    def resolved_libc(self) -> str:
        return self.libc or find_libc()


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


def glob_parts(glob: str) -> tuple[bytes, bytes | None]:
    """Split a glob into (prefix, suffix); suffix is None when the glob has no ``*`` (exact length match)."""
    raw = glob.lower().encode()
    if b"*" not in raw:
        return raw, None
    pre, suf = raw.split(b"*")
    return pre, suf


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
        pre, suf = glob_parts(glob)
        fixed = len(pre) + len(suf or b"")
        cond = f"$n == {fixed}" if suf is None else f"$n >= {fixed}"
        body = ["$g = 1;"]
        for i, ch in enumerate(pre):
            if ch != ord("?"):
                body.append(f"{_bt_byte(str(i))} if ($l != {ch}) {{ $g = 0; }}")
        for i, ch in enumerate(suf or b""):
            if ch != ord("?"):
                body.append(f"{_bt_byte(f'(uint64)($n - {len(suf) - i})')} if ($l != {ch}) {{ $g = 0; }}")
        body.append("if ($g) { $m = 1; }")
        out.append(f"if ($m == 0 && {cond}) {{ " + " ".join(body) + " }")
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


def _render_bpftrace(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    pred = f' /cgroup == cgroupid("{opts.cgroup}")/' if opts.cgroup else ""
    comm_offset = task_comm_offset()
    hooked = sorted({f.fid for _p, funcs in files for f in funcs})
    probes = []
    for f in FUNCTIONS:
        if f.fid in hooked:
            probes.append(_bt_entry(f, files, pred, opts))
            probes.append(_bt_return(f, files, pred, opts, comm_offset))
    if opts.mode == "summary":
        mode_blocks = _template("summary.bt.tmpl").replace("{{INTERVAL}}", str(opts.interval))
        begin = "\n  @cur = (nsecs + $1) / 60000000000;\n  @tick = 0;"
    else:
        mode_blocks = "END\n{\n  print(@emitted);\n  clear(@emitted); clear(@nd); clear(@d); clear(@e); clear(@he);\n}"
        begin = ""
    return (_template("dnsprobe.bt.tmpl")
            .replace("{{FILES}}", ", ".join(p for p, _f in files))
            .replace("{{MODE}}", opts.mode)
            .replace("{{BEGIN}}", begin)
            .replace("{{FILTERS}}", _filters_text(opts))
            .replace("{{PROBES}}", "\n\n".join(probes))
            .replace("{{MODE_BLOCKS}}", mode_blocks))


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


def _render_stap(opts: ProbeOptions, files: list[tuple[str, list[Function]]]) -> str:
    raise UsageError("the stap backend is not implemented yet", hint="use --backend bpftrace")
