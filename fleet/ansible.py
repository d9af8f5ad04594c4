"""The only module that imports ansible_runner: run Ansible, read per-host results from its structured output.

Per-host status comes from ansible-runner's stats (``ok``/``changed``/``failures``/``dark``) and the message of a
failed host from its ``runner_on_failed`` / ``runner_on_unreachable`` events — never from scraped stdout. Each run
gets a unique ``ident``; its artifacts stay under ``DATA_DIR/artifacts/IDENT/`` as the record of what happened.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner

from fleet.errors import ExitCode, FleetError

#: a host's status, worst first; a host counts as failed when it is "failed" or "unreachable"
STATUSES = ("unreachable", "failed", "changed", "ok", "skipped")


@dataclass(frozen=True)
class HostResult:
    host: str
    status: str  #: one of STATUSES
    message: str = ""  #: why it failed; empty otherwise

    @property
    def failed(self) -> bool:
        return self.status in ("unreachable", "failed")


@dataclass
class AnsibleRun:
    ident: str
    artifacts: Path
    rc: int
    hosts: dict[str, HostResult] = field(default_factory=dict)

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.hosts.values() if r.failed]


class AnsibleFailed(FleetError):
    """Ansible stopped before any host ran (a playbook error, a bad option); carries its own first error line."""

    exit_code = ExitCode.HOSTS_FAILED

    def __init__(self, run: AnsibleRun) -> None:
        try:
            text = re.sub(r"\x1b\[[0-9;]*m", "", (run.artifacts / "stdout").read_text(errors="replace"))
        except OSError:
            text = ""
        first = next((line.strip() for line in text.splitlines() if "ERROR" in line), f"exit status {run.rc}")
        super().__init__(f"Ansible failed before any host ran: {first}", hint=f"see {run.artifacts}/stdout")


def environment() -> dict[str, str]:
    """ansible-runner starts ``ansible`` by name: put this interpreter's bin directory first on PATH."""
    bindir = os.path.dirname(sys.executable)
    return {"PATH": f"{bindir}:{os.environ.get('PATH', os.defpath)}", "ANSIBLE_HOST_KEY_CHECKING": "True"}


def run_module(inventory: Path, module: str, *, data_dir: Path, args: str = "", pattern: str = "all",
               env: dict[str, str] | None = None) -> AnsibleRun:
    """Run one Ansible *module* on the hosts of *inventory* matching *pattern*; *env* adds environment variables
    (``ANSIBLE_*`` settings) for this run."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = uuid.uuid4().hex
    runner = ansible_runner.run(
        private_data_dir=str(data_dir),
        ident=ident,
        inventory=str(inventory),
        host_pattern=pattern,
        module=module,
        module_args=args or None,
        envvars={**environment(), **(env or {})},
        quiet=True,
    )
    return AnsibleRun(ident, data_dir / "artifacts" / ident, runner.rc, host_results(runner))


def one_line(message: str, limit: int = 300) -> str:
    """A multi-line Ansible/ssh message as one line: its first and last lines, without ssh's ``@@@`` banners.

    ssh puts the reason last ("Host key verification failed."), Ansible puts the context first."""
    lines = [line.strip() for line in re.sub(r"@{3,}", "", message).splitlines() if line.strip()]
    text = lines[0] if len(lines) <= 1 else f"{lines[0]} … {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_playbook(
    playbook: Path,
    inventory: Path,
    *,
    data_dir: Path,
    extravars: dict | None = None,
    limit: str | None = None,
    check: bool = False,
    verbosity: int = 0,
    on_event: Callable[[dict], None] | None = None,
) -> tuple[AnsibleRun, list[dict]]:
    """Run *playbook* on *inventory*; returns the run and its events (ansible-runner's dicts, in order).

    *on_event* sees every event as it happens (for live progress)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = uuid.uuid4().hex

    def handler(event: dict) -> bool:
        if on_event:
            on_event(event)
        return True  # keep the event in the artifacts

    runner = ansible_runner.run(
        private_data_dir=str(data_dir),
        ident=ident,
        playbook=str(playbook),
        inventory=str(inventory),
        limit=limit,
        extravars=extravars or {},
        cmdline="--check" if check else None,
        verbosity=verbosity or None,
        envvars=environment(),
        event_handler=handler,
        quiet=True,
    )
    events = list(runner.events)
    return AnsibleRun(ident, data_dir / "artifacts" / ident, runner.rc, host_results(runner)), events


def host_results(runner) -> dict[str, HostResult]:
    """Per-host results of a finished ansible-runner run, from its stats and events."""
    messages = {}
    for event in runner.events:
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data", {})
            res = data.get("res", {})
            messages[data.get("host")] = one_line(str(res.get("msg") or res.get("stderr") or res))
    stats = runner.stats or {}
    key_of = {"unreachable": "dark", "failed": "failures", "changed": "changed", "ok": "ok", "skipped": "skipped"}
    results = {}
    for status in STATUSES:
        for host in stats.get(key_of[status], {}):
            results.setdefault(host, HostResult(host, status, messages.get(host, "")))
    return results
