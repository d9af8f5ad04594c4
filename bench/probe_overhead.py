"""Probe overhead: lookup rate of a C getaddrinfo() loop with and without the probe, and events-mode loss.

Usage (root, bpftrace, gcc; a few minutes)::

    .venv/bin/python bench/probe_overhead.py [--seconds 5] [--rounds 3] [--name localhost] [--json out.json]
    .venv/bin/python bench/probe_overhead.py --lab-dns [--seconds 5] [--rounds 3]     # the lab-DNS loop only
    (--wire-rates 5000 10000 … sets part 3's query rates; needs ip from iproute2)

Part 1, rate ratio: the loop runs ``--seconds`` bare, under bpftrace with the probe's hooks and empty bodies
(the floor), under the summary-mode probe and under the events-mode probe, interleaved for ``--rounds`` rounds
(so drifting background load hits every configuration alike);
the ratio is the median probed rate over the median bare rate of the same run.
Part 2, events-mode loss: the loop paced at fixed rates, alone in a cgroup the probe filters on, so
``recorded + lost`` must equal the loop's own count exactly.
Part 3, the wire source (``--source both``): part 1's loop under events and summary mode with the wire source
on as well (``events+wire``, ``summary+wire``: what the wire probes' syscall hooks cost a process that sends no
query); and its loss: a C sender paced at fixed rates sends DNS queries with ``sendto()`` to 127.0.0.1:53 inside
a network namespace made for the run (nothing listens; nothing leaves), the probe limited to that namespace, so
``W records + lost`` must equal the sender's count.

Every lookup runs in a private mount namespace whose nsswitch.conf says ``hosts: files``: no query leaves
this machine. ``--nsswitch`` keeps the machine's own (use it inside a lab host to loop on a lab-DNS name).

``--lab-dns``: the same rate ratio (bare, summary, events) on a loop resolving ``db.lab`` inside a one-host lab
brought up for the run, answered by the lab's DNS server over the lab bridge (a real ~100 µs lookup, where the
probe's fixed cost weighs far less than on the 3 µs localhost loop). The probe hooks that host's own libc file;
``summary+wire`` and ``events+wire`` add the wire source (limited to that host's network namespace), which here
reads every query the loop sends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.capture_format import parse_capture  # noqa: E402
from fleet.probes import render, runner  # noqa: E402

LOOP_C = r"""
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
/* gai_bench NAME SECONDS [RATE]: getaddrinfo(NAME, AF_INET) for SECONDS, paced at RATE/s if given;
   prints "lookups seconds rate" */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  double secs = atof(argv[2]), rate = argc > 3 ? atof(argv[3]) : 0, t0 = now(), el = 0;
  struct addrinfo hints, *res;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_INET;
  long n = 0;
  while (el < secs) {
    for (int i = 0; i < 64; i++, n++)
      if (getaddrinfo(argv[1], NULL, &hints, &res) == 0) freeaddrinfo(res);
    el = now() - t0;
    if (rate > 0 && n / rate > el) {
      struct timespec d = { 0, (long)((n / rate - el) * 1e9) };
      nanosleep(&d, NULL);
      el = now() - t0;
    }
  }
  printf("%ld %.6f %.1f\n", n, el, n / el);
  return 0;
}
"""


SEND_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
/* dns_send SECONDS RATE: sendto() one DNS query for q.fleetdns.test (A) to 127.0.0.1:53 RATE times a second for
   SECONDS; prints "queries seconds rate" */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  static const unsigned char q[] = "\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    "\x01q\x07fleetdns\x04test\x00\x00\x01\x00\x01";
  double secs = atof(argv[1]), rate = atof(argv[2]), t0 = now(), el = 0;
  struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(53) };
  inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  long n = 0;
  while (el < secs) {
    for (int i = 0; i < 16; i++, n++) sendto(s, q, sizeof q - 1, 0, (struct sockaddr *)&to, sizeof to);
    el = now() - t0;
    if (n / rate > el) {
      struct timespec d = { 0, (long)((n / rate - el) * 1e9) };
      nanosleep(&d, NULL);
      el = now() - t0;
    }
  }
  printf("%ld %.6f %.1f\n", n, el, n / el);
  return 0;
}
"""


def build(tmp: Path) -> str:
    for name, source in (("gai_bench", LOOP_C), ("dns_send", SEND_C)):
        (tmp / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-O2", "-o", str(tmp / name), str(tmp / f"{name}.c")], check=True)
    return str(tmp / "gai_bench")


def prefix(tmp: Path, keep_nsswitch: bool, cgroup: Path | None = None) -> list[str]:
    """Command prefix: files-only hosts lookups (unless kept) and, optionally, joining a cgroup first."""
    steps = []
    if not keep_nsswitch:
        (tmp / "nsswitch.conf").write_text("hosts: files\n")
        steps.append(f"mount --bind {tmp / 'nsswitch.conf'} /etc/nsswitch.conf")
    if cgroup is not None:
        steps.append(f"echo $$ > {cgroup}/cgroup.procs")
    return ["unshare", "-m", "sh", "-c", " && ".join(steps + ['exec "$@"']), "sh"]


def loop(cmd: list[str], name: str, seconds: float, rate: float = 0, run=subprocess.run) -> tuple[int, float]:
    out = run([*cmd, name, str(seconds), str(rate)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the lookup loop failed: {out.stderr.strip()}")
    count, _elapsed, per_s = out.stdout.split()
    return int(count), float(per_s)


class Running:
    """A probe capture in a background thread (started attached; :meth:`finish` stops and parses it)."""

    def __init__(self, opts: render.ProbeOptions, path: Path) -> None:
        self.stop, self.ready, self.path, self.error = threading.Event(), threading.Event(), path, None
        self.thread = threading.Thread(target=self._run, args=(opts,), daemon=True)
        self.thread.start()
        self.ready.wait(180)
        if self.error:
            raise self.error

    def _run(self, opts):
        try:
            runner.run_probe(opts, str(self.path), ready_callback=self.ready.set, stop=self.stop)
        except Exception as e:  # re-raised in the main thread
            self.error = e
            self.ready.set()

    def finish(self):
        self.stop.set()
        self.thread.join(180)
        return parse_capture(self.path)


class HooksOnly:
    """bpftrace with the probe's uprobes and uretprobes and empty bodies: the floor any probe pays."""

    def __init__(self) -> None:
        libc = render.find_libc()
        points = ",".join(f"{kind}:{libc}:{f.symbol}" for f in render.FUNCTIONS for kind in ("uprobe", "uretprobe"))
        self.proc = subprocess.Popen(["bpftrace", "-B", "line", "-e", f"BEGIN {{ printf(\"B\\n\"); }} {points} {{ }}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        while self.proc.stdout.readline() not in (b"B\n", b""):
            pass

    def finish(self) -> int:
        self.proc.send_signal(2)
        self.proc.communicate(timeout=60)
        return 0


def rate_ratio(args, tmp: Path, bench: str) -> list[dict]:
    cmd = [*prefix(tmp, args.nsswitch), bench]
    configs = ["bare", "hooks-only", "summary", "events", "summary+wire", "events+wire"]
    rates: dict[str, list[float]] = {c: [] for c in configs}
    lost: dict[str, int] = {c: 0 for c in configs}
    for r in range(args.rounds):
        for config in configs:
            probe = None
            if config == "hooks-only":
                probe = HooksOnly()
            elif config != "bare":
                mode, _, wire = config.partition("+")
                probe = Running(render.ProbeOptions(mode=mode, sources=("libc", "wire") if wire else ("libc",)),
                                tmp / f"{config}-{r}.capture")
            _count, per_s = loop(cmd, args.name, args.seconds)
            if isinstance(probe, Running):
                lost[config] += probe.finish().lost
            elif probe is not None:
                probe.finish()
            rates[config].append(per_s)
            print(f"round {r} {config:8} {per_s:12.0f} lookups/s", file=sys.stderr)
    bare = statistics.median(rates["bare"])
    return [{"backend": "bpftrace" if c != "bare" else "-", "mode": c, "name": args.name,
             "median_rate": round(statistics.median(rates[c])), "rates": [round(x) for x in rates[c]],
             "ratio": round(statistics.median(rates[c]) / bare, 3), "lost": lost[c]} for c in configs]


def lab_dns_ratio(args, tmp: Path, bench: str) -> list[dict]:
    """Rate ratio of the db.lab loop inside a one-host lab, the probe on that host's libc file."""
    from fleet.lab import control, lifecycle

    home = tmp / "lab"
    home.mkdir()
    lab, _ = lifecycle.up(1, "overlay", home=home)
    try:
        host_dir = lab.layout.host_dir(1)
        shutil.copy(bench, host_dir / "var-lib-fleetdns" / "gai_bench")  # the host's /var/lib/fleetdns
        libc = str(host_dir / "libc.so.6")

        def in_host(argv, **kw):
            return control.exec_in(lab, "lab1", argv, **kw)

        # the bare rate drifts down during a run (each lookup is a new UDP flow through the lab's bridge), so each
        # probed run is compared with the bare runs right before and after it: bare, summary, bare, events, bare
        # (+wire: the wire source too, which here reads every query the loop sends)
        probed = ["summary", "events", "summary+wire", "events+wire"]
        sequence = ["bare"] + [c for config in probed for c in (config, "bare")]
        ratios: dict[str, list[float]] = {c: [] for c in probed}
        rates: dict[str, list[float]] = {c: [] for c in ["bare", *probed]}
        lost = dict.fromkeys(rates, 0)
        for r in range(args.rounds):
            got = []
            for config in sequence:
                mode, _, wire = config.partition("+")
                probe = None if config == "bare" else Running(
                    render.ProbeOptions(mode=mode, libc=libc, sources=("libc", "wire") if wire else ("libc",),
                                        wire_netns=os.stat(f"/run/netns/{lab.layout.netns(1)}").st_ino),
                    tmp / f"lab-{config}-{r}.capture")
                _count, per_s = loop(["/var/lib/fleetdns/gai_bench"], "db.lab", args.seconds, run=in_host)
                if probe is not None:
                    lost[config] += probe.finish().lost
                got.append(per_s)
                rates[config].append(per_s)
                print(f"lab-dns round {r} {config:8} {per_s:10.0f} lookups/s", file=sys.stderr)
            # each probed run against the mean of its two neighbouring bare runs
            for i, config in enumerate(probed):
                ratios[config].append(got[2 * i + 1] / ((got[2 * i] + got[2 * i + 2]) / 2))
    finally:
        lifecycle.down(home)
    return [{"backend": "bpftrace" if c != "bare" else "-", "mode": c, "name": "db.lab (lab DNS)",
             "median_rate": round(statistics.median(rates[c])), "rates": [round(x) for x in rates[c]],
             "ratio": 1.0 if c == "bare" else round(statistics.median(ratios[c]), 3),
             "ratios": [round(x, 3) for x in ratios.get(c, [])], "lost": lost[c]} for c in rates]


def events_loss(args, tmp: Path, bench: str) -> list[dict]:
    base = Path("/sys/fs/cgroup/unified")
    if not (base / "cgroup.procs").exists():
        base = Path("/sys/fs/cgroup")
    group = base / f"fleetdns-bench-{os.getpid()}"
    group.mkdir()
    rows = []
    try:
        cmd = [*prefix(tmp, args.nsswitch, group), bench]
        for rate in args.rates:
            probe = Running(render.ProbeOptions(mode="events", cgroup=str(group)), tmp / f"loss-{rate}.capture")
            count, per_s = loop(cmd, args.name, args.seconds, rate)
            cap = probe.finish()
            rows.append({"target_rate": rate, "achieved_rate": round(per_s), "lookups": count,
                         "recorded": len(cap.events), "lost": cap.lost,
                         "exact": len(cap.events) + cap.lost == count})
            print(f"events at {rate}/s: {rows[-1]}", file=sys.stderr)
    finally:
        group.rmdir()
    return rows


def wire_loss(args, tmp: Path) -> list[dict]:
    """The wire source at paced query rates: W records + lost against the sender's own count."""
    ns = f"fdnsbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    rows = []
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        inode = os.stat(f"/run/netns/{ns}").st_ino
        for rate in args.wire_rates:
            path = tmp / f"wire-{rate}.capture"
            probe = Running(render.ProbeOptions(mode="events", sources=("libc", "wire"), wire_netns=inode), path)
            out = subprocess.run(["ip", "netns", "exec", ns, str(tmp / "dns_send"), str(args.seconds), str(rate)],
                                 capture_output=True, text=True, check=True)
            cap = probe.finish()
            count, _elapsed, per_s = out.stdout.split()
            with open(path, "rb") as f:
                recorded = sum(line.startswith(b"W ") for line in f)
            rows.append({"target_rate": rate, "achieved_rate": round(float(per_s)), "queries": int(count),
                         "recorded": recorded, "lost": cap.lost, "exact": recorded + cap.lost == int(count)})
            print(f"wire at {rate}/s: {rows[-1]}", file=sys.stderr)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="localhost")
    p.add_argument("--rates", type=int, nargs="*", default=[10_000, 25_000, 50_000, 100_000])
    p.add_argument("--wire-rates", type=int, nargs="*", default=[5_000, 10_000, 20_000, 40_000])
    p.add_argument("--nsswitch", action="store_true", help="keep this machine's nsswitch.conf (lab hosts)")
    p.add_argument("--lab-dns", action="store_true", help="only the lab-DNS loop (brings up a one-host lab)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    runner.check_environment(render.ProbeOptions())
    with tempfile.TemporaryDirectory(prefix="fleetdns-bench-") as t:
        tmp = Path(t)
        bench = build(tmp)
        result = {"cpus": os.cpu_count(), "seconds": args.seconds, "rounds": args.rounds}
        if args.lab_dns:
            result["lab_dns_ratio"] = lab_dns_ratio(args, tmp, bench)
        else:
            result["rate_ratio"] = rate_ratio(args, tmp, bench)
            result["events_loss"] = events_loss(args, tmp, bench)
            result["wire_loss"] = wire_loss(args, tmp)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
