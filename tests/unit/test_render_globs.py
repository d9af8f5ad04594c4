"""Name globs as both probe languages test them (fleet/probes/render.py glob_checks), against fnmatch."""

from __future__ import annotations

import fnmatch

import pytest

from fleet.probes.render import glob_checks, name_matches


def matches(glob: str, name: bytes) -> bool:
    """What the rendered probe computes, evaluated in Python from glob_checks()."""
    length, exact, checks = glob_checks(glob)
    if (len(name) != length) if exact else (len(name) < length):
        return False
    low = name.lower()
    return all(low[len(low) - index if from_end else index] == ch for index, from_end, ch in checks)


@pytest.mark.parametrize("glob", ["*.wanted.test", "LOCAL*", "a?c*x.y", "exact.name", "*", "?", "db.lab"])
@pytest.mark.parametrize("name", [b"a.wanted.test", b"B.WANTED.TEST", b"wanted.test", b"localhost", b"LOCAL",
                                  b"abcx.y", b"aXc-middle-x.Y", b"exact.name", b"EXACT.NAMEs", b"x", b"",
                                  b"db.lab", b"db.lab."])
def test_glob_checks_agree_with_fnmatch(glob, name):
    expected = fnmatch.fnmatchcase(name.lower().decode(), glob.lower())
    assert matches(glob, name) == expected == name_matches(name, [glob])


def test_checks_skip_question_marks_and_count_the_suffix_from_the_end():
    assert glob_checks("a?*.x") == (4, False, [(0, False, ord("a")), (2, True, ord(".")), (1, True, ord("x"))])
