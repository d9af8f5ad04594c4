"""The stap backend without running it: runtime choice, the rendered script, ``stap -p2`` elaboration of every
mode and option (``-p4`` compilation for the bpf runtime, which needs no module build), the runner's assembler of
the bpf runtime's raw lines, and the parser's ``name_max``. Nothing here loads a probe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from fleet import capture_format as cf
from fleet.errors import UsageError
from fleet.probes import render, runner

LIBC = render.find_libc()


def opts(runtime: str, **kw) -> render.ProbeOptions:
    return render.ProbeOptions(backend="stap", stap_runtime=runtime, **kw)


# ------------------------------------------------------------------------------------------- runtime choice

def test_runtime_from_environment_else_from_the_build_tree(tmp_path):
    assert render.stap_runtime({"FLEETDNS_STAP_RUNTIME": "module"}, str(tmp_path)) == "module"
    assert render.stap_runtime({"FLEETDNS_STAP_RUNTIME": "bpf"}, str(tmp_path)) == "bpf"
    assert render.stap_runtime({}, str(tmp_path)) == "bpf"  # the lab's stub: no Makefile
    (tmp_path / "Makefile").touch()
    assert render.stap_runtime({}, str(tmp_path)) == "module"


def test_options_the_bpf_runtime_cannot_do_are_clear_errors():
    with pytest.raises(UsageError, match="summary mode needs stap's module runtime"):
        render.render(opts("bpf", mode="summary"))
    with pytest.raises(UsageError, match="name globs need stap's module runtime"):
        render.render(opts("bpf", names=("*.corp",)))
    with pytest.raises(UsageError, match="unknown stap runtime"):
        render.render(opts("kernel"))
    with pytest.raises(UsageError, match="--cgroup needs the bpftrace backend"):
        render.render(opts("module", cgroup="/sys/fs/cgroup"))


# ------------------------------------------------------------------------------------------- rendered text

@pytest.mark.parametrize("runtime,mode", [("module", "events"), ("module", "summary"), ("bpf", "events")])
def test_script_has_the_header_and_probes_every_function_by_dwarf_name(runtime, mode):
    script = render.render(opts(runtime, mode=mode))
    assert script.startswith("/*\n * dnsprobe.stp")
    assert f"Mode: {mode}." in script and f"stap runtime: {runtime}." in script
    for heading in ("Hooks", "Caveats:", "Overhead:", "Example output"):
        assert heading in script
    for f in render.FUNCTIONS:
        assert f'.function("{f.dwarf}")' in script and f'.function("{f.dwarf}").return' in script
    assert "user_string" not in script  # prints a stray line under the bpf runtime; names are read as bytes
    assert "{{" not in script


def test_bpf_runtime_prints_only_64_bit_formats_and_stages_in_reverse():
    script = render.render(opts("bpf"))
    formats = re.findall(r'printf\("([^"]*)"', script)
    assert formats and all("%d" not in f for f in formats)  # %d truncates to 32 bits there
    # stapbpf runs the handlers of one probe point last-registered first: the r line's handler comes first
    getaddrinfo_returns = [m.start() for m in re.finditer(r'function\("getaddrinfo"\)\.return', script)]
    first_body = script[getaddrinfo_returns[0]:getaddrinfo_returns[1]]
    assert 'printf("r ' in first_body
    assert 'printf("a ' in script[getaddrinfo_returns[-1]:]


def test_module_runtime_filters_names_in_the_kernel():
    script = render.render(opts("module", names=("LOCAL*", "*.corp.example")))
    assert "Filters: names LOCAL* *.corp.example" in script
    assert "reverse lookups are not reported" in script


# ------------------------------------------------------------------------------------------- stap itself

def _stap_or_skip() -> str:
    stap = shutil.which("stap")
    if stap is None:
        pytest.skip("stap is not installed")
    return stap


def _elaborate(stap: str, script: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "probe.stp"
    path.write_text(script)
    return subprocess.run([stap, *extra, str(path), "0"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@pytest.mark.parametrize("kw", [{"mode": "events"}, {"mode": "summary"},
                                {"mode": "events", "names": ("local*", "*.test", "a?c")},
                                {"mode": "summary", "names": ("vm",), "interval": 5, "max_keys": 1000}],
                         ids=["events", "summary", "events-names", "summary-names"])
def test_module_runtime_elaborates(kw, tmp_path):
    """``stap -p2``: probe points resolve (libc's debug info), every $variable and function exists."""
    stap = _stap_or_skip()
    done = _elaborate(stap, render.render(opts("module", **kw)), tmp_path, "-p2", "--runtime=kernel")
    if done.returncode != 0 and "no match" in done.stderr and "debuginfo" in done.stderr.lower():
        pytest.skip("libc's debug info is not installed")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr


def test_module_runtime_translates_to_c(tmp_path):
    """``stap -p3`` (C source; building the module needs kernel headers this machine lacks)."""
    stap = _stap_or_skip()
    done = _elaborate(stap, render.render(opts("module", mode="summary")), tmp_path, "-p3",
                      *render.stap_arguments(opts("module", mode="summary")))
    assert done.returncode == 0, done.stderr[-2000:]


def test_bpf_runtime_compiles(tmp_path):
    """``stap -p4 --runtime=bpf``: the BPF programs are generated (nothing is loaded)."""
    stap = _stap_or_skip()
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        pytest.skip("no kernel build tree (fleet.lab.accommodations.kernel_build_stub() makes one)")
    done = _elaborate(stap, render.render(opts("bpf")), tmp_path, "-p4", "-m", "probe",
                      *render.stap_arguments(opts("bpf")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "probe.bo").exists()


# ------------------------------------------------------------------------------------------- assembler

def _words(name: bytes, align: int) -> list[int]:
    data = b"\xee" * align + name + b"\0"
    data += b"\xdd" * (-len(data) % 8)
    return [int.from_bytes(data[i:i + 8], "little", signed=True) for i in range(0, len(data), 8)]


def _raw(tid: int, fid: int, name: bytes | None, align: int = 3, words: int | None = None) -> list[bytes]:
    lines = [b"a %d %d 0 %d %d 1000 50\n" % (tid, fid, -1 if name is None else -2, align)]
    if name is not None:
        lines += [b"w %d %d %d\n" % (tid, i, w) for i, w in enumerate(_words(name, align)[:words])]
    return lines + [b"r %d 77 0 -2 0 %d 0\n" % (tid, int.from_bytes(b"python3\0", "little"))]


def _assemble(lines: list[bytes]) -> tuple[runner.StapBpfAssembler, bytes]:
    asm = runner.StapBpfAssembler()
    return asm, b"".join(r for line in lines for r in asm.feed(line))


def test_assembler_builds_n_and_e_records_the_parser_reads():
    names = [b"localhost", b"new\nline", b"\xff\x1b[1m", b"x" * 63, b"y" * 64, b"z" * 70]
    lines = [b"B 999\n"]
    for tid, name in enumerate(names, start=100):
        lines += _raw(tid, 1, name, align=tid % 8)
    lines += _raw(200, 2, None) + _raw(201, 1, b"localhost")  # NULL name; a name already defined
    asm, records = _assemble(lines)
    assert asm.unfinished() == 0 and asm.stray == 0
    assert records.count(b"\nN ") + records.startswith(b"N ") == len(names) + 1
    header = {"host": "h", "mode": "events", "wall_offset_ns": 0, "name_max": render.STAP_BPF_NAME_MAX}
    cap = cf.parse_capture(cf.header_line(header) + records)
    assert cap.damage == {"no_trailer": 1}
    assert list(cap.events["name_bytes"][:6]) == names[:4] + [b"y" * 64, b"z" * 64]
    assert list(cap.events["name_truncated"]) == [False] * 4 + [True, True, False, False]
    assert cap.events["name"].isna()[6] and cap.events["name"][7] == "localhost"
    assert set(cap.events["comm"]) == {"python3"} and set(cap.events["result"][:6]) == {"EAI_NONAME"}
    assert runner.name_key(0, b"localhost") == int(records.split(b"\n")[1].split()[1])


def test_name_keys_equal_the_bpftrace_probe_s():
    """Keys seen in a bpftrace capture on this machine: both backends key a name alike."""
    assert runner.name_key(0, b"127.0.0.1") == 12302425093482026174
    assert runner.name_key(0, b"10.213.113.12") == 1454773738017255670


def test_assembler_reverse_lookup_and_damage():
    addr = bytes([127, 0, 0, 1])
    data = b"\0" * 4 + addr
    lines = [b"a 5 8 2 4 4 1000 50\n", b"w 5 0 %d\n" % int.from_bytes(data, "little"),
             b"r 5 5 0 0 0 0 0\n",
             b"w 6 0 1\n",                 # a word without its lookup
             b"a 7 1 0 -2 0 1000 50\n"]    # a lookup whose end never came
    asm, records = _assemble(lines)
    assert records.startswith(b"N %d 2 4 0 \\x7f\\x00\\x00\\x01\n" % runner.name_key(2, addr))
    assert asm.stray == 1 and asm.unfinished() == 1


def test_stap_loss_reports_on_stderr_are_counted():
    messages: list[str] = []
    losses: list[int] = []
    stderr = [b"WARNING: lost 17 perf_events on cpu 1\n", b"WARNING: There were 3 transport failures.\n",
              b"WARNING: Number of errors: 0, skipped probes: 2\n", b"Tip: /usr/share/doc/systemtap/README.Debian\n"]
    runner._read_stderr(iter(stderr), messages, losses)
    assert losses == [17, 3, 2]
    assert len(messages) == 3  # losses are still shown; the tip is noise


def test_a_name_cut_short_by_missing_words_is_flagged_not_silently_cut():
    asm, records = _assemble(_raw(9, 1, b"q" * 40, align=0, words=2))  # 16 of its 40 bytes arrived
    n_record = records.split(b"\n")[0].split()
    assert n_record[3] == str(render.NAME_MAX).encode()  # length: truncated


def test_parser_uses_name_max_from_the_header():
    key = runner.name_key(0, b"w" * 64)
    body = f"N {key} 0 256 0 {cf.hex_bytes(b'w' * 64)}\nE 1 2 2 0 1 0 0 5 {key} 0 0\n".encode()
    default = cf.parse_capture(cf.header_line({"mode": "events"}) + body)
    assert default.damage == {"incomplete_name": 1, "no_trailer": 1}
    short = cf.parse_capture(cf.header_line({"mode": "events", "name_max": 64}) + body)
    assert short.damage == {"no_trailer": 1} and bool(short.events["name_truncated"][0])
