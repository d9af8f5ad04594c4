"""``python -m fleet`` is the ``fleetdns`` command."""

from fleet.cli import main

if __name__ == "__main__":  # importable without running (e.g. by a worker process that re-imports __main__)
    main()
