"""Durations and sizes as operators type them: ``90s``, ``10m``, ``1h30m``, ``2d``; ``500M``, ``2G``.

API::

    parse_duration("1h30m") -> 5400.0      # seconds; raises UsageError on anything else
    format_duration(5400.0) -> "1h30m"
    parse_size("500M") -> 524288000        # bytes (binary units); raises UsageError

A bare number is seconds (durations) or bytes (sizes). Units, largest first, each at most once: ``d h m s``
(``ms`` for fractions of a second). Stdlib only: the host-side recorder uses it.
"""

from __future__ import annotations

import re

from fleet.errors import UsageError

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?"
                          r"(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?$")
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
#: the longest duration accepted: a capture longer than 30 days is a typo
MAX_DURATION = 30 * 86400.0


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds in *text* (``90``, ``90s``, ``10m``, ``1h30m``, ``1.5h``, ``500ms``); must be > 0 and ≤ 30 days."""
    t = str(text).strip().lower()
    try:
        seconds = float(t) if re.fullmatch(r"\d+(?:\.\d+)?", t) else None
    except ValueError:
        seconds = None
    if seconds is None:
        m = _DURATION_RE.match(t)
        if not t or m is None or not any(m.groups()):
            raise UsageError(f"bad {what} {text!r}: use e.g. 90s, 10m, 1h30m")
        seconds = sum(float(v) * unit for v, unit in zip(m.groups(), _UNITS.values(), strict=True) if v is not None)
    if seconds <= 0:
        raise UsageError(f"bad {what} {text!r}: must be positive")
    if seconds > MAX_DURATION:
        raise UsageError(f"bad {what} {text!r}: at most 30d")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` → ``1h30m``; ``0.5`` → ``500ms``; ``90.5`` → ``1m30.5s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    parts = []
    rest = seconds
    for unit in ("d", "h", "m"):
        n = int(rest // _UNITS[unit])
        if n:
            parts.append(f"{n}{unit}")
            rest -= n * _UNITS[unit]
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes in *text* (``1048576``, ``500M``, ``2G``, ``1.5GiB``; binary units); must be > 0."""
    m = _SIZE_RE.match(str(text).strip())
    if m is None:
        raise UsageError(f"bad {what} {text!r}: use e.g. 500M or 2G")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise UsageError(f"bad {what} {text!r}: must be positive")
    return size
