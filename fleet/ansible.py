"""The only module that imports ansible_runner: run Ansible, read per-host results from its structured output.

Per-host status comes from ansible-runner's stats (``ok``/``changed``/``failures``/``dark``) and the message of a
failed host from its ``runner_on_failed`` / ``runner_on_unreachable`` events — never from scraped stdout. Each run
gets a unique ``ident``; its artifacts stay under ``DATA_DIR/artifacts/IDENT/`` as the record of what happened.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner

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


def environment() -> dict[str, str]:
    """ansible-runner starts ``ansible`` by name: put this interpreter's bin directory first on PATH."""
    bindir = os.path.dirname(sys.executable)
    return {"PATH": f"{bindir}:{os.environ.get('PATH', os.defpath)}", "ANSIBLE_HOST_KEY_CHECKING": "True"}


def run_module(inventory: Path, module: str, *, data_dir: Path, args: str = "", pattern: str = "all") -> AnsibleRun:
    """Run one Ansible *module* on the hosts of *inventory* matching *pattern*."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = uuid.uuid4().hex
    runner = ansible_runner.run(
        private_data_dir=str(data_dir),
        ident=ident,
        inventory=str(inventory),
        host_pattern=pattern,
        module=module,
        module_args=args or None,
        envvars=environment(),
        quiet=True,
    )
    return AnsibleRun(ident, data_dir / "artifacts" / ident, runner.rc, host_results(runner))


def host_results(runner) -> dict[str, HostResult]:
    """Per-host results of a finished ansible-runner run, from its stats and events."""
    messages = {}
    for event in runner.events:
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data", {})
            res = data.get("res", {})
            messages[data.get("host")] = str(res.get("msg") or res.get("stderr") or res)[:300]
    stats = runner.stats or {}
    key_of = {"unreachable": "dark", "failed": "failures", "changed": "changed", "ok": "ok", "skipped": "skipped"}
    results = {}
    for status in STATUSES:
        for host in stats.get(key_of[status], {}):
            results.setdefault(host, HostResult(host, status, messages.get(host, "")))
    return results
