"""Host-side preflight, run by the deploy playbook's last task: which probe backends really work on this host?

For each backend installed here (bpftrace, stap) it runs the real probe (:func:`fleet.probes.runner.run_probe`,
the same code path captures use) for a couple of seconds, makes one real ``getaddrinfo()`` from a child process of
a random loopback address with ``AI_NUMERICHOST`` (a unique marker that libc answers without any lookup traffic),
and passes the backend only if the probe saw that marker. (The marker, not the child's pid, identifies the lookup:
in a pid namespace the probe reports the machine's pids.)

Except stap's bpf runtime (hosts that cannot build a kernel module, like the lab's): deploy runs this preflight on
every host at once, and several stapbpf processes running at the same time have oopsed a kernel (a NULL
dereference in uprobe_perf_close, after which no uprobe attached until reboot). So that runtime is only compiled
here (``stap -p4``, what the runner does before it starts stapbpf) and reported with ``"checked": "compile"``;
live checks say ``"checked": "live"``. The result goes to ``--output``
(``/var/lib/fleetdns/host.json``, mode 0600) and to stdout as one JSON object::

    {"host": "lab1", "time": "2026-11-25T21:50:00Z", "kernel": "6.18.44-…", "distro": "Debian GNU/Linux 12",
     "libc": "/usr/lib/x86_64-linux-gnu/libc.so.6", "libc_build_id": "…", "python": "3.11.2",
     "requested": "auto", "ready": ["bpftrace"],
     "backends": {"bpftrace": {"ok": true, "checked": "live", "version": "bpftrace v0.17.0", "seconds": 2.9},
                  "stap": {"ok": true, "checked": "compile", "runtime": "bpf", "version": "…", "seconds": 2.1}},
     "problems": ["stap: …", …]}

Exit status 0 when the requested backend (any, for ``auto``) passed, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from fleet.errors import FleetError
from fleet.probes import render
from fleet.probes.runner import check_environment, run_probe, stap_command

BACKENDS = ("bpftrace", "stap")
LOOKUP = "import socket, sys; socket.getaddrinfo(sys.argv[1], None, flags=socket.AI_NUMERICHOST)"


def distro() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "").strip('"')
    except OSError:
        return ""


def version(program: str) -> str:
    try:
        proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else ""


def check_stap_compiles(libc: str) -> dict:
    """stap's bpf runtime, without running it: ``ok`` when the events probe compiles (``stap -p4``)."""
    opts = render.ProbeOptions(backend="stap", mode="events", libc=libc)
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="fleetdns-preflight-")
    try:
        program = check_environment(opts)
        script_path = os.path.join(workdir, "dnsprobe.stp")
        with open(script_path, "w") as f:
            f.write(render.render(opts))
        stap_command(opts, program, script_path, workdir)
    except FleetError as exc:
        return {"ok": False, "checked": "compile", "runtime": "bpf", "error": str(exc)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"ok": True, "checked": "compile", "runtime": "bpf", "seconds": round(time.monotonic() - started, 2)}


def check_backend(backend: str, libc: str, seconds: float = 2.0) -> dict:
    """Run *backend*'s probe briefly around one real lookup; ``ok`` only if the probe saw it. stap's bpf runtime
    is only compiled (see the module docstring)."""
    if backend == "stap" and render.stap_runtime() == "bpf":
        return check_stap_compiles(libc)
    rows: list[dict] = []
    children: list[subprocess.Popen] = []
    marker = "127." + ".".join(str(random.randint(1, 254)) for _ in range(3))
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out:
            run_probe(
                # the default sources (bpftrace: libc and wire), so deploy proves what capture will run
                render.ProbeOptions(backend=backend, mode="events", libc=libc,
                                    sources=render.resolve_sources(None, backend), wire_netns=render.wire_netns()),
                out,
                duration=seconds,
                table_callback=rows.append,
                ready_callback=lambda: children.append(subprocess.Popen([sys.executable, "-c", LOOKUP, marker])),
            )
    except FleetError as exc:
        return {"ok": False, "checked": "live", "error": str(exc)}
    finally:
        for child in children:
            child.wait()
    if not children:
        return {"ok": False, "checked": "live", "error": "the probe never reported itself attached"}
    if not any(row.get("name") == marker for row in rows):
        return {"ok": False, "checked": "live",
                "error": f"attached, but did not see the marker lookup getaddrinfo({marker!r})"}
    return {"ok": True, "checked": "live", "seconds": round(time.monotonic() - started, 2)}


def preflight(requested: str, problems: list[str]) -> dict:
    libc = render.find_libc()
    report = {
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "distro": distro(),
        "libc": libc,
        "libc_build_id": render.elf_info(libc).build_id,
        "python": platform.python_version(),
        "requested": requested,
        "backends": {},
        "ready": [],
        "problems": list(problems),
    }
    def check(backend: str) -> dict:
        program = shutil.which(backend)
        if not program:
            return {"ok": False, "error": f"{backend} is not installed"}
        return {"version": version(program), **check_backend(backend, libc)}

    with ThreadPoolExecutor(len(BACKENDS)) as pool:  # each check mostly waits for its backend to attach
        results = dict(zip(BACKENDS, pool.map(check, BACKENDS), strict=True))
    for backend, result in results.items():
        report["backends"][backend] = result
        if result["ok"]:
            report["ready"].append(backend)
        else:
            report["problems"].append(f"{backend}: {result['error']}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetdns-probe preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto")
    parser.add_argument("--output", help="write the JSON here too (mode 0600)")
    parser.add_argument("--problem", action="append", default=[], help="a problem found earlier, to record")
    args = parser.parse_args(argv)
    report = preflight(args.backend, args.problem)
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        tmp = args.output + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    sys.stdout.write(text)
    wanted = report["ready"] if args.backend == "auto" else [b for b in report["ready"] if b == args.backend]
    return 0 if wanted else 1


if __name__ == "__main__":
    sys.exit(main())
