"""The test tree itself: pytest (rootdir-relative imports, no packages) refuses
two test modules of the same name in one session, and `make test` collects
tests/unit, tests/integration and tests/e2e together. Two sessions in a row lost
a CI run to that; this catches it in the unit tier."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_module_names_are_unique_across_the_tree() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
