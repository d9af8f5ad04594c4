"""Deploy wall time on a fresh lab, first and second run, against ``ansible all -m setup`` on the same hosts in the
same run (the floor for anything that gathers facts). Needs root.

    .venv/bin/python bench/deploy_wall.py [--hosts 3]

Prints one line per measurement and the ratios to the setup baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    args = parser.parse_args()
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="fleetdns-bench-") as home:
        env = {**os.environ, "FLEETDNS_HOME": home, "PATH": f"{bindir}:{os.environ['PATH']}"}
        fleetdns = [sys.executable, "-m", "fleet"]
        timed([*fleetdns, "lab", "up", "--hosts", str(args.hosts)], env)
        try:
            inventory = str(Path(home) / "inventory" / "lab.ini")
            setup = timed([str(bindir / "ansible"), "-i", inventory, "all", "-m", "setup"], env)
            first = timed([*fleetdns, "deploy", inventory], env)
            second = timed([*fleetdns, "deploy", inventory], env)
            setup_again = timed([str(bindir / "ansible"), "-i", inventory, "all", "-m", "setup"], env)
        finally:
            subprocess.run([*fleetdns, "lab", "down"], env=env, capture_output=True)
    baseline = min(setup, setup_again)
    print(f"hosts: {args.hosts}")
    print(f"ansible all -m setup: {setup:.1f} s, {setup_again:.1f} s (baseline: {baseline:.1f} s)")
    print(f"fleetdns deploy, first run: {first:.1f} s = {first / baseline:.1f} x setup")
    print(f"fleetdns deploy, second run: {second:.1f} s = {second / baseline:.1f} x setup")


if __name__ == "__main__":
    main()
