"""SSH to fleet hosts with paramiko: verified host keys, argument-list commands, and a streaming, resumable fetch.

Connection settings are the ones Ansible resolves for the host (:class:`fleet.inventory.Host`). Host keys come
from the inventory's ``UserKnownHostsFile`` (else ``~/.ssh/known_hosts``) and an unknown or changed key is refused
(paramiko's ``RejectPolicy``, never ``AutoAddPolicy``)::

    with Connection(host) as c:                     # SshError (.kind "unreachable" | "hostkey" | "auth" | "ssh")
        rc, out, err = c.run(["fleetdns-probe", "run", "status", run_id], timeout=30)
        data = c.read_file("/var/lib/fleetdns/runs/RUN/status.json")      # small files, one SFTP round trip
        n = c.fetch(remote, local_part, size=N, sha256=HEX)               # → bytes transferred

``fetch`` streams with pipelined SFTP reads (paramiko's prefetch: 8 MiB of 128 KiB requests in flight), hashes
while writing, continues an existing ``.part`` from its length, and checks size and SHA-256 against the host's before
returning; memory stays flat in the file size.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import paramiko

from fleet.inventory import Host
from fleet.private import open_private

CONNECT_TIMEOUT = 10.0
#: SFTP reads give up after this long without data (a host whose network went away mid-transfer)
IO_TIMEOUT = 30.0
BLOCK = 1 << 20
#: bytes requested ahead per transfer (memory per host in flight)
WINDOW = 8 << 20
#: bytes per SFTP read request (OpenSSH's sftp-server answers up to 255 KiB; paramiko asks 32 KiB by default)
REQUEST = 128 << 10


class SshError(Exception):
    """A host could not be used; ``kind`` is ``unreachable``, ``hostkey``, ``auth`` or ``ssh``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class IntegrityError(Exception):
    """A fetched file does not match the host's size or checksum."""


class Connection:
    """One SSH connection (opened lazily by :meth:`open`, or by entering the ``with`` block)."""

    def __init__(self, host: Host, timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = host
        self.timeout = timeout
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> Connection:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.client is not None and self.client.get_transport() and self.client.get_transport().is_active():
            return
        self.close()
        h = self.host
        client = paramiko.SSHClient()
        known = h.known_hosts
        try:
            if known:
                client.load_host_keys(os.path.expanduser(known))
            else:
                client.load_system_host_keys()
        except OSError as exc:
            raise SshError("hostkey", f"cannot read known_hosts {known}: {exc.strerror}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(h.address, port=h.port, username=h.user, key_filename=h.key_file, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout,
                           allow_agent=h.key_file is None, look_for_keys=h.key_file is None)
        except paramiko.BadHostKeyException as exc:
            raise SshError("hostkey", f"host key mismatch for {h.address} (not the key in "
                                      f"{known or 'known_hosts'}: {exc.key.get_name()} {exc.key.get_base64()[:16]}…)"
                           ) from None
        except paramiko.AuthenticationException as exc:
            raise SshError("auth", f"authentication failed for {h.user or 'the default user'}@{h.address}: {exc}") \
                from None
        except paramiko.SSHException as exc:
            kind = "hostkey" if "known_hosts" in str(exc) else "ssh"
            raise SshError(kind, f"{exc}") from None
        except (OSError, EOFError) as exc:
            raise SshError("unreachable", f"cannot connect to {h.address}:{h.port}: "
                                          f"{exc.strerror or exc if isinstance(exc, OSError) else exc}") from None
        self.client = client

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def command(self, argv: list[str]) -> str:
        """The command line sent for *argv*: quoted with shlex.join (no shell string is built from input), behind
        ``sudo -n --`` when the inventory says ``ansible_become`` (passwordless sudo: never a prompt)."""
        return shlex.join(["sudo", "-n", "--", *argv] if self.host.become else argv)

    def run(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run *argv* on the host (see :meth:`command`); (rc, out, err)."""
        self.open()
        try:
            _, stdout, stderr = self.client.exec_command(self.command(argv), timeout=timeout)
            out = stdout.read().decode("utf-8", "replace")
            err = stderr.read().decode("utf-8", "replace")
            return stdout.channel.recv_exit_status(), out, err
        except TimeoutError:
            self.close()
            raise SshError("ssh", f"{shlex.join(argv[:3])}… gave no answer within {timeout:g}s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise SshError("unreachable", f"connection lost: {exc}") from None

    def sftp(self) -> paramiko.SFTPClient:
        self.open()
        if self._sftp is None:
            try:
                # a big channel window and packets that fit a whole REQUEST: a quarter of the packets paramiko's
                # defaults (2 MiB, 32 KiB) make it handle, in Python, for the same bytes
                self._sftp = paramiko.SFTPClient.from_transport(self.client.get_transport(), window_size=2 * WINDOW,
                                                                max_packet_size=REQUEST + 1024)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.close()
                raise SshError("ssh", f"no SFTP: {exc}") from None
            self._sftp.get_channel().settimeout(IO_TIMEOUT)
        return self._sftp

    def read_file(self, path: str) -> bytes:
        """A small remote file's bytes (FileNotFoundError when missing); through ``sudo cat`` with become."""
        if self.host.become:
            rc, out, err = self.run(["cat", "--", path], timeout=IO_TIMEOUT)
            if rc != 0:
                if "No such file" in err:
                    raise FileNotFoundError(path)
                raise SshError("ssh", f"cannot read {path} as root: {err.strip()[:200]}")
            return out.encode("utf-8")
        try:
            with self.sftp().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise SshError("unreachable", f"connection lost: {exc}") from None

    def fetch(self, remote: str, part: Path, *, size: int, sha256: str) -> int:
        """Copy *remote* (*size* bytes, SHA-256 *sha256*) into *part*, continuing what *part* already holds.

        Raises :class:`IntegrityError` (and deletes *part*) when the result does not match; returns the bytes
        transferred this time.
        """
        h = hashlib.sha256()
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not a prefix of this file: start over
            part.unlink()
            have = 0
        if have:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    h.update(block)
        pos = have
        blocks = self._exec_blocks if self.host.become else self._sftp_blocks
        try:
            with open_private(part, "ab") as dst:
                for block in blocks(remote, have, size):
                    h.update(block)
                    dst.write(block)
                    pos += len(block)
                if pos < size:
                    raise EOFError(f"the file ended at {pos} bytes")
        except FileNotFoundError:
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise SshError("unreachable", f"transfer interrupted after {pos} bytes: {exc}") from None
        moved = pos - have
        got = part.stat().st_size
        if got != size or h.hexdigest() != sha256:
            part.unlink()
            raise IntegrityError(f"{remote}: got {got} bytes with sha256 {h.hexdigest()[:12]}…, the host has "
                                 f"{size} bytes with sha256 {sha256[:12]}…")
        return moved

    def _sftp_blocks(self, remote: str, pos: int, size: int) -> Iterator[bytes]:
        """Bytes *pos*..*size* of *remote* over SFTP, in blocks."""
        with self.sftp().open(remote, "rb") as src:
            src.MAX_REQUEST_SIZE = REQUEST  # a server that answers less is asked again for the rest
            while pos < size:
                # one window of pipelined reads at a time: paramiko buffers whatever has arrived and scans that
                # buffer on every read, so an unbounded prefetch grows memory with the file
                end = min(size, pos + WINDOW)
                src.seek(pos)
                src.prefetch(end)
                while pos < end:
                    block = src.read(min(BLOCK, end - pos))
                    if not block:
                        return
                    pos += len(block)
                    yield block

    def _exec_blocks(self, remote: str, pos: int, size: int) -> Iterator[bytes]:
        """Bytes *pos*..*size* of *remote* as root (become: the file is root's, 0600, out of the SSH user's
        reach over SFTP), streamed from ``sudo -n -- tail -c +N`` over an exec channel; stops at *size*."""
        self.open()
        channel = self.client.get_transport().open_session(window_size=2 * WINDOW)
        channel.settimeout(IO_TIMEOUT)
        try:
            channel.exec_command(self.command(["tail", "-c", f"+{pos + 1}", "--", remote]))
            while pos < size:
                block = channel.recv(min(BLOCK, size - pos))
                if not block:
                    break
                pos += len(block)
                yield block
            if pos < size and channel.recv_exit_status() != 0:
                err = channel.recv_stderr(4096).decode("utf-8", "replace")
                if "No such file" in err:
                    raise FileNotFoundError(remote)
                raise SshError("ssh", f"cannot read {remote} as root: {err.strip()[:200]}")
        finally:
            channel.close()
