"""Private files: DNS logs are personal data, so everything fleetdns writes is 0600 in 0700 directories.

API::

    private_dir(path) -> Path                 # mkdir -p, mode 0700 (also fixes an existing directory's mode)
    open_private(path, "wb") -> file          # created 0600 (never widened by the umask), parents 0700
    write_json_atomic(path, data)             # temp file 0600 in the same directory, fsync, rename
    sha256_file(path) -> str                  # hex digest, read in 1 MiB blocks

Stdlib only: the host-side recorder uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any


def private_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    return p


def open_private(path: str | os.PathLike[str], mode: str = "wb") -> IO[Any]:
    """Open *path* for writing ("wb", "ab", "w", "a"), creating it 0600 whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write *data* as JSON to *path* so a reader sees the old or the new file, never half of one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
