"""The wire source's options, rendered probes and the runner's joining of its raw lines into W records.

Pure: the script text is checked here; tests/probe/test_probe_wire.py runs it for real.
"""

from __future__ import annotations

import os

import pytest

from fleet.errors import UsageError
from fleet.probes import render
from fleet.probes.runner import WireAssembler


def _script(**kw) -> str:
    return render.render(render.ProbeOptions(**kw))


def test_sources_default_by_backend_and_choices():
    assert render.resolve_sources(None, "bpftrace") == ("libc", "wire")
    assert render.resolve_sources(None, "stap") == ("libc",)
    assert render.resolve_sources("wire", "bpftrace") == ("wire",)
    assert render.resolve_sources("both", "bpftrace") == ("libc", "wire")
    with pytest.raises(UsageError, match="unknown source"):
        render.resolve_sources("dns", "bpftrace")


@pytest.mark.parametrize("opts, message", [
    ({"backend": "stap", "sources": ("libc", "wire")}, "wire source needs the bpftrace backend"),
    ({"mode": "summary", "sources": ("wire",)}, "summary mode needs the libc source"),
    ({"sources": ()}, "sources must be"),
    ({"sources": ("libc", "libc")}, "sources must be"),
    ({"sources": ("packets",)}, "sources must be"),
])
def test_bad_source_combinations_are_usage_errors(opts, message):
    with pytest.raises(UsageError, match=message):
        _script(**opts)


def test_wire_probes_cover_every_send_syscall_and_connect_close():
    script = _script(sources=("libc", "wire"))
    for syscall in ("connect", "close", "write", "sendto", "sendmsg"):
        assert script.count(f"tracepoint:syscalls:sys_enter_{syscall}") == 1
    # one probe per sendmmsg message looked at: each needs its own 512-byte BPF stack
    assert script.count("tracepoint:syscalls:sys_enter_sendmmsg") == render.WIRE_MMSG
    assert "uprobe:" in script and "clear(@wc);" in script
    assert "curtask->nsproxy->net_ns" not in script  # every namespace by default


def test_wire_alone_has_no_uprobes_and_netns_scope_is_a_predicate():
    script = _script(sources=("wire",), wire_netns=4026532174)
    assert "uprobe:" not in script and "uretprobe:" not in script
    assert "Wire source (syscall tracepoints): write, sendto, sendmsg, sendmmsg" in script
    assert "network namespace 4026532174 only" in script
    sends = [block for block in script.split("\n\n") if block.startswith("tracepoint:syscalls:sys_enter_send")]
    assert sends and all("curtask->nsproxy->net_ns->ns.inum == 4026532174" in b.splitlines()[0] for b in sends)


def test_libc_alone_renders_as_before():
    assert "sys_enter" not in _script() and "@wc" not in _script(mode="summary")


def test_wire_scope_auto_follows_the_pid_namespace():
    in_init = os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC
    assert render.wire_netns("all") is None
    assert render.wire_netns("netns") == os.stat("/proc/self/ns/net").st_ino
    assert render.wire_netns("auto") == (None if in_init else os.stat("/proc/self/ns/net").st_ino)
    with pytest.raises(UsageError, match="unknown wire scope"):
        render.wire_netns("host")


W_INTS = b"5000 42 43 0 2 3 2 16777343 0 53"
COMM = b"14476648585132400 0"


def _w(tid: bytes, length: int, chunk: bytes) -> bytes:
    return b"w 5000 42 %s 0 2 3 2 16777343 0 53 %d %s %s\n" % (tid, length, COMM, chunk)


def test_short_query_is_one_record_with_two_empty_fields():
    [record] = WireAssembler().feed(_w(b"43", 2, b"\\x12\\x34"))
    assert record == b"W 5000 42 43 0 2 3 2 16777343 0 53 2 " + COMM + b" \\x12\\x34  \n"
    assert len(record.rstrip(b"\n").split(b" ")) == 17


def test_long_query_waits_for_its_continuations_across_other_threads():
    a = WireAssembler()
    assert a.feed(_w(b"43", 300, b"\\x01")) == []
    assert a.feed(b"v 43 128 \\x02\n") == []
    [other] = a.feed(_w(b"44", 1, b"\\x09"))  # another thread's query in between
    assert other.split(b" ")[3] == b"44"
    [record] = a.feed(b"v 43 256 \\x03\n")
    assert record.rstrip(b"\n").split(b" ")[14:] == [b"\\x01", b"\\x02", b"\\x03"]
    assert a.flush() == []


def test_a_lost_continuation_still_writes_the_query_with_what_came():
    a = WireAssembler()
    a.feed(_w(b"43", 200, b"\\x01"))
    # the thread's next query: the first one's rest never came, so it is written as it is, then the new one
    first, second = a.feed(_w(b"43", 1, b"\\x05"))
    assert first.rstrip(b"\n").split(b" ")[14:] == [b"\\x01", b"", b""]
    assert second.rstrip(b"\n").split(b" ")[14:] == [b"\\x05", b"", b""]
    a.feed(_w(b"43", 150, b"\\x07"))
    [last] = a.flush()
    assert last.rstrip(b"\n").split(b" ")[14:] == [b"\\x07", b"", b""]


@pytest.mark.parametrize("line", [b"w 1 2 3\n", b"v 99 128 \\x01\n", b"v 43 abc \\x01\n", b"w " + b"x " * 14 + b"\n"])
def test_malformed_raw_lines_are_dropped(line):
    assert WireAssembler().feed(line) == []
