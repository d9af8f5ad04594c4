"""How fast ``fleetdns report --csv`` is on a large synthetic run, against DuckDB doing the same aggregation over the
same files, in the same run (issue 6: within 2x of DuckDB, peak memory <= 2 GB; figures in docs/benchmarks.md).

    .venv/bin/python bench/report_speed.py --hosts 100 --events 1000000 3000000 10000000

For each size it writes a synthetic run (real capture format v1, events mode: 200 names, 40 processes a host,
5% failures, log-normal latencies) into a temp run store, then times, each in a fresh process (peak RSS summed
over the process and its workers, sampled from /proc):

* ``fleetdns``: ``python -m fleet report RUN --csv PATH`` — parse every host file (one worker process per CPU),
  merge, write the CSV.
* ``duckdb``: the same table from the same raw files: read the E and N records with ``read_csv`` (space
  separated), decode the name keys, group by host, comm, pid, name with counts, failures, p50/p95 from the same
  log2 buckets, first/last, written with ``COPY … TO`` CSV. DuckDB is the baseline because it is what an analyst
  would reach for to aggregate text files fast (vectorised, multi-threaded C++). It does a little less than
  fleetdns: names are hex-decoded once per key but not escaped, comms stay integers, no damage accounting,
  no manifest/coverage, no formula neutralising.

DuckDB is a bench-only dependency (``pip install duckdb``); without it only fleetdns is timed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet import capture_format as cf  # noqa: E402
from fleet import store  # noqa: E402

OFFSET = 1_764_750_000_000_000_000
NAMES, PROCESSES = 200, 40


def write_host(path: Path, host: str, events: int, seed: int) -> None:
    """One host's events-mode capture with *events* E records, written in blocks (memory stays small)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 2**63, NAMES, dtype=np.int64)
    comms = [f"proc{i % PROCESSES}".encode() for i in range(PROCESSES)]
    c0 = [int.from_bytes(c.ljust(16, b"\0")[:8], "little") for c in comms]
    header = {"host": host, "boot_id": "b", "backend": "bpftrace", "mode": "events", "wall_offset_ns": OFFSET,
              "start_time": "2025-12-03T08:20:00+00:00"}
    with open(path, "wb") as f:
        f.write(cf.header_line(header) + b"B 1\n")
        for i, key in enumerate(keys):
            name = f"svc{i}.{host}.example.com".encode()
            f.write(f"N {key} 0 {len(name)} 0 {cf.hex_bytes(name)}\n".encode())
        block = 200_000
        for start in range(0, events, block):
            n = min(block, events - start)
            t = 1_000_000_000 + (start + np.arange(n)) * (600_000_000_000 // max(events, 1))
            proc = rng.integers(0, PROCESSES, n)
            pid = 1000 + proc
            name = rng.zipf(1.3, n) % NAMES
            rc = np.where(rng.random(n) < 0.05, -2, 0)
            lat = rng.lognormal(14, 1.0, n).astype(np.int64) + 1
            c0s = np.asarray(c0, dtype=np.int64)[proc]
            lines = [f"E {a} {b} {b} 0 1 {c} 0 {d} {e} {g} 0" for a, b, c, d, e, g in
                     zip(t.tolist(), pid.tolist(), rc.tolist(), lat.tolist(), keys[name].tolist(), c0s.tolist(),
                         strict=True)]
            f.write(("\n".join(lines) + "\n").encode())
        f.write(cf.trailer_line({"exit_status": 0, "lost": 0, "end_time_ns": OFFSET + 601 * 10**9}))


def make_run(root: Path, hosts: int, events: int) -> store.Run:
    os.environ["FLEETDNS_REPORTS"] = str(root)
    run = store.new_run({"mode": "events"}, "bench", None, [f"host{i:03d}" for i in range(hosts)])
    for i, host in enumerate(run.manifest["hosts"]):
        path = run.host_file(host)
        write_host(path, host, events // hosts, seed=i)
        run.update_host(host, status="captured", file=f"raw/{path.name}", bytes=path.stat().st_size)
    run.save()
    return run


def duckdb_report(raw: str, out: str) -> None:
    """The baseline: the report table from the raw files of a run, by DuckDB (runs in its own process)."""
    import duckdb

    con = duckdb.connect()
    cols = {f"c{i}": "VARCHAR" if i in (0, 5, 9, 11, 12) else "BIGINT" for i in range(13)}
    # every record as up to 13 space-separated fields; E records have 12, N records 6
    con.execute(f"""CREATE TEMP TABLE rec AS SELECT * FROM read_csv('{raw}/*.capture', delim=' ', header=false,
        columns={cols}, filename=true, null_padding=true, ignore_errors=true, quote='', escape='',
        auto_detect=false) WHERE c0 IN ('E', 'N')""")
    con.execute(f"""COPY (
      WITH names AS (SELECT DISTINCT filename, c1 AS key, decode(unhex(replace(c5, '\\x', ''))) AS name
                     FROM rec WHERE c0 = 'N'),
           e AS (SELECT regexp_extract(filename, '([^/]+)[.]capture$', 1) AS host, filename, c2 AS pid,
                        c10 AS comm0, c9 AS key, c6 AS rc, c8 AS lat, c1 AS t FROM rec WHERE c0 = 'E'),
           b AS (SELECT host, filename, pid, comm0, key, floor(log2(greatest(lat, 1)))::INT AS bucket,
                        count(*) AS n, sum((rc <> 0)::INT) AS failed, min(t) AS first, max(t) AS last
                 FROM e GROUP BY ALL),
           c AS (SELECT *, sum(n) OVER (PARTITION BY host, pid, comm0, key ORDER BY bucket) AS cum,
                        sum(n) OVER (PARTITION BY host, pid, comm0, key) AS total FROM b)
      SELECT host, comm0 AS process, pid, names.name AS name, sum(n) AS lookups, sum(failed) AS failed,
             pow(2, min(bucket) FILTER (WHERE cum >= 0.5 * total) + 0.5) / 1e6 AS p50_ms,
             pow(2, min(bucket) FILTER (WHERE cum >= 0.95 * total) + 0.5) / 1e6 AS p95_ms,
             make_timestamp((min(first) + {OFFSET}) // 1000) AS first_seen,
             make_timestamp((max(last) + {OFFSET}) // 1000) AS last_seen
      FROM c JOIN names ON names.filename = c.filename AND names.key::BIGINT = c.key::BIGINT
      GROUP BY host, comm0, pid, names.name ORDER BY lookups DESC
    ) TO '{out}' (HEADER, DELIMITER ',')""")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (MiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process with its workers, summed over the process tree
    (sampled every 20 ms; ru_maxrss would give only the largest single process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mib(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--duckdb", nargs=2, metavar=("RAW_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.duckdb:
        return duckdb_report(*args.duckdb)
    try:
        import duckdb  # noqa: F401
        have_duckdb = True
    except ImportError:
        have_duckdb = False
    print("| events | hosts | raw MB | fleetdns s | fleetdns peak MiB | duckdb s | duckdb peak MiB | fleetdns/duckdb |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for events in args.events:
        with tempfile.TemporaryDirectory(prefix="fleetdns-bench-") as tmp:
            root = Path(tmp)
            run = make_run(root / "reports", args.hosts, events)
            raw_mb = sum(p.stat().st_size for p in run.raw_dir.iterdir()) / 1e6
            env = {**os.environ, "FLEETDNS_REPORTS": str(root / "reports")}
            ours = timed([sys.executable, "-m", "fleet", "report", run.id, "--csv", str(root / "ours.csv")], env)
            rows = sum(1 for _ in open(root / "ours.csv")) - 1
            if have_duckdb:
                theirs = timed([sys.executable, __file__, "--duckdb", str(run.raw_dir), str(root / "duck.csv")], env)
                duck_rows = sum(1 for _ in open(root / "duck.csv")) - 1
                if duck_rows != rows:
                    print(f"warning: duckdb gave {duck_rows} rows, fleetdns {rows}", file=sys.stderr)
                ratio = f"{ours[0] / theirs[0]:.2f}x"
                duck = f"{theirs[0]:.1f} | {theirs[1]:.0f}"
            else:
                ratio, duck = "-", "- | -"
            print(f"| {events:,} | {args.hosts} | {raw_mb:.0f} | {ours[0]:.1f} | {ours[1]:.0f} | {duck} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
