"""Durations and sizes as typed on the command line, and private files (fleet/durations.py, fleet/private.py)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fleet.durations import format_duration, parse_duration, parse_size
from fleet.errors import UsageError
from fleet.private import open_private, private_dir, sha256_file, write_json_atomic


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400),
                                           ("500ms", 0.5), ("2d", 172800), (" 10M ", 600), ("1m30s", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "-5", "0", "0s", "10mm", "1m1h", "40d", "1 h", "nan", "1e3"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds, text", [(5400, "1h30m"), (0.5, "500ms"), (90.5, "1m30.5s"), (60, "1m"),
                                           (86400, "1d"), (1, "1s")])
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [("1048576", 2**20), ("500M", 500 * 2**20), ("2G", 2 * 2**30),
                                        ("1.5GiB", 3 * 2**29), ("10kb", 10240)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1G", "0", "5X"])
def test_bad_sizes(text):
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


def test_private_files_ignore_a_wide_umask(tmp_path):
    old = os.umask(0)
    try:
        d = private_dir(tmp_path / "a" / "b")
        with open_private(d / "f", "wb") as f:
            f.write(b"x")
        write_json_atomic(d / "j.json", {"k": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "j.json").st_mode) == 0o600
    assert json.loads((d / "j.json").read_text()) == {"k": 1}
    assert sha256_file(d / "f") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp file left
