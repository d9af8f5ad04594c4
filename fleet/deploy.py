"""``fleetdns deploy``: run ``playbooks/deploy.yml`` on an inventory and say, per host, whether it is ready.

A host is *ready* when Ansible reached it, nothing failed, and its preflight (``fleet/preflight.py``, run by the
playbook's last task) found at least one working probe backend — the one asked for with ``--backend``, or any with
``auto``. The preflight's JSON (also kept on the host as ``/var/lib/fleetdns/host.json``) is read from the task's
structured event, not from scraped output. The last deploy is remembered in ``$FLEETDNS_HOME/.fleetdns/`` so that
``capture`` can default to its inventory.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import fleet
from fleet import ansible, inventory
from fleet.ansible import AnsibleFailed
from fleet.errors import EnvironmentProblem, UsageError
from fleet.home import state_dir

BACKENDS = ("auto", "stap", "bpftrace")
PREFLIGHT_TASK = "Run the preflight"
PACKAGE = Path(fleet.__file__).resolve().parent
PLAYBOOK = PACKAGE.parent / "playbooks" / "deploy.yml"
#: the parts of the package a host runs (standard library only), relative to the package directory
HOST_FILES = ("__init__.py", "errors.py", "capture_format.py", "preflight.py", "hostrun.py", "private.py", "store.py",
              "home.py", "hostscan.py")


def build_host_zip() -> Path:
    """The files hosts run (no caches) as one importable zip, byte-identical for identical sources — so the
    playbook's copy of it is one transfer and idempotent. Hosts put it on PYTHONPATH."""
    members = [*HOST_FILES, *sorted(f"probes/{p.name}" for p in (PACKAGE / "probes").iterdir()
                                    if p.is_file() and p.suffix != ".pyc")]
    target = state_dir() / "fleetdns-host.zip"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in members:
            info = zipfile.ZipInfo(f"fleet/{name}", date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, (PACKAGE / name).read_bytes(), zipfile.ZIP_DEFLATED)
    tmp.rename(target)
    return target


@dataclass
class HostReport:
    """One host's outcome: Ansible's status plus what its preflight found."""

    host: str
    status: str  #: ok | changed | failed | unreachable (Ansible's)
    ready: bool = False
    backends: list[str] = field(default_factory=list)
    libc: str = ""
    problems: list[str] = field(default_factory=list)


def preflights(events: list[dict]) -> dict[str, dict]:
    """{host: preflight JSON} from the preflight task's ok/failed events."""
    found = {}
    for event in events:
        data = event.get("event_data", {})
        if event.get("event") in ("runner_on_ok", "runner_on_failed") and data.get("task") == PREFLIGHT_TASK:
            try:
                found[data["host"]] = json.loads(data.get("res", {}).get("stdout") or "")
            except ValueError:
                continue
    return found


def deploy(
    source: str, *, limit: str | None = None, check: bool = False, backend: str = "auto", verbosity: int = 0,
    on_event=None,
) -> tuple[list[HostReport], ansible.AnsibleRun]:
    """Deploy to the hosts of inventory *source*; one :class:`HostReport` per targeted host, in inventory order."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if not PLAYBOOK.exists():
        raise EnvironmentProblem(f"playbook not found: {PLAYBOOK}", hint="run fleetdns from a fleetdns checkout")
    targets = inventory.load(source, limit)  # a clear InputError before Ansible starts
    run, events = ansible.run_playbook(
        PLAYBOOK,
        Path(source).resolve(),
        data_dir=state_dir() / "ansible",
        extravars={"fleetdns_probe_host_zip": str(build_host_zip()), "fleetdns_probe_backend": backend},
        limit=limit,
        check=check,
        verbosity=verbosity,
        on_event=on_event,
    )
    if not run.hosts and run.rc != 0:
        raise AnsibleFailed(run)
    found = preflights(events)
    reports = []
    for host in targets:
        result = run.hosts.get(host.name, ansible.HostResult(host.name, "unreachable", "no result from Ansible"))
        pre = found.get(host.name, {})
        problems = list(pre.get("problems", []))
        if result.failed and result.message:
            problems.insert(0, result.message)
        reports.append(
            HostReport(
                host=host.name,
                status=result.status,
                ready=not result.failed and bool(pre.get("ready")),
                backends=list(pre.get("ready", [])),
                libc=pre.get("libc", ""),
                problems=problems,
            )
        )
    if not check:
        remember(Path(source).resolve(), reports)
    return reports, run


def remember(source: Path, reports: list[HostReport]) -> None:
    """Record the last deploy (its inventory is the default for ``capture``)."""
    state = state_dir()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"inventory": str(source), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "hosts": {r.host: {"status": r.status, "ready": r.ready, "backends": r.backends, "libc": r.libc}
                        for r in reports}}
    tmp = state / "last-deploy.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(state / "last-deploy.json")


def last_inventory() -> Path | None:
    """The inventory of the last deploy, if any."""
    try:
        return Path(json.loads((state_dir() / "last-deploy.json").read_text())["inventory"])
    except (OSError, ValueError, KeyError):
        return None
