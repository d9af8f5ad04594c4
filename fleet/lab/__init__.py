"""The local lab fleet: real SSH hosts in namespaces on this machine (see fleet.lab.lifecycle)."""
