"""fleetdns: which process on which host resolves which DNS name, fleet-wide."""

__version__ = "0.1.0"
