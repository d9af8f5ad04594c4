"""Names, addresses and paths of one lab fleet — pure data, no side effects.

A lab lives in a *home* directory (``$FLEETDNS_HOME``, default: the current directory): its state in
``HOME/.lab/`` (mode 0700) and its Ansible inventory in ``HOME/inventory/lab.ini``. Every kernel object it makes
carries a *tag* derived from the state directory's real path, so two labs on one machine (a checkout and a CI
clone, a test's second lab) never share a name:

===================  ==========================================  ==============================
object               name                                        example (tag ``fd3a9c``)
===================  ==========================================  ==============================
bridge               ``{tag}br``                                 ``fd3a9cbr``
host veth (outside)  ``{tag}v{N}``; DNS server: ``{tag}vd``      ``fd3a9cv12``
network namespace    ``{tag}-lab{N}``; DNS server: ``{tag}-dns``  ``fd3a9c-lab12``
cgroup (v2)          ``fleetdns-lab-{tag}/{lab{N}|dns|supervisor}``
===================  ==========================================  ==============================

Interface names stay within Linux's 15 characters for up to :data:`MAX_HOSTS` hosts. Addresses come from one /24
in 10.213.0.0/16 that exists only on the lab bridge: ``.1`` is this machine, ``.2`` the DNS server, host N is
``.(10+N)``. Nothing routes off the box: hosts get no default route, and ``lab up`` refuses to run with IP
forwarding on.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

MAX_HOSTS = 200
MODES = ("overlay", "bind")
#: the lab zone served by the lab DNS server, besides one ``labN.lab`` name per host (index → name)
SERVICE_NAMES = ("db.lab", "old-db.lab", "new-db.lab", "api.lab", "cache.lab", "queue.lab")
HOST_ADDRESS_OFFSET = 10


def host_name(index: int) -> str:
    return f"lab{index}"


@dataclass(frozen=True)
class Layout:
    """Where everything of one lab lives. ``subnet_octet`` picks 10.213.<octet>.0/24."""

    home: Path
    subnet_octet: int

    # ---- identity -----------------------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self.home / ".lab"

    @property
    def tag(self) -> str:
        return tag_for(self.home)

    @property
    def inventory(self) -> Path:
        return self.home / "inventory" / "lab.ini"

    # ---- network ------------------------------------------------------------------------------------------
    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.213.{self.subnet_octet}.0/24")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def bridge_address(self) -> str:
        return str(self.network[1])

    @property
    def dns_address(self) -> str:
        return str(self.network[2])

    @property
    def dns_netns(self) -> str:
        return f"{self.tag}-dns"

    @property
    def dns_veth(self) -> str:
        return f"{self.tag}vd"

    def address(self, index: int) -> str:
        return str(self.network[HOST_ADDRESS_OFFSET + index])

    def netns(self, index: int) -> str:
        return f"{self.tag}-{host_name(index)}"

    def veth(self, index: int) -> str:
        return f"{self.tag}v{index}"

    # ---- files --------------------------------------------------------------------------------------------
    @property
    def description(self) -> Path:
        """``lab.json``: what ``lab up`` built (hosts, mode, subnet); the other commands read it."""
        return self.state / "lab.json"

    @property
    def client_key(self) -> Path:
        return self.state / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state / "known_hosts"

    @property
    def dns_dir(self) -> Path:
        return self.state / "dns"

    @property
    def cow(self) -> Path:
        """A tmpfs holding each overlay host's upper and work dirs (a tmpfs: overlayfs refuses an upper dir on
        the same filesystem as its lower ``/``)."""
        return self.state / "cow"

    def host_dir(self, index: int) -> Path:
        return self.state / "hosts" / host_name(index)

    # ---- cgroups ------------------------------------------------------------------------------------------
    def cgroup(self, cgroup2_root: Path) -> Path:
        return cgroup2_root / f"fleetdns-lab-{self.tag}"


def tag_for(home: Path) -> str:
    """``fd`` + 4 hex digits of the state dir's path: short enough for 15-character interface names."""
    return "fd" + hashlib.sha256(str(home / ".lab").encode()).hexdigest()[:4]


def preferred_octet(home: Path) -> int:
    """The third octet a lab at *home* tries first (1…250), so different labs rarely collide."""
    return int(hashlib.sha256(str(home).encode()).hexdigest()[:6], 16) % 250 + 1
