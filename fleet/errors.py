"""The FleetError tree and the one table of exit codes.

Every command ends through :func:`fleet.cli.main`, which turns a :class:`FleetError` into one line on stderr
(``fleetdns: error: …``) and the exit code its class carries. ``docs/exit-codes.md`` is this table in prose;
keep the two in step.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of every ``fleetdns`` command."""

    OK = 0
    #: the command ran, but at least one host failed (the others' results are kept)
    HOSTS_FAILED = 1
    #: bad command line or bad option value
    USAGE = 2
    #: bad input data: inventory, run id, capture file, lab host name
    BAD_INPUT = 3
    #: this machine cannot do it: not root, a required program missing, an unsafe sysctl
    ENVIRONMENT = 4
    #: the lab fleet failed to come up, or a lab operation failed
    LAB_FAILED = 5
    #: ``check``: nothing wrong was seen, but some hosts were not completely captured, so it is not proven
    UNPROVEN = 6
    #: an unexpected error (a bug): one line, the traceback only with FLEETDNS_DEBUG=1
    INTERNAL = 70
    #: interrupted by Ctrl-C
    INTERRUPTED = 130


class FleetError(Exception):
    """Base of every error a user can cause or meet; carries its exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FleetError):
    """A bad option value or combination."""

    exit_code = ExitCode.USAGE


class InputError(FleetError):
    """Bad input data: an inventory, a run id, a capture file, a host name."""

    exit_code = ExitCode.BAD_INPUT


class EnvironmentProblem(FleetError):
    """This machine lacks something the command needs (root, a program, a safe sysctl)."""

    exit_code = ExitCode.ENVIRONMENT


class MissingProgram(EnvironmentProblem):
    """A required program is not on PATH; names the Debian package that provides it."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"'{program}' not found on PATH", hint=f"apt-get install {package}")
        self.program = program
        self.package = package


class NotRoot(EnvironmentProblem):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs root", hint="run it as root, e.g. with sudo")


class LabError(FleetError):
    """The lab fleet could not do what was asked."""

    exit_code = ExitCode.LAB_FAILED


class HostsFailed(FleetError):
    """Some hosts failed; the others' results were kept."""

    exit_code = ExitCode.HOSTS_FAILED


class CheckViolated(FleetError):
    """``check``: a host resolved an --absent name, or no host resolved a --present one."""

    exit_code = ExitCode.HOSTS_FAILED


class CheckUnproven(FleetError):
    """``check``: no violation seen, but the coverage is incomplete, so absence cannot be proven."""

    exit_code = ExitCode.UNPROVEN
