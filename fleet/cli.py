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
from fleet.errors import ExitCode, FleetError, HostsFailed, NotImplementedYet, UsageError

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

    Exit codes: 0 ok, 1 some hosts failed, 2 usage, 3 bad input, 4 environment, 5 lab failed, 70 internal error,
    130 interrupted (docs/exit-codes.md).
    """


# ---- not implemented yet ---------------------------------------------------------------------------------------


def pending(name: str, help_text: str) -> None:
    """Register *name* as a command that exists in the interface but is not built yet (exit 2)."""

    @cli.command(name, help=help_text, context_settings={**CONTEXT, "ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise NotImplementedYet(name)


pending("report", """Merge every host's capture of RUN into one report: table, CSV, JSON, Parquet or HTML.

\b
Examples:
  fleetdns report --csv
  fleetdns report 20261125T213000Z --by name --failed""")
pending("diff", """What appeared, disappeared or changed between two runs (before and after a change).

\b
Example:
  fleetdns diff 20261124T090000Z 20261125T090000Z""")
pending("check", """Verify a change: exit 0 when no host resolved an --absent name, 1 when one did.

\b
Example:
  fleetdns check --absent 'old-db.*' --present new-db.example.com""")


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
@click.option("--label", metavar="TEXT", help="A note kept in the run's manifest (e.g. a change ticket).")
@click.option("--max-bytes", metavar="SIZE", help="Cap each host's capture file (e.g. 500M); the host stops there.")
@click.option("--detach", is_flag=True, help="Return once every reachable host records; gather later.")
@click.option("--keep-remote", is_flag=True, help="Keep the hosts' copies after a verified gather.")
@click.option("--compress", is_flag=True, help="Store the gathered files gzip'd (raw/HOST.capture.gz).")
def capture_command(inventory_path, duration, limit, backend, mode, names, label, max_bytes, detach, keep_remote,
                    compress) -> None:
    """Record DNS lookups on every host at once, for a fixed duration, then gather the captures.

    The run id (UTC start time) is the first line on stdout. Each host records in the background under its own
    deadline, so a dropped connection or a killed controller neither stops it early nor keeps it running late.
    Ctrl-C stops every host now and gathers what exists. Exit 0 when every host was captured (or empty),
    1 when any is partial, failed or unreachable (the others' data is kept).

    \b
    Examples:
      fleetdns capture --duration 10m
      fleetdns capture -i inventory/prod.ini --duration 1h30m --limit 'web*' --detach
      fleetdns capture --duration 30s --names '*.lab' --max-bytes 200M
    """
    from fleet import capture, deploy, inventory
    from fleet.durations import parse_duration, parse_size

    seconds = parse_duration(duration, what="--duration")
    cap = parse_size(max_bytes, what="--max-bytes") if max_bytes else None
    source = inventory_path or deploy.last_inventory()
    if source is None:
        raise UsageError("no inventory: pass -i INVENTORY or run 'fleetdns deploy INVENTORY' first")
    hosts = inventory.load(source, limit)
    options = {"backend": backend, "mode": mode, "duration_s": seconds, "names": list(names), "max_bytes": cap,
               "label": label, "cgroup": None, "interval_s": None}
    run = capture.new(str(Path(source).resolve()), limit, hosts, options, ["fleetdns", *sys.argv[1:]])
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
