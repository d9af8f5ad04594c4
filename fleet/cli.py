"""The ``fleetdns`` command line: options, help texts with examples, and calls into the modules that do the work.

Every command ends through :func:`main`: a :class:`~fleet.errors.FleetError` becomes one line on stderr and the
exit code of its class (``fleet/errors.py``, ``docs/exit-codes.md``); data goes to stdout, progress and errors to
stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from fleet.durations import format_duration
from fleet.errors import CheckUnproven, CheckViolated, ExitCode, FleetError, HostsFailed, UsageError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="fleetdns", prog_name="fleetdns")
def cli() -> None:
    """Which process on which host resolves which DNS name — across a fleet.

    \b
    Stages, each reading what the one before wrote:
      fleetdns deploy INVENTORY        install the probe on every host (Ansible)
      fleetdns capture --duration 10m  record lookups on every host at once
      fleetdns gather [RUN]            pull each host's capture into reports/RUN/
      fleetdns report [RUN] --csv      one merged cross-host report
      fleetdns check --absent old-db   did a change take effect everywhere?
    \b
    Try it on a local fleet of real SSH hosts:
      fleetdns lab up --hosts 3 && fleetdns lab ping && fleetdns lab down

    Exit codes: 0 ok, 1 some hosts failed, 2 usage, 3 bad input, 4 environment, 5 lab failed, 6 check unproven,
    70 internal error, 130 interrupted (docs/exit-codes.md).
    """


# ---- report / diff / check ------------------------------------------------------------------------------------

#: ``--csv`` / ``--json`` given without a value
DEFAULT_PATH = "\0default"
#: rows of a table shown on the terminal (files get every row)
TERMINAL_ROWS = 50


def _by_option(default: str):
    return click.option("--by", "by", metavar="KEYS", default=default, show_default=True,
                        help="Group by these comma-separated keys: host, process, pid, name, function, source.")


@cli.command("report", context_settings=CONTEXT)
@click.argument("run_id", metavar="[RUN]", required=False)
@_by_option("host,process,pid,name")
@click.option("--name", "names", metavar="GLOB", multiple=True, help="Only names matching GLOB (any case; repeat).")
@click.option("--host", "hosts", metavar="GLOB", multiple=True, help="Only hosts matching GLOB (repeat).")
@click.option("--process", "processes", metavar="GLOB", multiple=True, help="Only processes matching GLOB (repeat).")
@click.option("--failed", "failed_only", is_flag=True, help="Only rows with failed lookups.")
@click.option("--top", type=click.IntRange(min=1), metavar="N", help="Only the N rows with the most lookups.")
@click.option("--csv", "csv_path", metavar="[PATH|-]", is_flag=False, flag_value=DEFAULT_PATH,
              help="Write CSV to PATH (default reports/RUN/dns-report.csv; '-': stdout, nothing else there).")
@click.option("--json", "json_path", metavar="[PATH|-]", is_flag=False, flag_value=DEFAULT_PATH,
              help="Write JSON records to PATH (default reports/RUN/dns-report.json; '-': stdout).")
@click.option("--parquet", "parquet_path", metavar="PATH", help="Write Parquet to PATH.")
@click.option("--html", "html_path", metavar="PATH", help="Write a self-contained HTML page with plots to PATH.")
def report_command(run_id: str | None, by: str, names: tuple[str, ...], hosts: tuple[str, ...],
                   processes: tuple[str, ...], failed_only: bool, top: int | None, csv_path: str | None,
                   json_path: str | None, parquet_path: str | None, html_path: str | None) -> None:
    """Merge every host's capture of RUN (default: the newest run) into one report.

    First the coverage of every host (status, window, lookups, lost events, damage, the sources that ran, blind
    spots: a host that was not captured is said so, never read as "no lookups"), then one row per host, process,
    pid and name: lookups, failed, p50/p95 latency (ms, from log2 histograms), first and last time, and the source
    (libc, wire or both; a wire-only lookup's result and latency are unknown). Then the processes the libc probe
    cannot see, when the host scans list any. Names and processes are shown with odd bytes escaped
    (docs/report.md). Options come after RUN.

    \b
    Examples:
      fleetdns report
      fleetdns report 20261125T213000Z --csv
      fleetdns report --csv - | column -ts,
      fleetdns report --by name --failed --top 20
      fleetdns report --by name,source
      fleetdns report --name '*.internal' --host 'web*' --json out.json --html out.html
    """
    from fleet import render, report, store

    run = store.open_run(run_id)
    by_keys = report.parse_by(by)
    filters = report.Filters(names, hosts, processes, failed_only)
    coverage, table, loaded = report.build(run, by_keys, filters, top)
    to_stdout = "-" in (csv_path, json_path)
    if csv_path == "-" and json_path == "-":
        raise UsageError("only one of --csv and --json can write to stdout")
    written = []
    for path, default, write in ((csv_path, "dns-report.csv", render.write_csv),
                                 (json_path, "dns-report.json", render.write_json),
                                 (parquet_path, None, render.write_parquet)):
        if path is None:
            continue
        if path == "-" and write is render.write_parquet:
            raise UsageError("--parquet needs a file path")
        target = run.path / default if path == DEFAULT_PATH else path
        write(table, target)
        if target != "-":
            written.append(target)
    if html_path:
        by_name = report.aggregate(loaded, ["name"], filters)
        render.write_html(html_path, run_id=run.id, coverage=coverage, table=table, by_name=by_name,
                          minutes=filters.apply(loaded.minutes), histogram=filters.apply(loaded.histogram),
                          blind_spots=loaded.blind_spots)
        written.append(html_path)
    console = err if to_stdout else out
    if not to_stdout:
        shown = table.head(top or TERMINAL_ROWS)
        render.print_tables(console, render.coverage_table(coverage, f"coverage of run {run.id}"),
                            render.rich_table(shown, f"DNS lookups, run {run.id}"))
        if len(table) > len(shown):
            err.print(f"{len(table) - len(shown)} more rows (--top N, --csv or --json for all)", markup=False)
    if len(loaded.blind_spots):
        render.print_tables(console, render.rich_table(
            loaded.blind_spots[["host", "pid", "process", "exe", "reason"]],
            "processes the libc probe cannot see (host scan at capture start; the wire source sees their queries)"))
    for path in written:
        err.print(f"wrote {path}", markup=False)
    _warn_incomplete(coverage)


def _warn_incomplete(coverage) -> None:
    incomplete = coverage[~coverage["complete"].fillna(False).astype(bool)]
    if len(incomplete):
        hosts = ", ".join(f"{h} ({s})" for h, s in zip(incomplete["host"], incomplete["status"], strict=True))
        err.print(f"fleetdns: note: {len(incomplete)} of {len(coverage)} hosts not completely captured: {hosts}",
                  markup=False)


@cli.command("diff", context_settings=CONTEXT)
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@_by_option("host,process,name")
@click.option("--all", "include_same", is_flag=True, help="Also list the keys that did not change.")
@click.option("--csv", "csv_path", metavar="PATH|-", help="Write the differences as CSV ('-': stdout).")
@click.option("--json", "json_path", metavar="PATH|-", help="Write the differences as JSON records ('-': stdout).")
def diff_command(run_a: str, run_b: str, by: str, include_same: bool, csv_path: str | None,
                 json_path: str | None) -> None:
    """What appeared, disappeared or changed between RUN_A and RUN_B (e.g. before and after a change).

    Keyed by host, process and name (not pid, which changes on restart). A key is "changed" when its lookups or
    failures differ or its p95 latency moved by a log2 bucket or more; "disappeared" only when its host was
    completely captured in RUN_B — otherwise "not captured". Exit 0 whatever the differences.

    \b
    Examples:
      fleetdns diff 20261124T090000Z 20261125T090000Z
      fleetdns diff 20261124T090000Z 20261125T090000Z --by name --csv -
    """
    from fleet import render, report, store

    a, b = report.load(store.open_run(run_a)), report.load(store.open_run(run_b))
    table = report.diff(a, b, report.parse_by(by, report.DIFF_BY), include_same=include_same)
    if csv_path == "-" and json_path == "-":
        raise UsageError("only one of --csv and --json can write to stdout")
    if csv_path:
        render.write_csv(table, csv_path)
    if json_path:
        render.write_json(table, json_path)
    if "-" not in (csv_path, json_path):
        counts = table["change"].value_counts()
        title = f"changes from {a.run.id} to {b.run.id}: " + ", ".join(
            f"{n} {c}" for c, n in counts.items() if n)
        out.print(render.rich_table(table.head(TERMINAL_ROWS), title if len(table) else title + "none"))
    _warn_incomplete(_both_coverages(a, b))


def _both_coverages(a, b):
    """Both runs' coverage rows, host names prefixed by their run, for the incompleteness note."""
    import pandas as pd

    return pd.concat([x.coverage.assign(host=f"{x.run.id}:" + x.coverage["host"]) for x in (a, b)])


@cli.command("check", context_settings=CONTEXT)
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--absent", metavar="GLOB", multiple=True, help="No host may resolve a name matching GLOB (repeat).")
@click.option("--present", metavar="GLOB", multiple=True, help="Some host must resolve a name matching GLOB.")
def check_command(run_id: str | None, absent: tuple[str, ...], present: tuple[str, ...]) -> None:
    """Verify a change in RUN (default: the newest run): did every host stop resolving the --absent names?

    Exit 0 when proven: every host was completely captured, none resolved an --absent name, and every --present
    glob was resolved somewhere. Exit 1 when violated: the offending host, process, pid, count and last time are
    listed (or the --present globs nobody resolved). Exit 6 when it cannot be proven: nothing wrong was seen, but
    some hosts were not completely captured (failed, unreachable, partial, lost events), so absence is unknown
    there; or the host scan taken at capture start shows a connection to an address a watched --absent name
    resolved to (capture --watch NAME), or processes the libc probe cannot see (static, Go, musl, another libc)
    on a host without the wire source. Globs match names in any case.

    \b
    Examples:
      fleetdns check --absent 'old-db.*' --present new-db.example.com
      fleetdns check 20261125T213000Z --absent 'legacy-*.corp' --absent '10.0.0.5'
    """
    from fleet import render, report, store

    loaded = report.load(store.open_run(run_id))
    result = report.check(loaded, absent, present)
    if len(result.offenders):
        out.print(render.rich_table(result.offenders, f"hosts still resolving an --absent name, run {loaded.run.id}"))
    if len(result.unproven):
        out.print(render.coverage_table(result.unproven, "hosts not completely captured: absence unknown there"))
    if len(result.blind_spots):
        out.print(render.rich_table(result.blind_spots[["host", "pid", "process", "exe", "reason"]],
                                    "processes the libc probe cannot see (host scan at capture start)"))
    for line in result.lines():
        out.print(line, markup=False)
    verdict = result.verdict
    if verdict == "violated":
        what = []
        if len(result.offenders):
            hosts, lookups = int(result.offenders["host"].nunique()), int(result.offenders["lookups"].sum())
            what.append(f"{hosts} {'host' if hosts == 1 else 'hosts'} resolved an --absent name "
                        f"({lookups} {'lookup' if lookups == 1 else 'lookups'})")
        if result.missing:
            what.append("no host resolved " + ", ".join(result.missing))
        raise CheckViolated("; ".join(what))
    if verdict == "unproven":
        why = []
        if len(result.unproven):
            why.append(f"{len(result.unproven)} hosts not completely captured ({', '.join(result.unproven['host'])})")
        if len(result.evidence):
            why.append("pre-capture evidence on " + ", ".join(sorted(set(result.evidence["host"].astype(str)))))
        if result.uncovered_hosts:
            why.append("processes the libc probe cannot see, without the wire source, on "
                       + ", ".join(result.uncovered_hosts))
        missing = f"; not seen: {', '.join(result.missing)}" if result.missing else ""
        raise CheckUnproven(f"cannot prove it: {'; '.join(why)}{missing}")
    out.print(f"proven: {len(loaded.coverage)} hosts completely captured, no --absent name resolved"
              + (", every --present name seen" if present else ""), markup=False)


def source_options(command):
    """``--source`` and ``--wire-scope``, the same on ``probe`` and ``capture`` (fleet/probes/render.py)."""
    command = click.option(
        "--wire-scope", type=click.Choice(["auto", "all", "netns"]), default="auto", show_default=True,
        help="The wire source's network namespaces: all (containers' too), or netns (the probe's own); auto: "
        "netns when the probe runs inside a container or lab host, else all.")(command)
    return click.option(
        "--source", type=click.Choice(["libc", "wire", "both"]), default=None,
        help="libc: the resolver functions (uprobes); wire: DNS queries sent to UDP port 53 (syscall tracepoints, "
        "bpftrace; sees dig, Go, static binaries). Default: both with bpftrace, libc with stap.")(command)


# ---- capture, gather, runs -------------------------------------------------------------------------------------


@cli.command("capture", context_settings=CONTEXT)
@click.option("-i", "--inventory", "inventory_path", metavar="INVENTORY",
              help="Ansible inventory (default: the one of the last 'fleetdns deploy').")
@click.option("--duration", required=True, metavar="DURATION", help="How long each host records: 90s, 10m, 1h30m.")
@click.option("--limit", metavar="PATTERN", help="Only the hosts matching this Ansible pattern.")
@click.option("--backend", type=click.Choice(["auto", "stap", "bpftrace"]), default="auto", show_default=True,
              help="Probe backend (auto: the first that passed the host's preflight).")
@click.option("--mode", type=click.Choice(["events", "summary"]), default="events", show_default=True,
              help="events: one record per lookup; summary: in-kernel counts and latency histograms.")
@click.option("--names", multiple=True, metavar="GLOB", help="Only names matching this glob (repeatable).")
@click.option("--watch", multiple=True, metavar="NAME",
              help="Resolve NAME on each host at the start, for pre-capture evidence (repeatable; docs/scan.md).")
@source_options
@click.option("--label", metavar="TEXT", help="A note kept in the run's manifest (e.g. a change ticket).")
@click.option("--max-bytes", metavar="SIZE", help="Cap each host's capture file (e.g. 500M); the host stops there.")
@click.option("--detach", is_flag=True, help="Return once every reachable host records; gather later.")
@click.option("--keep-remote", is_flag=True, help="Keep the hosts' copies after a verified gather.")
@click.option("--compress", is_flag=True, help="Store the gathered files gzip'd (raw/HOST.capture.gz).")
def capture_command(inventory_path, duration, limit, backend, mode, names, watch, source, wire_scope, label,
                    max_bytes, detach, keep_remote, compress) -> None:
    """Record DNS lookups on every host at once, for a fixed duration, then gather the captures.

    The run id (UTC start time) is the first line on stdout. Each host records in the background under its own
    deadline, so a dropped connection or a killed controller neither stops it early nor keeps it running late.
    Ctrl-C stops every host now and gathers what exists. Exit 0 when every host was captured (or empty),
    1 when any is partial, failed or unreachable (the others' data is kept).

    Before its recorder starts, each host takes a scan (raw/HOST.scan.json): the processes the libc probe
    cannot see, the established TCP connections, and what each --watch NAME resolves to there.

    \b
    Examples:
      fleetdns capture --duration 10m
      fleetdns capture -i inventory/prod.ini --duration 1h30m --limit 'web*' --detach
      fleetdns capture --duration 30s --names '*.lab' --max-bytes 200M
      fleetdns capture --duration 1h --watch old-db.lab
    """
    from fleet import capture, deploy, inventory
    from fleet.durations import parse_duration, parse_size

    seconds = parse_duration(duration, what="--duration")
    cap = parse_size(max_bytes, what="--max-bytes") if max_bytes else None
    _check_watch(watch)
    inventory_file = inventory_path or deploy.last_inventory()  # not "source": that is --source's value
    if inventory_file is None:
        raise UsageError("no inventory: pass -i INVENTORY or run 'fleetdns deploy INVENTORY' first")
    hosts = inventory.load(inventory_file, limit)
    options = {"backend": backend, "mode": mode, "duration_s": seconds, "names": list(names), "max_bytes": cap,
               "label": label, "cgroup": None, "interval_s": None,
               "source": source, "wire_scope": wire_scope}
    options["watch"] = list(dict.fromkeys(watch))
    run = capture.new(str(Path(inventory_file).resolve()), limit, hosts, options, ["fleetdns", *sys.argv[1:]])
    out.print(run.id)
    fleet = capture.connect(hosts)
    try:
        capture.start(run, fleet, options, on_host=_print_host)
        if detach:
            out.print(run.id)
            _exit_status(run, ("running",), "not recording")
            return
        _watch_and_gather(run, fleet, keep_remote=keep_remote, compress=compress)
    finally:
        for conn in fleet.values():
            conn.close()


def _check_watch(names: tuple[str, ...]) -> None:
    """A --watch name is one DNS name: 1-253 bytes, no whitespace or control characters (fleet/hostscan.py)."""
    from fleet.hostscan import MAX_WATCH, check_watch_name

    for name in names:
        if why := check_watch_name(name):
            raise UsageError(f"--watch {name!r}: {why}")
    if len(set(names)) > MAX_WATCH:
        raise UsageError(f"at most {MAX_WATCH} --watch names, not {len(set(names))}")


@cli.command("gather", context_settings=CONTEXT)
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--now", is_flag=True, help="Stop every host's capture now instead of waiting for its end.")
@click.option("--keep-remote", is_flag=True, help="Keep the hosts' copies after a verified gather.")
@click.option("--compress", is_flag=True, help="Store the gathered files gzip'd (raw/HOST.capture.gz).")
def gather_command(run_id, now, keep_remote, compress) -> None:
    """Wait for RUN's end (default: the newest run), then pull every host's capture that is not yet local.

    Resumable and idempotent: verified files are left alone, an interrupted transfer continues from where it
    stopped, a host that failed is tried again. Exit codes as for capture.

    \b
    Examples:
      fleetdns gather
      fleetdns gather 20261125T213000Z --now
    """
    from fleet import capture, inventory, store

    run = store.open_run(run_id)
    known = {h.name: h for h in inventory.load(run.manifest["inventory"], run.manifest.get("limit"))}
    fleet = capture.connect([known[h] for h in run.manifest["hosts"] if h in known])
    try:
        if now:
            capture.stop(run, fleet)
        _watch_and_gather(run, fleet, keep_remote=keep_remote, compress=compress)
    finally:
        for conn in fleet.values():
            conn.close()


@cli.command("runs", context_settings=CONTEXT)
def runs_command() -> None:
    """List the runs in the local run store, newest first.

    \b
    Example:
      fleetdns runs
    """
    from fleet import gather, store

    # ids, times and counts are what people copy and grep: never wrapped or cut, whatever the terminal's width
    table = Table(Column("run", no_wrap=True, min_width=16), Column("created (UTC)", no_wrap=True, min_width=19),
                  Column("hosts", no_wrap=True), "mode", "duration", "label")
    for run in store.list_runs():
        m = run.manifest
        opts = m.get("options") or {}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(gather.summary(run).items()))
        table.add_row(run.id, m.get("created", "")[:19].replace("T", " "), counts, opts.get("mode") or "",
                      format_duration(opts["duration_s"]) if opts.get("duration_s") else "", opts.get("label") or "")
    out.print(table)


def _print_host(host: str, entry: dict) -> None:
    style = "green" if entry["status"] in ("running", "captured", "empty") else "red"
    detail = f" ({entry['backend']})" if entry.get("backend") and entry["status"] == "running" else ""
    reason = f": {entry['reason']}" if entry.get("reason") else ""
    err.print(f"[bold]{escape(f'[{host}]')}[/bold] [{style}]{entry['status']}[/]{escape(detail + reason)}")


def _watch_and_gather(run, fleet, *, keep_remote: bool, compress: bool) -> None:
    """The live view until every host ended, then the gather and the results table; Ctrl-C stops the hosts
    first and gathers what they have."""
    from rich.live import Live

    from fleet import capture, gather

    view = capture.LiveView(run)
    interrupted = False
    try:
        with Live(view, console=err, transient=True, refresh_per_second=2):
            capture.watch(run, fleet, view)
    except KeyboardInterrupt:
        interrupted = True
        err.print("stopping every host and gathering what they recorded…")
        capture.stop(run, fleet)
        capture.watch(run, fleet, view, until=time.time() + 30)
    gather.pull(run, fleet, keep_remote=keep_remote, compress=compress, on_host=_print_host)
    table = Table(Column("host", no_wrap=True), "status", "events", "lost", "bytes", "window (UTC)", "reason",
                  title=f"run {run.id}")
    for host, e in run.manifest["hosts"].items():
        window = e.get("window") or {}
        span = f"{(window.get('start') or '')[11:19]}–{(window.get('end') or '')[11:19]}" if window.get("start") else ""
        table.add_row(host, e["status"], _num(e.get("events")), _num(e.get("lost")), _num(e.get("bytes")), span,
                      e.get("reason") or "")
    out.print(table)
    err.print(f"run store: {run.path}")
    if interrupted:
        raise KeyboardInterrupt
    _exit_status(run, gather.OK_STATUSES, "not captured")


def _num(value) -> str:
    return "" if value is None else str(value)


def _exit_status(run, good: tuple[str, ...], what: str) -> None:
    hosts = run.manifest["hosts"]
    bad = [f"{h} ({e['status']})" for h, e in hosts.items() if e["status"] not in good]
    if bad:
        raise HostsFailed(f"{len(bad)} of {len(hosts)} hosts {what}: {', '.join(bad)}")


# ---- deploy -----------------------------------------------------------------------------------------------------


@cli.command("deploy", context_settings=CONTEXT)
@click.argument("inventory_path", metavar="INVENTORY")
@click.option("--limit", metavar="PATTERN", help="Only the hosts matching this Ansible pattern.")
@click.option("--check", is_flag=True, help="Ansible check mode: report what would change, change nothing.")
@click.option("--backend", type=click.Choice(["auto", "stap", "bpftrace"]), default="auto", show_default=True,
              help="The backend a host needs working to count as ready (auto: any).")
@click.option("-v", "--verbose", count=True, help="Show every task result (-vv…: Ansible's own verbosity too).")
def deploy_command(inventory_path: str, limit: str | None, check: bool, backend: str, verbose: int) -> None:
    """Install SystemTap + kernel headers and bpftrace on every host of INVENTORY, deploy the probe, and check it.

    INVENTORY is anything Ansible accepts: an INI or YAML file, or a directory with group_vars/. Each host ends
    with a preflight that attaches every installed backend and checks it sees a real lookup; a host is ready when
    its backend passed. Exit 0 when every targeted host is ready, 1 when some are not (the others stay deployed).

    \b
    Examples:
      fleetdns deploy inventory/lab.ini
      fleetdns deploy inventory/prod/ --limit 'web*' --check
      fleetdns deploy inventory/prod.ini --backend stap -v
    """
    from rich.live import Live

    from fleet import deploy
    from fleet.progress import PlaybookProgress

    progress = PlaybookProgress(verbose=verbose > 0)
    with Live(progress.spinner, console=err, transient=True, refresh_per_second=8) as live:
        progress.console = live.console
        reports, run = deploy.deploy(inventory_path, limit=limit, check=check, backend=backend,
                                     verbosity=max(0, verbose - 1), on_event=progress.on_event)
    table = Table("host", "result", "ready", "backends", "libc", "problems", title="fleetdns deploy" +
                  (" (check mode)" if check else ""))
    for r in reports:
        ready = "n/a" if check else ("yes" if r.ready else "no")
        problems = "; ".join(p if len(p) <= 160 else p[:159] + "…" for p in r.problems)
        table.add_row(r.host, r.status, ready, ", ".join(r.backends) or "-", r.libc or "-", problems)
    out.print(table)
    err.print(f"ansible-runner artifacts: {run.artifacts}")
    bad = [r.host for r in reports if (r.status in ("failed", "unreachable") if check else not r.ready)]
    if bad:
        raise HostsFailed(f"{len(bad)} of {len(reports)} hosts not ready: {', '.join(bad)}")


# ---- probe (this machine) ------------------------------------------------------------------------------------


@cli.command("probe", context_settings=CONTEXT)
@click.option("--backend", type=click.Choice(["bpftrace", "stap"]), default="bpftrace", show_default=True,
              help="The tracer that runs the probe.")
@click.option("--mode", type=click.Choice(["events", "summary"]), default="events", show_default=True,
              help="events: one record per lookup; summary: counted in the kernel, lossless at any rate.")
@click.option("--duration", metavar="D", help="Stop after D (90s, 10m, 1h30m); default: until Ctrl-C.")
@click.option("-o", "--output", metavar="FILE|-",
              help="Write the capture here (created 0600); '-' is stdout. Default: '-', or nothing with --table.")
@click.option("--table", is_flag=True, help="Show a live table of lookups on stderr (events mode).")
@click.option("--names", "names", metavar="GLOB", multiple=True,
              help="Only names matching GLOB, case-insensitive, matched in the kernel (repeatable; '*' once).")
@click.option("--libc", metavar="PATH", help="The libc file to hook (default: this machine's).")
@click.option("--binary", "binaries", metavar="PATH", multiple=True,
              help="Also hook this program (a static binary carrying its own resolver; repeatable).")
@click.option("--cgroup", metavar="PATH", help="Only processes in this cgroup v2 directory (bpftrace).")
@source_options
@click.option("--interval", metavar="D", default="60s", show_default=True,
              help="Summary mode: print the in-kernel counts this often.")
@click.option("--stap-runtime", type=click.Choice(["module", "bpf"]), default=None,
              help="stap only: kernel module (real hosts with kernel headers) or BPF. Default: module when the "
              "kernel's build tree is real, else bpf.")
def probe_command(backend: str, mode: str, duration: str | None, output: str | None, table: bool,
                  names: tuple[str, ...], libc: str | None, binaries: tuple[str, ...], cgroup: str | None,
                  source: str | None, wire_scope: str, interval: str, stap_runtime: str | None) -> None:
    """Record DNS lookups on THIS machine: which process resolves which name (root).

    The single-host probe, and the same code the fleet's hosts run. Ctrl-C (or --duration running out) ends
    it cleanly with the capture's trailer written; exit 0. Exit 1 when the tracer stopped by itself (the
    capture so far is kept), 4 when not root or the tracer is missing, 3 for a bad --libc/--binary file.

    \b
    Examples:
      fleetdns probe --table
      fleetdns probe --duration 10m --output dns.capture
      fleetdns probe --mode summary --duration 1h --names '*.corp.example' -o busy.capture
      fleetdns probe --backend stap --table --names 'old-db.*'
      fleetdns probe --source wire --duration 1m -o wire.capture
    """
    from rich.live import Live

    from fleet.durations import parse_duration
    from fleet.probe_view import LookupTable
    from fleet.probes import render, runner

    seconds = parse_duration(duration) if duration is not None else None
    every = parse_duration(interval, what="interval")
    if table and mode != "events":
        raise UsageError("--table shows single lookups: use it with --mode events")
    opts = render.ProbeOptions(backend=backend, mode=mode, libc=libc, binaries=binaries, names=names,
                               cgroup=cgroup, interval=max(1, round(every)), stap_runtime=stap_runtime,
                               sources=render.resolve_sources(source, backend),
                               wire_netns=render.wire_netns(wire_scope))
    if output is None:
        output = os.devnull if table else "-"
    view = LookupTable() if table else None
    if view is not None:
        with Live(view, console=err, refresh_per_second=4, transient=False):
            trailer = runner.run_probe(opts, output, duration=seconds, table_callback=view.add)
    else:
        trailer = runner.run_probe(opts, output, duration=seconds)
    if trailer["lost"]:
        err.print(f"fleetdns probe: {trailer['lost']} events lost (counted in the capture's trailer; "
                  "--mode summary loses none)", markup=False)
    if trailer["stop_reason"] == "backend-exit":
        detail = "; ".join(trailer["backend_messages"][-3:]) or f"exit status {trailer['exit_status']}"
        raise HostsFailed(f"{backend} stopped by itself ({detail}); the capture so far is kept")


# ---- lab --------------------------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def lab() -> None:
    """A local fleet of real SSH hosts on this machine: the demo, and what the tests run against (root).

    \b
    Each host lab1…labN has its own network, mount, UTS and pid namespace, sshd and host key, /root,
    /etc/hosts, resolv.conf (pointing at the lab's DNS server) and a private copy of libc.
    State lives in .lab/ and the inventory in inventory/lab.ini, under $FLEETDNS_HOME (default: here).
    \b
    Examples:
      fleetdns lab up --hosts 5
      ansible -i "$(fleetdns lab inventory)" all -m ping
      fleetdns lab exec lab2 -- getent hosts db.lab
      fleetdns lab down
    """


@lab.command("up", context_settings=CONTEXT)
@click.option("--hosts", "hosts", type=int, default=3, show_default=True, help="Number of hosts (1–200).")
@click.option(
    "--mode",
    type=click.Choice(["overlay", "bind"]),
    default="overlay",
    show_default=True,
    help="overlay: each host's / is a copy-on-write overlay of this machine's; bind: the machine's own / with "
    "only the host's private paths bound over it.",
)
def lab_up(hosts: int, mode: str) -> None:
    """Bring the lab fleet up (idempotent: an identical running lab is left alone; leftovers are cleaned first).

    \b
    Examples:
      fleetdns lab up
      fleetdns lab up --hosts 50 --mode bind
    """
    from fleet.lab import lifecycle

    started = time.monotonic()
    built, changed = lifecycle.up(hosts, mode)
    verb = "up" if changed else "already up"
    err.print(
        f"lab {verb}: {built.hosts} hosts ({built.mode}) on {built.layout.network} "
        f"in {time.monotonic() - started:.2f}s; inventory {built.layout.inventory}"
    )


@lab.command("down", context_settings=CONTEXT)
def lab_down() -> None:
    """Stop every host and remove the lab: namespaces, links, cgroups, mounts, state and inventory.

    \b
    Example:
      fleetdns lab down
    """
    from fleet.lab import lifecycle

    err.print("lab down" if lifecycle.down() else "no lab was up")


@lab.command("status", context_settings=CONTEXT)
def lab_status() -> None:
    """Show each host: address, init pid, network, sshd, and whether SSH answers.

    \b
    Example:
      fleetdns lab status
    """
    from fleet.lab import control, lifecycle

    current = lifecycle.load()
    table = Table("host", "address", "init pid", "network", "sshd", "ssh answers")
    rows = control.status(current)
    for row in rows:
        table.add_row(row.name, row.address, str(row.init_pid or "-"), row.network, row.sshd,
                      "yes" if row.ssh_answers else "no")
    out.print(table)
    down = [row.name for row in rows if row.init_pid is None]
    if down:
        raise HostsFailed(f"hosts not running: {', '.join(down)}")


@lab.command("inventory", context_settings=CONTEXT)
def lab_inventory() -> None:
    """Print the path of the lab's Ansible inventory.

    \b
    Example:
      ansible -i "$(fleetdns lab inventory)" all -m ping
    """
    from fleet.lab import lifecycle

    click.echo(lifecycle.load().layout.inventory)


@lab.command("exec", context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(host: str, command: tuple[str, ...]) -> int:
    """Run COMMAND as a process inside HOST (works while its network or sshd is down); exits with its status.

    \b
    Examples:
      fleetdns lab exec lab1 -- getent ahosts db.lab
      fleetdns lab exec lab3 -- ps -ef
    """
    from fleet.lab import control, lifecycle

    return control.exec_in(lifecycle.load(), host, command).returncode


@lab.command("net", context_settings=CONTEXT)
@click.argument("host")
@click.argument("state", type=click.Choice(["down", "up"]))
def lab_net(host: str, state: str) -> None:
    """Cut (down) or restore (up) HOST's network, like pulling its cable; its processes keep running.

    \b
    Example:
      fleetdns lab net lab2 down
    """
    from fleet.lab import control, lifecycle

    control.set_network(lifecycle.load(), host, state == "up")
    err.print(f"{host}: network {state}")


@lab.command("sshd", context_settings=CONTEXT)
@click.argument("host")
@click.argument("action", type=click.Choice(["stop", "start"]))
def lab_sshd(host: str, action: str) -> None:
    """Stop or start HOST's listening sshd; open sessions and other processes are left alone.

    \b
    Example:
      fleetdns lab sshd lab2 stop
    """
    from fleet.lab import control, lifecycle

    control.set_sshd(lifecycle.load(), host, action == "start")
    err.print(f"{host}: sshd {'started' if action == 'start' else 'stopped'}")


@lab.command("ping", context_settings=CONTEXT)
def lab_ping() -> None:
    """Run Ansible's ping module on every lab host through ansible-runner; exit 1 if any host fails.

    \b
    Example:
      fleetdns lab ping
    """
    from fleet import ansible
    from fleet.lab import lifecycle

    current = lifecycle.load()
    result = ansible.run_module(current.layout.inventory, "ping", data_dir=current.layout.state / "ansible")
    table = Table("host", "result", "message")
    for host in current.names():
        r = result.hosts.get(host, ansible.HostResult(host, "unreachable", "no result from Ansible"))
        table.add_row(host, "pong" if not r.failed else r.status, r.message)
    out.print(table)
    failed = [host for host in current.names() if host not in result.hosts or result.hosts[host].failed]
    if failed:
        raise HostsFailed(f"{len(failed)} of {current.hosts} hosts failed: {', '.join(failed)}")


# ---- the one funnel -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every outcome becomes an exit code from :class:`~fleet.errors.ExitCode`."""
    try:
        result = cli.main(args=argv, prog_name="fleetdns", standalone_mode=False)
        code = result if isinstance(result, int) else ExitCode.OK
    except FleetError as exc:
        err.print(f"fleetdns: error: {exc}", markup=False)
        code = exc.exit_code
    except click.exceptions.Abort:
        err.print("fleetdns: interrupted", markup=False)
        code = ExitCode.INTERRUPTED
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        err.print(f"fleetdns: error: {exc.format_message()}{where}", markup=False)
        code = ExitCode.USAGE
    except click.ClickException as exc:
        err.print(f"fleetdns: error: {exc.format_message()}", markup=False)
        code = ExitCode.USAGE
    except KeyboardInterrupt:
        err.print("fleetdns: interrupted", markup=False)
        code = ExitCode.INTERRUPTED
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("FLEETDNS_DEBUG"):
            raise
        err.print(f"fleetdns: internal error: {type(exc).__name__}: {exc} (FLEETDNS_DEBUG=1 shows the traceback)",
                  markup=False)
        code = ExitCode.INTERNAL
    sys.exit(int(code))
