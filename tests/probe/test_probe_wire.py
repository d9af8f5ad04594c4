"""The wire source for real: bpftrace on the send syscalls, real processes sending DNS queries, read back.

Needs root, bpftrace, tracefs and ``ip`` (iproute2). Every workload runs in a network namespace made here
(``ip netns add``) whose only interface is its own loopback and whose /etc/resolv.conf (``/etc/netns/NAME/``)
names 127.0.0.1, where nothing listens: queries are sent, refused locally and never leave the namespace. The probe
is limited to that namespace (``wire_netns``), so other traffic on this machine cannot disturb the counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.probes import render
from tests.captures import dns_query
from tests.probe.conftest import needs_probe
from tests.probe.test_probe_local import Probe

pytestmark = [needs_probe, pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip (iproute2)")]


@pytest.fixture
def netns(tmp_path):
    """A fresh network namespace (name, inode) with loopback up and resolv.conf → 127.0.0.1; removed after."""
    names = []

    def make() -> tuple[str, int]:
        name = f"fdnswire{os.getpid() % 100000}x{len(names)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        names.append(name)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        conf = Path("/etc/netns") / name
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        return name, os.stat(f"/run/netns/{name}").st_ino

    yield make
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def run_in(ns: str, *argv: str) -> int:
    """Run one workload in network namespace ``ns`` to completion; its pid (ip netns exec execs it)."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(120)
    return proc.pid


#: sends the query packets of argv[1] (eval'd: sendto, sendmsg, other port, send6, write6, then sendto each)
SENDER = r"""
import os, socket, sys
to, msg, other, send6, write6, *more = eval(sys.argv[1])
def attempt(f, *a):
    try:
        f(*a)
    except OSError:
        pass   # ECONNREFUSED from the previous query's ICMP: the packet left anyway
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt(u.sendto, to, ("127.0.0.1", 53))
attempt(u.sendmsg, [msg], [], 0, ("127.0.0.1", 53))
attempt(u.sendto, other, ("127.0.0.1", 5353))
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
c.connect(("::1", 53))
attempt(c.send, send6)
attempt(os.write, c.fileno(), write6)
c.close()
for packet in more:
    attempt(u.sendto, packet, ("127.0.0.1", 53))
try:
    socket.getaddrinfo("gai.fleetdns.test", None)
except OSError:
    pass
"""

#: names (as label bytes) whose queries must survive byte-exactly: a dot inside a label is not a separator
HOSTILE = [b"new\nline.fleetdns.test", b"=cmd|calc.fleetdns.test", b"\xff\xfe\x80bad.fleetdns.test",
           b"sp ace.fleetdns.test", b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 50]


def packets(hostile: list[bytes]) -> str:
    """SENDER's argument: its fixed queries, then one query per name of *hostile*."""
    fixed = [dns_query(b"sendto.fleetdns.test"), dns_query(b"sendmsg.fleetdns.test", 28),
             dns_query(b"other-port.fleetdns.test"), dns_query(b"send6.fleetdns.test", 28),
             dns_query(b"write6.fleetdns.test", 12)]
    return repr(fixed + [dns_query(name) for name in hostile])


def test_wire_sees_each_send_syscall_exactly_and_only_in_its_namespace(tmp_path, netns):
    ns, inode = netns()
    other, _ = netns()
    probe = Probe(render.ProbeOptions(sources=("libc", "wire"), wire_netns=inode), tmp_path / "w.capture")
    pid = run_in(ns, sys.executable, "-c", SENDER, packets(HOSTILE))
    run_in(other, sys.executable, "-c", SENDER, packets([]))  # outside the probe's scope: not seen
    cap = probe.finish()
    assert cap.lost == 0 and cap.damage == {}
    assert cap.header["sources"] == ["libc", "wire"] and cap.header["wire_scope"] == f"netns:{inode}"
    wire = cap.wire
    assert set(wire["pid"]) == {pid}
    seen = [(r.syscall, r.name_bytes, r.qtype, r.server) for r in wire.itertuples()]
    assert seen[:4] == [("sendto", b"sendto.fleetdns.test", "A", "127.0.0.1:53"),
                        ("sendmsg", b"sendmsg.fleetdns.test", "AAAA", "127.0.0.1:53"),
                        ("sendto", b"send6.fleetdns.test", "AAAA", "[::1]:53"),
                        ("write", b"write6.fleetdns.test", "PTR", "[::1]:53")]
    assert [name for _s, name, _t, _a in seen[4:4 + len(HOSTILE)]] == HOSTILE
    assert not wire["truncated"].any()
    # glibc's own queries for getaddrinfo: A and AAAA (sendmmsg on a connected socket, maybe a retry)
    gai = wire[wire["name"] == "gai.fleetdns.test"]
    assert {"A", "AAAA"} <= set(gai["qtype"]) and "sendmmsg" in set(gai["syscall"])
    assert list(cap.events[cap.events["pid"] == pid]["name"]) == ["gai.fleetdns.test"]
    assert (wire["comm"] == "python3").all() or (wire["comm"].str.startswith("python")).all()


STATIC_C = r"""
#include <netdb.h>
#include <string.h>
/* getaddrinfo from a statically linked glibc: the libc probe cannot see it (no shared libc to hook) */
int main(int argc, char **argv) {
  struct addrinfo hints, *res;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  if (getaddrinfo(argv[1], NULL, &hints, &res) == 0) freeaddrinfo(res);
  return 0;
}
"""


def test_static_binary_and_dig_are_wire_only(tmp_path, netns):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the static workload")
    (tmp_path / "static.c").write_text(STATIC_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp_path / "static_gai"), str(tmp_path / "static.c")],
                   check=True, capture_output=True)
    ns, inode = netns()
    probe = Probe(render.ProbeOptions(sources=("libc", "wire"), wire_netns=inode), tmp_path / "w.capture")
    static = run_in(ns, str(tmp_path / "static_gai"), "static.fleetdns.test")
    dig = run_in(ns, "dig", "+tries=1", "+time=1", "@127.0.0.1", "dig.fleetdns.test") if shutil.which("dig") else None
    cap = probe.finish()
    assert cap.lost == 0
    assert set(cap.wire[cap.wire["pid"] == static]["name"]) == {"static.fleetdns.test"}
    assert static not in set(cap.events["pid"])
    if dig is not None:
        rows = cap.wire[cap.wire["pid"] == dig]
        assert list(rows["name"]) == ["dig.fleetdns.test"] and list(rows["qtype"]) == ["A"]
        # dig's own resolver asks; libc only parses the server address it was given (no packet)
        assert "dig.fleetdns.test" not in set(cap.events[cap.events["pid"] == dig]["name"])
