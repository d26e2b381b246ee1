"""pytest plugin for users who write their own lab tests (installed with the
package as the `xen_blklab` plugin).

    def test_my_patch_survives_saturation(lab_run):
        rec = lab_run("ring-saturation", backend="~/src/linux")
        assert rec["verdict"] == "PASS", rec["summary"]

Options: --lab-results DIR (default results/pytest), --lab-accel auto|kvm|tcg.
Each run's verdict, summary, results directory and report.html go into the
test's report (its user_properties: pytest's JUnit shows them as properties), so
a CI page links every failed test to its evidence."""

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
        rec = pipeline.run(sc, pipeline.Options(results_root=Path(request.config.getoption("--lab-results")),
                                                accel=request.config.getoption("--lab-accel"), cold=cold))
        n = sum(1 for k, _ in request.node.user_properties if k == "lab_verdict")
        suffix = f"_{n + 1}" if n else ""
        d = Path(rec.get("results_dir", ""))
        request.node.user_properties += [
            (f"lab_verdict{suffix}", rec.get("verdict")), (f"lab_summary{suffix}", rec.get("summary")),
            (f"lab_results{suffix}", str(d)), (f"lab_report{suffix}", str(d / "report.html")),
            (f"lab_accel{suffix}", rec.get("accel")),
        ]
        return rec

    return run
