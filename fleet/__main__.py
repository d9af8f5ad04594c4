"""``python -m fleet`` is the ``fleetdns`` command."""

from fleet.cli import main

main()
