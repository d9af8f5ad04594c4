"""The host scan (fleet/hostscan.py): its pure parsers on literal text and synthetic ELF files, then real processes
on this machine — a static C program, a musl one, a Go one, a libc copied aside, a TCP connection — scanned for
real. Nothing here resolves a name through DNS: watched names are answered from /etc/hosts or never reach libc."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet import gather, hostrun, hostscan, store
from fleet.errors import ExitCode
from fleet.hostscan import ElfFacts, Mapping
from tests.conftest import fleetdns
from tests.unit.test_cli import assert_one_line_error

# ---------------------------------------------------------------------------------------------- /proc parsers


def test_parse_stat_finds_the_fields_after_a_comm_with_spaces_and_parentheses():
    st = hostscan.parse_stat(b"4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0\n")
    assert st == hostscan.ProcStat(b"my (odd) prog", b"S", 4194560)
    kthread = hostscan.parse_stat(b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0")
    assert kthread.flags & hostscan.PF_KTHREAD
    assert hostscan.parse_stat(b"") is None and hostscan.parse_stat(b"12 (x) S 1 2") is None
    assert hostscan.parse_stat(b"12 (x) S 1 2 3 4 5 notanumber") is None


MAPS = b"""\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 393320                     /usr/bin/sleep
55d0c0a02000-55d0c0a06000 r-xp 00002000 fe:00 393320                     /usr/bin/sleep
55d0c1f3e000-55d0c1f5f000 rw-p 00000000 00:00 0                          [heap]
7f1869d0b000-7f1869d31000 r--p 00000000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1869d31000-7f1869e87000 r-xp 00026000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1869f00000-7f1869f01000 r--p 00000000 103:0a 17                        /opt/my app/lib/libc-2.17.so (deleted)
7f1869f02000-7f1869f03000 rw-p 00000000 00:00 0
7ffd5b3f0000-7ffd5b3f2000 r-xp 00000000 00:00 0                          [vdso]
garbage line
7ffd5b3f0000-7ffd5b3f2000 r-xp 00000000 zz:00 5                          /bad/dev
"""


def test_parse_maps_keeps_distinct_files_with_their_device_and_inode():
    maps = hostscan.parse_maps(MAPS)
    assert maps == [
        Mapping(os.makedev(0xFE, 0), 393320, b"/usr/bin/sleep", False),
        Mapping(os.makedev(0xFE, 0), 339380, b"/usr/lib/x86_64-linux-gnu/libc.so.6", False),
        Mapping(os.makedev(0x103, 0x0A), 17, b"/opt/my app/lib/libc-2.17.so", True),
    ]


TCP = b"""\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1091 1 0 100 0 0 10 0
   1: 0B00D50A:9C40 0500D50A:1538 01 00000000:00000000 02:000AFC3A 00000000  1000        0 52211 2 0 20 4 30 10 -1
   2: 0100007F:9C41 0100007F:0035 06 00000000:00000000 03:00000F81 00000000     0        0 0 3 0
   3: nonsense
   4: 0100007F:ZZZZ 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 77 1 0
"""
TCP6 = b"""\
  sl  local_address                         remote_address                        st tx_queue rx_queue ... inode
   0: 00000000000000000000000001000000:0035 00000000000000000000000001000000:D431 01 0:0 0:0 0 0 0 9001 1 0
   1: 0000000000000000FFFF00000B00D50A:9C42 0000000000000000FFFF00000500D50A:1538 01 0:0 0:0 0 0 0 9002 1 0
   2: B80D0120000000000000000001000000:01BB B80D0120000000000000000002000000:C350 01 0:0 0:0 0 0 0 9003 1 0
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the literal tables were printed by a little-endian kernel")
def test_parse_tcp_keeps_established_sockets_and_decodes_addresses_word_by_word():
    assert hostscan.parse_tcp(TCP) == [hostscan.TcpSocket(("10.213.0.11", 40000), ("10.213.0.5", 5432), 52211)]
    assert hostscan.parse_tcp(TCP6) == [
        hostscan.TcpSocket(("::1", 53), ("::1", 54321), 9001),
        # an AF_INET6 socket talking IPv4: shown as the IPv4 address, as getaddrinfo() gives it for a name
        hostscan.TcpSocket(("10.213.0.11", 40002), ("10.213.0.5", 5432), 9002),
        hostscan.TcpSocket(("2001:db8::1", 443), ("2001:db8::2", 50000), 9003),
    ]
    assert hostscan.parse_tcp(b"") == [] and hostscan.parse_tcp(b"heading only\n") == []
    assert hostscan.endpoint_text("::1", 53) == "[::1]:53" and hostscan.endpoint_text("10.0.0.1", 22) == "10.0.0.1:22"


def test_socket_inode():
    assert hostscan.socket_inode(b"socket:[52211]") == 52211
    assert hostscan.socket_inode(b"pipe:[52211]") is None
    assert hostscan.socket_inode(b"/dev/null") is None and hostscan.socket_inode(b"socket:[x]") is None


# ---------------------------------------------------------------------------------------------- ELF


def elf(*, bits: int = 64, order: str = "<", interp: bytes | None = None, notes: list[tuple[bytes, int]] = (),
        sections: list[bytes] = ()) -> bytes:
    """A minimal ELF image: header, program headers (PT_INTERP, PT_NOTE), data, section headers and names."""
    wide = bits == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if wide else (52, 32, 40)
    blobs: list[tuple[int, bytes]] = []  # (p_type, data)
    if interp is not None:
        blobs.append((hostscan.PT_INTERP, interp + b"\0"))
    if notes:
        data = b""
        for owner, ntype in notes:
            name = owner + b"\0"
            data += struct.pack(order + "III", len(name), 4, ntype) + name.ljust((len(name) + 3) & ~3, b"\0")
            data += b"desc"
        blobs.append((hostscan.PT_NOTE, data))
    phoff = ehsize
    pos = phoff + phentsize * len(blobs)
    phdrs, body = b"", b""
    for p_type, data in blobs:
        if wide:
            phdrs += struct.pack(order + "IIQQQQQQ", p_type, 4, pos, 0, 0, len(data), len(data), 1)
        else:
            phdrs += struct.pack(order + "IIIIIIII", p_type, pos, 0, 0, len(data), len(data), 4, 1)
        body += data
        pos += len(data)
    shoff = shnum = shstrndx = 0
    strtab_data = b""
    if sections:
        names = [b"", *sections, b".shstrtab"]
        offsets = []
        for n in names:
            offsets.append(len(strtab_data))
            strtab_data += n + b"\0"
        strtab_off = pos
        shoff = pos + len(strtab_data)
        shnum, shstrndx = len(names), len(names) - 1
        fmt = order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
        shdrs = b"".join(struct.pack(fmt, off, 3 if i == shstrndx else 1, 0, 0,
                                     strtab_off if i == shstrndx else 0,
                                     len(strtab_data) if i == shstrndx else 0, 0, 0, 1, 0)
                         for i, off in enumerate(offsets))
        body += strtab_data + shdrs
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if order == "<" else 2, 1]) + b"\0" * 9
    fmt = order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH")
    header = ident + struct.pack(fmt, 2, 62, 1, 0, phoff if blobs else 0, shoff, 0, ehsize, phentsize, len(blobs),
                                 shentsize, shnum, shstrndx)
    return header + phdrs + body


def facts(image: bytes) -> ElfFacts:
    return hostscan.classify_elf(lambda offset, size: image[offset:offset + size])


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("order", ["<", ">"])
def test_classify_elf_reads_interpreter_go_note_and_go_section(bits, order):
    dyn = facts(elf(bits=bits, order=order, interp=b"/lib64/ld-linux-x86-64.so.2", sections=[b".text"]))
    assert dyn == ElfFacts(b"/lib64/ld-linux-x86-64.so.2", None)
    assert facts(elf(bits=bits, order=order, sections=[b".text", b".data"])) == ElfFacts(None, None)
    note = facts(elf(bits=bits, order=order, notes=[(b"GNU", 3), (b"Go", 4)]))
    assert note == ElfFacts(None, "Go build-id note")
    assert facts(elf(bits=bits, order=order, notes=[(b"Go", 1)])).go is None  # another Go note type
    section = facts(elf(bits=bits, order=order, interp=b"/lib/ld.so", sections=[b".text", b".go.buildinfo"]))
    assert section == ElfFacts(b"/lib/ld.so", ".go.buildinfo section")


@pytest.mark.parametrize(("image", "why"), [
    (b"", "not an ELF file"), (b"#!/bin/sh\n", "not an ELF file"), (b"\x7fELF\x03\x01", "unknown ELF class"),
    (elf(interp=b"/lib/ld.so")[:70], "damaged ELF headers"),
])
def test_classify_elf_refuses_what_is_not_a_whole_elf_header(image, why):
    with pytest.raises(ValueError, match=why):
        facts(image)


def test_classify_elf_survives_absurd_header_values():
    image = bytearray(elf(interp=b"/lib/ld.so", sections=[b".text"]))
    struct.pack_into("<Q", image, 0x20, 2**63)  # e_phoff far beyond the file: nothing to read there
    struct.pack_into("<H", image, 0x38, 0xFFFF)  # e_phnum: more than the table bound
    got = facts(bytes(image))
    assert got.go is None


# ---------------------------------------------------------------------------------------------- classify

HOOKED = (os.makedev(0xFE, 0), 339380)
GLIBC = Mapping(HOOKED[0], HOOKED[1], b"/usr/lib/x86_64-linux-gnu/libc.so.6", False)
DYNAMIC = ElfFacts(b"/lib64/ld-linux-x86-64.so.2", None)


@pytest.mark.parametrize(("elf_facts", "maps", "same_ns", "reason", "needle"), [
    (DYNAMIC, [GLIBC], True, None, None),
    (DYNAMIC, [GLIBC], False, None, None),  # the very file, seen from another mount namespace: hooked
    (DYNAMIC, [], True, None, None),  # no libc mapped (yet): nothing says it is blind
    (ElfFacts(None, None), [], True, "static", "statically linked"),
    (ElfFacts(None, None), [GLIBC], True, None, None),  # exe is ld.so: `ld.so PROGRAM`, with the hooked libc
    (ElfFacts(None, "Go build-id note"), [], True, "go", "Go build-id note"),
    (ElfFacts(b"/lib64/ld.so", ".go.buildinfo section"), [GLIBC], True, "go", ".go.buildinfo"),  # cgo: still Go
    (ElfFacts(b"/lib/ld-musl-x86_64.so.1", None), [Mapping(1, 2, b"/lib/ld-musl-x86_64.so.1", False)], True,
     "musl", "/lib/ld-musl-x86_64.so.1"),
    (ElfFacts(b"/lib/ld-musl-x86_64.so.1", None), [Mapping(1, 2, b"/usr/lib/x86_64-linux-musl/libc.so", False)],
     True, "musl", "x86_64-linux-musl/libc.so"),
    (ElfFacts(b"/lib/ld-musl-x86_64.so.1", None), [], True, "musl", "ld-musl"),  # not mapped yet: the interpreter
    (DYNAMIC, [Mapping(HOOKED[0], 5, b"/usr/lib/x86_64-linux-gnu/libc.so.6", True)], True, "other-libc",
     "libc.so.6 (deleted) (dev 254:0 ino 5)"),
    (None, [Mapping(7, 8, b"/opt/app/libc-2.17.so", False)], True, "other-libc", "/opt/app/libc-2.17.so"),
    (DYNAMIC, [Mapping(7, 8, b"/usr/lib/x86_64-linux-gnu/libc.so.6", False)], False, "other-mount-ns",
     "mnt:[4026532999]"),
])
def test_classify(elf_facts, maps, same_ns, reason, needle):
    got = hostscan.classify(elf_facts, maps, {HOOKED}, same_ns, "mnt:[4026532999]")
    if reason is None:
        assert got is None
    else:
        assert got[0] == reason and needle in got[1], got
        assert got[0] in hostscan.REASONS


def test_without_a_known_hooked_libc_only_the_program_decides():
    other = [Mapping(7, 8, b"/usr/lib/x86_64-linux-gnu/libc.so.6", False)]
    assert hostscan.classify(DYNAMIC, other, set(), True) is None
    assert hostscan.classify(ElfFacts(None, None), [], set(), True)[0] == "static"


# ---------------------------------------------------------------------------------------------- resolver files


def test_nsswitch_hosts_line():
    text = b"# comment\npasswd: files\n  hosts:   files   mdns4_minimal [NOTFOUND=return] dns # local\nhosts: x\n"
    assert hostscan.nsswitch_hosts(text) == "hosts: files mdns4_minimal [NOTFOUND=return] dns"
    assert hostscan.nsswitch_hosts(b"passwd: files\n") is None


def test_hosts_lines_name_a_watched_name_in_any_case_and_only_as_a_name():
    text = (b"127.0.0.1 localhost\n10.213.0.5\tOLD-DB.lab old-db # moved\n# 10.0.0.9 old-db.lab\n"
            b"10.0.0.7 old-db.lab.example\nold-db.lab\n\xff\x01 old-db.lab\n")
    assert hostscan.hosts_lines(text, ["old-db.lab"]) == ["10.213.0.5\\tOLD-DB.lab old-db # moved",
                                                          "\\xff\\x01 old-db.lab"]
    assert hostscan.hosts_lines(text, []) == []


@pytest.mark.parametrize(("name", "ok"), [
    ("old-db.lab", True), ("x", True), ("a" * 253, True), ("é.example", True),
    ("", False), ("a" * 254, False), ("é" * 127, False), ("a b", False), ("a\tb", False), ("a\nb", False),
    ("a\x7fb", False), ("a\u2028b", False), ("a\udcffb", False), ("a\ud800b", False), ("\udcff" * 300, False),
])
def test_check_watch_name(name, ok):
    assert (hostscan.check_watch_name(name) is None) is ok


# ---------------------------------------------------------------------------------------------- real processes


def this_libc() -> str:
    """The libc file this process maps (what a probe here would hook)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(None, 5)[-1]
        if hostscan.is_glibc(path.encode()):
            return path
    pytest.skip("this Python maps no glibc")


def build(tmp: Path, tool: str, *args: str, env: dict | None = None) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt: see scripts/setup)")
    proc = subprocess.run([tool, *args], cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr


SLEEPER_C = "#include <unistd.h>\nint main(void) { sleep(600); return 0; }\n"
SLEEPER_GO = 'package main\n\nimport "time"\n\nfunc main() { time.Sleep(600 * time.Second) }\n'


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> Path:
    """A directory for the test programs (each built on first use)."""
    d = tmp_path_factory.mktemp("programs")
    (d / "sleeper.c").write_text(SLEEPER_C)
    (d / "sleeper.go").write_text(SLEEPER_GO)
    return d


def static_c(d: Path) -> Path:
    if not (d / "static").exists():
        build(d, "gcc", "-static", "-O2", "-o", "static", "sleeper.c")
    return d / "static"


def musl_c(d: Path) -> Path:
    if not (d / "musl").exists():
        build(d, "musl-gcc", "-O2", "-o", "musl", "sleeper.c")
    return d / "musl"


def go_program(d: Path) -> Path:
    if not (d / "gosleeper").exists():
        # pure Go, with a private build cache, no module proxy: nothing leaves this machine
        build(d, "go", "build", "-o", "gosleeper", "sleeper.go",
              env={"CGO_ENABLED": "0", "GOCACHE": str(d / "gocache"), "GOPATH": str(d / "gopath"),
                   "GOPROXY": "off", "GOFLAGS": "", "GO111MODULE": "auto", "HOME": str(d)})
    return d / "gosleeper"


@pytest.fixture
def started():
    """start(argv, env=None, wait_for=None) → Popen, killed after the test; *wait_for*: a maps substring to wait
    for (the dynamic loader maps libraries just after exec)."""
    procs: list[subprocess.Popen] = []

    def start(argv, env=None, wait_for: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in argv], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        procs.append(p)
        deadline = time.monotonic() + 10
        while wait_for and wait_for not in Path(f"/proc/{p.pid}/maps").read_text():
            assert time.monotonic() < deadline and p.poll() is None, f"{argv} never mapped {wait_for}"
            time.sleep(0.02)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def by_pid(result: dict) -> dict[int, dict]:
    return {b["pid"]: b for b in result["blind_spots"]}


def test_static_musl_and_go_programs_are_blind_spots_and_dynamic_sleep_is_not(programs, started):
    sleep = shutil.which("sleep")
    dyn = started([sleep, "600"], wait_for="libc")
    static = started([static_c(programs)])
    musl = started([musl_c(programs)])
    go = started([go_program(programs)])
    result = hostscan.scan(this_libc(), [])
    json.dumps(result, allow_nan=False)  # JSON-safe as it stands
    spots = by_pid(result)
    assert dyn.pid not in spots
    assert spots[static.pid]["reason"] == "static" and spots[static.pid]["comm"] == "static"
    assert spots[static.pid]["exe"] == str(programs / "static")
    assert spots[musl.pid]["reason"] == "musl" and "musl" in spots[musl.pid]["detail"]
    assert spots[go.pid]["reason"] == "go" and spots[go.pid]["comm"] == "gosleeper"
    assert result["processes"] >= 4 and result["hooked_libc"]["ino"] == os.stat(this_libc()).st_ino
    assert os.getpid() not in spots  # the scanner itself is left out


def test_a_program_run_through_the_loader_is_judged_by_its_maps(started):
    loader = next((p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1") if os.path.exists(p)),
                  None)
    if loader is None:
        pytest.skip("no known glibc loader path on this machine")
    proc = started([loader, shutil.which("sleep"), "600"], wait_for="libc")
    assert proc.pid not in by_pid(hostscan.scan(this_libc(), []))


def test_a_copy_of_libc_is_another_libc(tmp_path, started):
    shutil.copy2(this_libc(), tmp_path / "libc.so.6")
    proc = started([shutil.which("sleep"), "600"], env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path)},
                   wait_for=str(tmp_path))
    spot = by_pid(hostscan.scan(this_libc(), []))[proc.pid]
    assert spot["reason"] == "other-libc" and str(tmp_path / "libc.so.6") in spot["detail"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root")
def test_another_mount_namespace_with_its_own_libc_is_other_mount_ns(tmp_path, started):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    libc = this_libc()
    shutil.copy2(libc, tmp_path / "libc.so.6")
    same = started(["unshare", "--mount", "--propagation", "private", shutil.which("sleep"), "600"],
                   wait_for="libc")
    script = f'mount --bind "$1" "$2" && exec {shutil.which("sleep")} 600'
    other = started(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                     tmp_path / "libc.so.6", libc], wait_for="sleep")
    deadline = time.monotonic() + 10
    while "libc" not in Path(f"/proc/{other.pid}/maps").read_text():
        assert time.monotonic() < deadline, "the sleep in its own mount namespace never mapped libc"
        time.sleep(0.02)
    spots = by_pid(hostscan.scan(libc, []))
    assert same.pid not in spots  # another namespace, the same file: the probe sees it
    assert spots[other.pid]["reason"] == "other-mount-ns" and "mnt:[" in spots[other.pid]["detail"]


@pytest.fixture
def overlay(tmp_path):
    """An overlayfs mount (tmp_path/mnt) whose lower layer holds a copy of libc and whose upper layer is on another
    filesystem (a tmpfs, as in the lab and in containers), so stat gives the file a per-layer device; unmounted
    afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    lower, layers, mnt = tmp_path / "lower", tmp_path / "layers", tmp_path / "mnt"
    for d in (lower, layers, mnt):
        d.mkdir()
    shutil.copy2(this_libc(), lower / "libc.so.6")
    mounted = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(layers)], check=True, timeout=30)
        mounted.append(layers)
        (layers / "upper").mkdir()
        (layers / "work").mkdir()
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"lowerdir={lower},upperdir={layers / 'upper'},workdir={layers / 'work'}", str(mnt)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"no overlayfs here: {proc.stderr.strip()}")
        mounted.append(mnt)
        yield mnt
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", "-l", str(d)], timeout=30)


def test_a_hooked_libc_on_overlayfs_is_recognised_in_other_processes_maps(overlay, started):
    proc = started([shutil.which("sleep"), "600"], env={**os.environ, "LD_LIBRARY_PATH": str(overlay)},
                   wait_for=str(overlay))
    hooked = str(overlay / "libc.so.6")
    assert by_pid(hostscan.scan(hooked, [])).get(proc.pid) is None  # maps and stat disagree on the device here
    assert by_pid(hostscan.scan(this_libc(), []))[proc.pid]["reason"] == "other-libc"


HOLDER = """
import socket, sys, time
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
accepted, _ = server.accept()
print(client.getsockname()[1], server.getsockname()[1], flush=True)
time.sleep(600)
"""


def test_an_established_connection_shows_with_its_owner_and_addresses(started):
    holder = started([sys.executable, "-c", HOLDER])
    client_port, server_port = map(int, holder.stdout.readline().split())
    comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
    conns = hostscan.scan(this_libc(), [])["connections"]
    ours = [c for c in conns if c["pid"] == holder.pid]
    assert {(c["local"], c["remote"]) for c in ours} == {
        (f"127.0.0.1:{client_port}", f"127.0.0.1:{server_port}"),
        (f"127.0.0.1:{server_port}", f"127.0.0.1:{client_port}")}
    assert all(c["comm"] == comm and c["remote_addr"] == "127.0.0.1" for c in ours)
    assert {c["remote_port"] for c in ours} == {client_port, server_port}


def test_watched_names_from_the_hosts_file_and_resolver_files():
    hosts = Path("/etc/hosts").read_bytes()
    if not hostscan.hosts_lines(hosts, ["localhost"]):
        pytest.skip("/etc/hosts does not name localhost (its lookup would go to DNS)")
    result = hostscan.scan(this_libc(), ["localhost", "LOCALHOST", "localhost", "bad name", "a" * 64 + ".lab",
                                         "x\udcffy"])
    json.dumps(result, ensure_ascii=False).encode("utf-8")  # a lone surrogate in a name is not carried over
    watch = {w["name"]: w for w in result["watch"]}
    assert list(watch) == ["localhost", "LOCALHOST", "bad name", "a" * 64 + ".lab", "x\\udcffy"]  # each once
    assert watch["x\\udcffy"]["error"] == "a name is UTF-8 text"
    assert "127.0.0.1" in watch["localhost"]["addresses"] and watch["localhost"]["error"] is None
    assert len(watch["localhost"]["addresses"]) == len(set(watch["localhost"]["addresses"]))
    assert watch["bad name"] == {"name": "bad name", "addresses": [],
                                 "error": "a name has no whitespace or control characters"}
    # a 64-byte label: refused by Python's IDNA codec before any lookup
    assert watch["a" * 64 + ".lab"]["addresses"] == [] and "label" in watch["a" * 64 + ".lab"]["error"]
    assert any("localhost" in line for line in result["resolver"]["hosts_lines"])
    if os.path.exists("/etc/nsswitch.conf"):
        assert (result["resolver"]["nsswitch_hosts"] or "").startswith("hosts:")


def test_resolution_errors_are_named_and_a_hung_resolver_is_cut_off(monkeypatch):
    release = threading.Event()

    def fake(name, *args, **kwargs):
        if name == "gone.lab":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name == "hang.lab":
            release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::5", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    t0 = time.monotonic()
    got = hostscan._resolve(["db.lab", "gone.lab", "hang.lab"], timeout=0.5)
    release.set()
    assert time.monotonic() - t0 < 5
    assert got == [{"name": "db.lab", "addresses": ["10.0.0.5", "fd00::5"], "error": None},
                   {"name": "gone.lab", "addresses": [], "error": "EAI_NONAME: Name or service not known"},
                   {"name": "hang.lab", "addresses": [], "error": "no answer within 0.5s"}]


def test_odd_bytes_in_comm_and_exe_are_escaped(programs, tmp_path, started):
    odd = os.fsencode(tmp_path) + b"/st\xe9t\x01c"  # a Latin-1 byte (not UTF-8) and a control byte
    shutil.copy2(static_c(programs), os.fsdecode(odd))
    proc = started([os.fsdecode(odd)])
    result = hostscan.scan(this_libc(), [])
    spot = by_pid(result)[proc.pid]
    assert spot["comm"] == "st\\xe9t\\x01c" and spot["exe"] == f"{tmp_path}/st\\xe9t\\x01c"
    json.dumps(result, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere


def test_the_scan_is_bounded_and_says_what_it_left_out():
    result = hostscan.scan(this_libc(), [], max_processes=1)
    assert result["processes"] <= 1
    assert any("processes not looked at" in e for e in result["errors"])


def test_scan_survives_a_missing_hooked_libc_and_a_failing_step(monkeypatch):
    def boom():
        raise RuntimeError("no /proc today")

    monkeypatch.setattr(hostscan, "_pids", boom)
    result = hostscan.scan("/nonexistent/libc.so.6", [])
    assert result["blind_spots"] == [] and result["connections"] == []
    assert result["hooked_libc"] == {"path": "/nonexistent/libc.so.6", "dev": None, "ino": None}
    assert any("no such file" in e for e in result["errors"])
    assert any("processes: the scan failed: RuntimeError: no /proc today" in e for e in result["errors"])
    assert set(result) == set(hostscan.empty(None, []))


# ---------------------------------------------------------------------------------------------- integration


def test_run_start_writes_scan_json_0600_even_when_the_scan_fails(tmp_path, monkeypatch):
    hostrun.take_scan(tmp_path, this_libc(), ["localhost"])
    path = tmp_path / "scan.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    scan = json.loads(path.read_text())
    assert scan["format"] == "fleetdns-scan/1" and scan["watch"][0]["name"] == "localhost"

    def boom(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(hostscan, "scan", boom)
    hostrun.take_scan(tmp_path, None, [])
    scan = json.loads(path.read_text())
    assert scan["errors"] == ["the scan failed: RuntimeError: broken"] and scan["blind_spots"] == []


class FakeConn:
    """What gather.pull_scan uses of a Connection: the host's name and read_file."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.host = type("H", (), {"name": "lab1"})()

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]


def test_gather_copies_the_scan_0600_and_summarises_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDNS_REPORTS", str(tmp_path))
    run = store.new_run({"mode": "events", "duration_s": 10}, "inv.ini", None, ["lab1"])
    assert run.manifest["hosts"]["lab1"]["scan"] is None
    scan = {**hostscan.empty("/lib/libc.so.6", ["pid 7: /proc/7/exe: permission denied", "second"]),
            "blind_spots": [{"pid": 1}], "connections": [{}, {}], "watch": [{}]}
    remote = f"{gather.remote_dir(run.id)}/scan.json"
    summary = gather.pull_scan(run, FakeConn({remote: json.dumps(scan).encode()}))
    assert summary == {"blind_spots": 1, "connections": 2, "watch": 1,
                       "error": "pid 7: /proc/7/exe: permission denied (and 1 more)"}
    local = run.scan_file("lab1")
    assert local == run.raw_dir / "lab1.scan.json" and oct(local.stat().st_mode & 0o777) == "0o600"
    assert json.loads(local.read_text()) == scan
    assert gather.pull_scan(run, FakeConn({})) == summary  # already local: not fetched again

    local.unlink()
    missing = gather.pull_scan(run, FakeConn({}))
    assert missing["blind_spots"] is None and "no scan.json" in missing["error"]
    broken = gather.pull_scan(run, FakeConn({remote: b"{not json"}))
    assert broken["watch"] is None and "unreadable lab1.scan.json" in broken["error"]
    assert local.read_bytes() == b"{not json"  # kept as the host wrote it
    assert store.scan_summary(hostscan.empty(None, [])) == {"blind_spots": 0, "connections": 0, "watch": 0,
                                                             "error": None}


def test_capture_passes_watch_names_to_run_start(tmp_path, monkeypatch):
    """From the command line to the run start argv and the manifest's options, each name once."""
    from fleet import capture, cli

    monkeypatch.setenv("FLEETDNS_HOME", str(tmp_path))
    inventory = tmp_path / "inv.ini"
    inventory.write_text("[lab]\nh1 ansible_host=127.0.0.1\n")
    seen = {}

    def fake_start(run, fleet, options, on_host=None):
        seen.update(argv=capture._start_argv(run, options), options=run.manifest["options"])
        raise SystemExit(0)

    monkeypatch.setattr(capture, "start", fake_start)
    with pytest.raises(SystemExit):
        cli.main(["capture", "-i", str(inventory), "--duration", "5s", "--watch", "old-db.lab", "--watch", "db.lab",
                  "--watch", "old-db.lab", "--source", "wire"])
    assert [a for a in seen["argv"] if a.startswith("--watch")] == ["--watch=old-db.lab", "--watch=db.lab"]
    assert seen["options"]["watch"] == ["old-db.lab", "db.lab"]
    # --source's value, not the inventory path (they once shared a variable)
    assert [a for a in seen["argv"] if a.startswith("--source")] == ["--source=wire"]


@pytest.mark.parametrize(("watch", "needle"), [
    ("a b", "--watch 'a b': a name has no whitespace"), ("", "a name is 1 to 253 bytes, not 0"),
    ("x" * 254, "not 254"), ("a\x1bb", "--watch 'a\\x1bb'"), ("x\udcff", "a name is UTF-8 text"),
])
def test_capture_refuses_a_bad_watch_name_in_one_line(tmp_path, watch, needle):
    proc = fleetdns("capture", "--duration", "5s", "--watch", watch, home=tmp_path)
    assert_one_line_error(proc, ExitCode.USAGE, needle)
