"""The pytest plugin, the front door for users' own lab tests, driven by pytester:
a user's test file run in a sub-session with the pipeline stood in for (the real
pipeline is exercised by tests/e2e, which uses the same fixture); the fixture
shall pass the scenario and options through and put the verdict, summary,
results directory and report path into the test's report: its user_properties
(so the JUnit properties, also from pytest-xdist's workers) and a section printed
with a failure."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

# imported here, before any sub-session: pytester's in-process runs drop the modules
# a run imported from sys.modules but not from the `lab` package's attributes, so a
# second run would mix old and new lab.values (its Size no longer `is` the one
# lab.scenario checks against)
import lab.pipeline  # noqa: F401

pytest_plugins = ["pytester"]

USER_TEST = '''
import lab.pipeline

def fake_run(sc, opts):
    return {"verdict": "HANG" if sc.name == "stall" else "PASS", "summary": f"{sc.name} by the stand-in",
            "results_dir": f"{opts.results_root}/{sc.name}/x", "accel": opts.accel or "tcg"}

def test_my_patch(lab_run, monkeypatch):
    monkeypatch.setattr(lab.pipeline, "run", fake_run)
    rec = lab_run("default")
    assert rec["verdict"] == "PASS", rec["summary"]

def test_my_stall(lab_run, monkeypatch):
    monkeypatch.setattr(lab.pipeline, "run", fake_run)
    assert lab_run("stall")["verdict"] == "PASS"
'''


def _junit_properties(path: object) -> dict[str, dict[str, str]]:
    cases = {c.get("name"): c for c in ET.parse(str(path)).getroot().iter("testcase")}
    return {str(n): {str(p.get("name")): str(p.get("value")) for p in c.iter("property")}
            for n, c in cases.items()}


def test_the_fixture_runs_scenarios_and_reports_them_in_junit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest("--lab-results", "out", "--lab-accel", "tcg",
                             "--junitxml=j.xml")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*AssertionError*"])
    props = _junit_properties(pytester.path / "j.xml")
    assert props["test_my_patch"]["lab_verdict"] == "PASS"
    assert props["test_my_stall"]["lab_verdict"] == "HANG"
    assert props["test_my_stall"]["lab_summary"] == "stall by the stand-in"
    assert props["test_my_stall"]["lab_results"] == "out/stall/x"
    assert props["test_my_stall"]["lab_report"] == "out/stall/x/report.html"
    assert props["test_my_patch"]["lab_accel"] == "tcg"


def test_a_failed_test_prints_where_its_evidence_is(pytester: pytest.Pytester) -> None:
    """The failure's output shall name the run's verdict, results directory and
    report, so the person at the terminal goes straight to report.html."""
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest("--lab-results", "out", "-k", "stall")
    res.assert_outcomes(failed=1, deselected=1)
    res.stdout.fnmatch_lines(["*Captured lab call*", "verdict*HANG", "summary*stall by the stand-in",
                              "results*out/stall/x", "report*out/stall/x/report.html"])


OPTIONS_TEST = '''
import dataclasses
from pathlib import Path

import lab.pipeline
from lab import scenario

seen = []

def fake_run(sc, opts):
    seen.append((sc, opts))
    return {"verdict": "PASS", "summary": f"run {len(seen)}", "results_dir": f"{opts.results_root}/{len(seen)}"}

def hook(run):
    pass

def test_options_pass_through(lab_run, monkeypatch, request):
    monkeypatch.setattr(lab.pipeline, "run", fake_run)
    mine = dataclasses.replace(scenario.load("default"), name="mine")
    lab_run(mine, cold=True, on_workload_started=hook)
    lab_run("stall", backend="~/src/linux", accel="kvm")
    lab_run("light")
    (sc1, o1), (sc2, o2), (sc3, o3) = seen
    assert sc1 is mine and o1.cold and o1.on_workload_started is hook and o1.accel == "tcg"
    assert sc2.name == "stall" and sc2.backend.source == str(Path("~/src/linux").expanduser().resolve())
    assert o2.accel == "kvm" and not o2.cold and o2.on_workload_started is None
    assert sc3.name == "light" and o3.accel == "tcg"
    assert {o.results_root for o in (o1, o2, o3)} == {Path("elsewhere")}
    props = dict(request.node.user_properties)
    assert props["lab_summary"] == "run 1" and props["lab_summary_2"] == "run 2" and props["lab_summary_3"] == "run 3"
    assert props["lab_report_3"] == "elsewhere/3/report.html"
'''

CONFTEST = '''
from pathlib import Path

import pytest

@pytest.fixture
def lab_results_root():
    return Path("elsewhere")
'''


def test_the_fixture_passes_scenarios_and_options_through(pytester: pytest.Pytester) -> None:
    """A Scenario object is run as given; backend, cold, accel and the workload
    hook reach pipeline.Options; a conftest's `lab_results_root` moves the
    results; a test's later runs get `_2`, `_3` properties."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_options=OPTIONS_TEST)
    res = pytester.runpytest("--lab-results", "ignored", "--lab-accel", "tcg")
    res.assert_outcomes(passed=1)


def test_the_properties_reach_junit_from_xdist_workers(pytester: pytest.Pytester) -> None:
    """Under `-n 2` (make test-e2e-all JOBS=2) each worker's runs still land in the
    one JUnit file the controller writes."""
    pytest.importorskip("xdist")
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest("-n", "2", "--dist", "loadfile", "--lab-results", "out", "--junitxml=j.xml")
    res.assert_outcomes(passed=1, failed=1)
    props = _junit_properties(pytester.path / "j.xml")
    assert props["test_my_stall"]["lab_verdict"] == "HANG"
    assert props["test_my_stall"]["lab_results"] == "out/stall/x"
    assert props["test_my_patch"]["lab_report"] == "out/default/x/report.html"
