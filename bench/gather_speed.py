"""Gather speed: the same capture files on N lab hosts pulled by ``fleetdns gather``, by parallel ``scp`` and by
``ansible all -m fetch``, in one run, with each tool's peak RSS. Needs root.

    .venv/bin/python bench/gather_speed.py [--hosts 3] [--mb 100] [--mb 20 …]

For each size: one synthetic capture (capture format v1, E/N records) is written on every host as a finished run
(status.json with its SHA-256, as the host-side recorder leaves it), then each tool copies all of them; every copy
is checked against the SHA-256. Peak RSS is the largest process's (``/usr/bin/time -f %M``). Prints one line per
measurement and the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet import capture, store
from fleet import inventory as inv
from fleet.lab import control, lifecycle


def timed(argv: list[str], env: dict, *, ok=(0,)) -> tuple[float, int]:
    """(seconds, peak RSS in MiB of the largest process) of *argv*."""
    rss = tempfile.NamedTemporaryFile(suffix=".rss", delete=False)
    rss.close()
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *argv], env=env, capture_output=True,
                          text=True, timeout=3600)
    elapsed = time.monotonic() - started
    if proc.returncode not in ok:
        sys.exit(f"{' '.join(argv[:4])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    peak = int(Path(rss.name).read_text().split()[-1]) // 1024
    os.unlink(rss.name)
    return elapsed, peak


def synthetic_capture(path: Path, mb: int) -> str:
    """A capture of about *mb* MiB of lookups; returns its SHA-256."""
    h = hashlib.sha256()
    names = [f"N {k} 0 6 0 " + "".join(f"\\x{b:02x}" for b in f"s{k}.lab".encode()) + "\n" for k in range(100)]
    with open(path, "wb") as f:
        def put(text: str) -> None:
            data = text.encode()
            h.update(data)
            f.write(data)
        put('H fleetdns-capture/1 {"host": "bench", "mode": "events"}\nB 1000\n' + "".join(names))
        block = "".join(f"E {1000 + i} {4000 + i % 50} {4000 + i % 50} 0 1 0 0 {250000 + i} {i % 100} 1684566899 0\n"
                        for i in range(10000))
        for _ in range(mb * (1 << 20) // len(block)):
            put(block)
        put('T {"lost": 0}\n')
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--mb", type=int, action="append", help="capture size per host in MiB (repeatable)")
    args = parser.parse_args()
    sizes = args.mb or [100]
    bindir = Path(sys.executable).parent
    # not /tmp: a lab host has its own /tmp, but sees this directory through its overlay
    home = Path(tempfile.mkdtemp(prefix="fleetdns-bench-", dir="/var/tmp"))
    env = {**os.environ, "FLEETDNS_HOME": str(home), "PATH": f"{bindir}:{os.environ['PATH']}"}
    fleetdns = [sys.executable, "-m", "fleet"]
    subprocess.run([*fleetdns, "lab", "up", "--hosts", str(args.hosts)], env=env, check=True, timeout=300)
    try:
        inventory = home / "inventory" / "lab.ini"
        subprocess.run([*fleetdns, "deploy", str(inventory), "--backend", "bpftrace"], env=env, check=True,
                       capture_output=True, timeout=900)
        lab = lifecycle.load(home)
        hosts = inv.load(inventory)
        print(f"hosts: {args.hosts}; sizes: {', '.join(f'{mb} MiB' for mb in sizes)} per host")
        for mb in sizes:
            source = home / f"capture-{mb}"
            digest = synthetic_capture(source, mb)
            size = source.stat().st_size
            os.environ["FLEETDNS_HOME"] = str(home)
            run = capture.new(str(inventory), None, hosts, {"duration_s": 1, "mode": "events", "backend": "bpftrace",
                                                            "names": [], "max_bytes": None, "label": "bench"},
                              ["bench"])
            remote = f"/var/lib/fleetdns/runs/{run.id}"
            now = datetime.datetime.now(datetime.UTC).isoformat()
            status = {"run": run.id, "state": "finished", "attached": True, "attached_at": now, "ended": now,
                      "stop_reason": "duration", "events": 1, "lost": 0, "dropped": 0, "bytes": size,
                      "sha256": digest, "pid": None, "backend": "bpftrace"}
            for h in lab.names():
                put = control.exec_in(lab, h, ["sh", "-c", f"umask 077 && mkdir -p {remote} && cp {source} "
                                               f"{remote}/capture && cat > {remote}/status.json"],
                                      input=json.dumps(status).encode(), timeout=600)
                assert put.returncode == 0, f"could not place the capture on {h}"
                run.update_host(h, started=True, status="running")
            run.save()
            source.unlink()

            ours, ours_rss = timed([*fleetdns, "gather", run.id, "--keep-remote"], env)
            for h in lab.names():
                assert store.open_run(run.id).manifest["hosts"][h]["status"] == "captured"

            dest = home / f"scp-{mb}"
            dest.mkdir()
            scp = [["scp", "-q", "-i", h.key_file, "-o", f"UserKnownHostsFile={h.known_hosts}",
                    "-o", "StrictHostKeyChecking=yes", f"{h.user}@{h.address}:{remote}/capture", str(dest / h.name)]
                   for h in hosts]
            script = " & ".join(map(" ".join, scp)) + " & wait"
            scp_s, scp_rss = timed(["sh", "-c", script], env)

            fetch_dest = home / f"fetch-{mb}"
            fetch_s, fetch_rss = timed([str(bindir / "ansible"), "-i", str(inventory), "all", "-f", str(args.hosts),
                                        "-m", "ansible.builtin.fetch",
                                        "-a", f"src={remote}/capture dest={fetch_dest}/"], env)
            for h in lab.names():
                for copy in (dest / h, next(fetch_dest.joinpath(h).rglob("capture"))):
                    assert copy.stat().st_size == size, copy
            shutil.rmtree(dest)
            shutil.rmtree(fetch_dest)
            shutil.rmtree(store.open_run(run.id).path)
            for h in lab.names():
                control.exec_in(lab, h, ["rm", "-rf", remote], timeout=60)
            total = size * args.hosts / 2**20
            print(f"\n{mb} MiB × {args.hosts} hosts ({total:.0f} MiB in all):")
            for name, s, rss in (("fleetdns gather", ours, ours_rss), ("parallel scp", scp_s, scp_rss),
                                 ("ansible -m fetch", fetch_s, fetch_rss)):
                print(f"  {name:17} {s:7.2f} s  {total / s:7.1f} MiB/s  peak RSS {rss:4d} MiB")
            print(f"  fleetdns gather vs ansible fetch: {fetch_s / ours:.1f}× faster; vs parallel scp: "
                  f"{scp_s / ours:.2f}× scp's speed")
    finally:
        subprocess.run([*fleetdns, "lab", "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
