"""Inventories, loaded by Ansible's own code: hosts with the connection settings Ansible would use.

An inventory is whatever Ansible accepts — an INI or YAML file, or a directory with ``group_vars/`` and
``host_vars/`` — and ``ansible.cfg`` is honoured as Ansible finds it. Nothing here parses inventory text by hand.
"""

from __future__ import annotations

import contextlib
import io
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from fleet.errors import InputError


@dataclass(frozen=True)
class Host:
    """One inventory host and how to reach it over SSH."""

    name: str
    address: str  #: ``ansible_host``, or the name
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    #: ``-o Key=Value`` options from ``ansible_ssh_common_args`` / ``ansible_ssh_extra_args``, keys lower-cased
    ssh_options: dict[str, str] = field(default_factory=dict)
    #: ``ansible_become``: run host commands through passwordless ``sudo -n`` (to root), as Ansible would
    become: bool = False

    @property
    def known_hosts(self) -> str | None:
        return self.ssh_options.get("userknownhostsfile")


def ssh_options(*arg_strings: str) -> dict[str, str]:
    """``-o Key=Value`` / ``-o Key Value`` pairs from OpenSSH command-line argument strings."""
    options = {}
    for args in arg_strings:
        words = shlex.split(args or "")
        for flag, value in zip(words, words[1:], strict=False):
            if flag == "-o":
                key, _, rest = value.replace(" ", "=", 1).partition("=")
                options[key.lower()] = rest
    return options


def load(source: Path | str, limit: str | None = None) -> list[Host]:
    """The hosts of inventory *source* (those matching *limit*, an Ansible pattern), in inventory order.

    Raises :class:`InputError` (one line, with Ansible's own reason) for a missing, empty or unparsable
    inventory, and for a *limit* that matches no host.
    """
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    path = Path(source)
    if not path.exists():
        raise InputError(f"inventory not found: {source}")
    loader = DataLoader()
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):  # Ansible explains a parse failure only as a warning
        manager = InventoryManager(loader=loader, sources=[str(path)])
        everyone = manager.get_hosts("all")
    if not everyone:
        reason = next((line.removeprefix("[WARNING]: ").strip() for line in warnings.getvalue().splitlines()
                       if line.startswith("[WARNING]")), "it defines no hosts")
        raise InputError(f"cannot use inventory {source}: {reason}")
    with contextlib.redirect_stderr(io.StringIO()):  # Ansible's "Could not match" warning: said below
        if limit:
            manager.subset(limit)
        chosen = manager.get_hosts("all")
    if not chosen:
        raise InputError(f"--limit {limit!r} matches no host in {source}")
    from ansible.module_utils.parsing.convert_bool import boolean

    variables = VariableManager(loader=loader, inventory=manager)
    hosts = []
    for host in chosen:
        hv = variables.get_vars(host=host)
        become = boolean(hv.get("ansible_become", False), strict=False)
        if become:
            _check_become(host.name, str(hv.get("ansible_become_method") or "sudo"),
                          str(hv.get("ansible_become_user") or "root"))
        hosts.append(
            Host(
                name=host.name,
                address=str(hv.get("ansible_host", host.name)),
                port=int(hv.get("ansible_port") or hv.get("ansible_ssh_port") or 22),
                user=hv.get("ansible_user") or hv.get("ansible_ssh_user"),
                key_file=hv.get("ansible_ssh_private_key_file") or hv.get("ansible_private_key_file"),
                ssh_options=ssh_options(hv.get("ansible_ssh_common_args", ""), hv.get("ansible_ssh_extra_args", "")),
                become=become,
            )
        )
    return hosts


def _check_become(host: str, method: str, user: str) -> None:
    """The one way fleetdns becomes root: passwordless ``sudo -n`` (a password prompt could never be answered)."""
    if method != "sudo":
        raise InputError(f"{host}: ansible_become_method {method!r} is not supported by capture/gather (sudo only)")
    if user != "root":
        raise InputError(f"{host}: ansible_become_user {user!r}: the probe needs root")
