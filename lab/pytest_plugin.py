"""pytest plugin for users who write their own lab tests (installed with the
package as the `xen_blklab` plugin).

    def test_my_patch_survives_saturation(lab_run):
        rec = lab_run("ring-saturation", backend="~/src/linux")
        assert rec["verdict"] == "PASS", rec["summary"]

Options: --lab-results DIR (default results/pytest), --lab-accel auto|kvm|tcg.
A conftest.py may override the `lab_results_root` fixture to put runs elsewhere
(the project's e2e tests put theirs under results/e2e/).

Each run's verdict, summary, results directory and report.html go into the
test's report: its user_properties (pytest's JUnit shows them as properties, and
pytest-xdist carries them from its workers) and a "lab" section printed with a
failure, so a CI page and a terminal both link every failed test to its evidence.
A test that runs several scenarios gets `lab_verdict`, `lab_verdict_2`, ..."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from lab import observe, scenario


class LabRun(Protocol):
    """The `lab_run` fixture's type, for annotating tests."""

    def __call__(self, spec: str | Path | scenario.Scenario, *, backend: str | None = None, cold: bool = False,
                 accel: str | None = None,
                 on_workload_started: Callable[[observe.Started], None] | None = None) -> dict[str, Any]: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xen-blklab")
    group.addoption("--lab-results", default="results/pytest", help="results root for lab runs")
    group.addoption("--lab-accel", default=None, choices=["auto", "kvm", "tcg"], help="accelerator override")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: a test that boots the lab's nested stack")


@pytest.fixture
def lab_results_root(request: pytest.FixtureRequest) -> Path:
    """Where `lab_run` puts results/<scenario>/<stamp>: --lab-results, unless a
    conftest.py overrides this fixture."""
    return Path(request.config.getoption("--lab-results"))


def attach(item: pytest.Item, rec: dict[str, Any]) -> None:
    """Put one run's verdict, summary, results directory, report and accelerator
    into the test's report (user_properties, and a "lab" section shown with a
    failure). The n-th run of one test gets the suffix `_n` from the second on."""
    n = sum(1 for k, _ in item.user_properties if k == "lab_verdict" or k.startswith("lab_verdict_"))
    suffix = f"_{n + 1}" if n else ""
    d = Path(rec.get("results_dir", ""))
    props = [("verdict", rec.get("verdict")), ("summary", rec.get("summary")), ("results", str(d)),
             ("report", str(d / "report.html")), ("accel", rec.get("accel"))]
    item.user_properties += [(f"lab_{k}{suffix}", v) for k, v in props]
    item.add_report_section("call", f"lab{suffix}", "".join(f"{k:<8} {v}\n" for k, v in props))


@pytest.fixture
def lab_run(request: pytest.FixtureRequest, lab_results_root: Path) -> LabRun:
    """Run a scenario (preset name, TOML path or a Scenario) and return its
    record; the lab is torn down before this returns, whatever the verdict.
    `backend` is a source tree to build the backend from; `accel` overrides
    --lab-accel; `on_workload_started` is pipeline.Options' hook (tests that act
    on the lab while the workload runs)."""
    from lab import pipeline, scenario

    def run(spec: str | Path | scenario.Scenario, *, backend: str | None = None, cold: bool = False,
            accel: str | None = None,
            on_workload_started: Callable[[observe.Started], None] | None = None) -> dict[str, Any]:
        sc = spec if isinstance(spec, scenario.Scenario) else scenario.load(spec)
        if backend:
            src = str(Path(backend).expanduser().resolve())
            sc = dataclasses.replace(sc, backend=dataclasses.replace(sc.backend, source=src))
        rec = pipeline.run(sc, pipeline.Options(results_root=lab_results_root,
                                                accel=accel or request.config.getoption("--lab-accel"),
                                                cold=cold, on_workload_started=on_workload_started))
        attach(request.node, rec)
        return rec

    return run
