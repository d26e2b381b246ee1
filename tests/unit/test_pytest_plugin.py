"""The pytest plugin, the front door for users' own lab tests, driven by pytester:
a user's test file run in a sub-session with the pipeline stood in for (the real
pipeline is exercised by tests/e2e); the fixture shall pass the scenario and
options through and put the verdict, summary and report path into the JUnit
report."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

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


def test_the_fixture_runs_scenarios_and_reports_them_in_junit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest("--lab-results", "out", "--lab-accel", "tcg",
                             "--junitxml=j.xml")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*AssertionError*"])
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "j.xml").getroot().iter("testcase")}
    props = {n: {p.get("name"): p.get("value") for p in c.iter("property")} for n, c in cases.items()}
    assert props["test_my_patch"]["lab_verdict"] == "PASS"
    assert props["test_my_stall"]["lab_verdict"] == "HANG"
    assert props["test_my_stall"]["lab_summary"] == "stall by the stand-in"
    assert props["test_my_stall"]["lab_report"] == "out/stall/x/report.html"
    assert props["test_my_patch"]["lab_accel"] == "tcg"
