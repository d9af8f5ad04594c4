"""The DNS probe: bpftrace / SystemTap scripts on libc's resolver, rendered and run on one machine.

* :mod:`fleet.probes.render` turns :class:`~fleet.probes.render.ProbeOptions` into a probe script for one
  backend (the hooked functions are described once, in ``render.FUNCTIONS``, so both backends stay in step).
* :mod:`fleet.probes.runner` runs that script here and writes a capture file (``docs/capture-format.md``);
  it is also ``python -m fleet.probes.runner``, the host-side entry point, and needs only the stdlib.
* :mod:`fleet.capture_format` reads capture files back into pandas.
"""
