"""Where fleetdns keeps its files: ``$FLEETDNS_HOME``, or the current directory.

Under it: ``.lab/`` (the lab fleet's state), ``inventory/lab.ini``, ``.fleetdns/`` (deploy state and Ansible
artifacts) and ``reports/`` (the run store).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("FLEETDNS_HOME") or os.getcwd()).resolve()


def state_dir() -> Path:
    """``HOME/.fleetdns``: deploy state and Ansible artifacts (created 0700 by whoever writes there first)."""
    return home() / ".fleetdns"
