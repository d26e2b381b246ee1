"""pytest plugin for users who write their own lab tests (installed with the
package as the `xen_blklab` plugin).

    def test_my_patch_survives_saturation(lab_run):
        rec = lab_run("ring-saturation", backend="~/src/linux")
        assert rec["verdict"] == "PASS", rec["summary"]

Options: --lab-results DIR (default results/pytest), --lab-accel auto|kvm|tcg."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xen-blklab")
    group.addoption("--lab-results", default="results/pytest", help="results root for lab runs")
    group.addoption("--lab-accel", default=None, choices=["auto", "kvm", "tcg"], help="accelerator override")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: a test that boots the lab's nested stack")


@pytest.fixture
def lab_run(request: pytest.FixtureRequest) -> Callable[..., dict]:
    """Run a scenario (preset name or TOML path) and return its record; the lab is
    torn down before this returns, whatever the verdict."""
    from lab import pipeline, scenario

    def run(spec: str, *, backend: str | None = None, cold: bool = False) -> dict:
        sc = scenario.load(spec)
        if backend:
            src = str(Path(backend).expanduser().resolve())
            sc = dataclasses.replace(sc, backend=dataclasses.replace(sc.backend, source=src))
        return pipeline.run(sc, pipeline.Options(results_root=Path(request.config.getoption("--lab-results")),
                                                 accel=request.config.getoption("--lab-accel"), cold=cold))

    return run
