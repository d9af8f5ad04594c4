"""Live progress of an Ansible run on stderr, from ansible-runner's events: the current task with running counts,
and one ``[host]`` line per change or failure (per result with ``verbose``)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.spinner import Spinner

from fleet.ansible import one_line

OUTCOMES = {"runner_on_ok": "ok", "runner_on_failed": "failed", "runner_on_unreachable": "unreachable"}
STYLES = {"ok": "green", "changed": "yellow", "failed": "red", "unreachable": "red"}


class PlaybookProgress:
    def __init__(self, verbose: bool = False, console: Console | None = None) -> None:
        self.verbose = verbose
        self.console = console or Console(stderr=True)
        self.spinner = Spinner("dots", text="starting Ansible")
        self.counts = dict.fromkeys(STYLES, 0)
        self.task = ""

    def on_event(self, event: dict) -> None:
        kind, data = event.get("event", ""), event.get("event_data", {})
        if kind == "playbook_on_task_start":
            self.task = data.get("task", "")
        outcome = OUTCOMES.get(kind)
        if outcome and not data.get("ignore_errors"):
            res = data.get("res", {})
            if outcome == "ok" and res.get("changed"):
                outcome = "changed"
            self.counts[outcome] += 1
            if outcome != "ok" or self.verbose:
                reason = f": {one_line(str(res.get('msg', '')))}" if outcome in ("failed", "unreachable") else ""
                host = escape(f"[{data.get('host', '?')}]")
                self.console.print(
                    f"[bold]{host}[/bold] [{STYLES[outcome]}]{outcome}[/] {escape(data.get('task', '') + reason)}"
                )
        totals = " ".join(f"{k}={v}" for k, v in self.counts.items())
        self.spinner.update(text=f"{escape(self.task)}  [dim]{totals}[/dim]")
