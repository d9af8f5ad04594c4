"""fleet.ssh.Connection.fetch against an in-memory SFTP file: resume from a .part, restart when the .part is not
a prefix, verification failures delete the .part, and reads stay within one window."""

from __future__ import annotations

import hashlib
import io

import pytest

from fleet import ssh
from fleet.inventory import Host

DATA = bytes(range(256)) * 80000  # 20 MB: more than two WINDOWs


class FakeRemoteFile(io.BytesIO):
    """What paramiko's SFTPFile offers fetch: seek, prefetch(end), read; records the largest read ahead."""

    def __init__(self, data: bytes, log: list) -> None:
        super().__init__(data)
        self.log = log

    def prefetch(self, end: int) -> None:
        self.log.append((self.tell(), end))


class FakeSftp:
    def __init__(self, data: bytes) -> None:
        self.data, self.log = data, []

    def open(self, path: str, mode: str) -> FakeRemoteFile:
        return FakeRemoteFile(self.data, self.log)


class FakeConnection(ssh.Connection):
    def __init__(self, data: bytes) -> None:
        super().__init__(Host("lab1", "192.0.2.1"))
        self.fake = FakeSftp(data)

    def sftp(self):
        return self.fake


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_part_file_is_continued_from_its_length(tmp_path):
    part = tmp_path / "lab1.capture.part"
    part.write_bytes(DATA[:3_000_000])
    conn = FakeConnection(DATA)
    assert conn.fetch("/remote", part, size=len(DATA), sha256=sha(DATA)) == len(DATA) - 3_000_000
    assert part.read_bytes() == DATA
    assert conn.fake.log[0] == (3_000_000, 3_000_000 + ssh.WINDOW)  # asked from the offset, one window at a time
    assert len(conn.fake.log) == 3 and all(end - start <= ssh.WINDOW for start, end in conn.fake.log)


def test_a_part_longer_than_the_file_is_started_over(tmp_path):
    part = tmp_path / "lab1.capture.part"
    part.write_bytes(b"x" * (len(DATA) + 1))
    assert FakeConnection(DATA).fetch("/remote", part, size=len(DATA), sha256=sha(DATA)) == len(DATA)
    assert part.read_bytes() == DATA


def test_a_file_that_does_not_verify_is_deleted(tmp_path):
    part = tmp_path / "lab1.capture.part"
    part.write_bytes(b"not the start of the capture")
    with pytest.raises(ssh.IntegrityError, match="the host has"):
        FakeConnection(DATA).fetch("/remote", part, size=len(DATA), sha256=sha(DATA))
    assert not part.exists()  # the next gather fetches it whole


def test_a_file_shorter_than_announced_is_an_interrupted_transfer(tmp_path):
    part = tmp_path / "lab1.capture.part"
    with pytest.raises(ssh.SshError, match="ended at"):
        FakeConnection(DATA[:1000]).fetch("/remote", part, size=len(DATA), sha256=sha(DATA))
    assert part.read_bytes() == DATA[:1000]  # kept: a later gather continues it
