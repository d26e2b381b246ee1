"""lab/junit.py: one testcase per run or bisect step; PASS shall pass, FAIL/HANG/CRASH
shall be failures with the summary as message, ERROR an error; the results
directory, accelerator and commit shall be properties."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab import junit

DATA = Path(__file__).resolve().parent.parent / "data"


def _rec(name: str) -> dict:
    return json.loads((DATA / name / "record.json").read_text())


def test_runs_as_testcases(tmp_path: Path) -> None:
    err = {"scenario": "default", "verdict": "ERROR", "stage": "boot:xen", "summary": "lab failed: x",
           "error": "no Xen banner", "results_dir": "results/default/x", "accel": "kvm", "wall_s": 61.5}
    cases = [junit.case_from_record(_rec("run-default-pass")), junit.case_from_record(_rec("run-stall-hang")),
             junit.case_from_record(err)]
    f = junit.write(tmp_path / "out" / "junit.xml", cases)
    root = ET.parse(f).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    ok, hang, error = suite.findall("testcase")
    assert ok.find("failure") is None and ok.find("error") is None
    assert ok.get("classname") == "lab.run.default" and ok.get("time") == "92.020"
    fail = hang.find("failure")
    assert fail is not None and fail.get("type") == "HANG"
    assert (fail.get("message") or "").startswith("HANG: guest lin1 xvdb: completed I/Os stuck at 28179")
    e = error.find("error")
    assert e is not None and e.get("message") == "no Xen banner"
    props = {p.get("name"): p.get("value") for p in error.iter("property")}
    assert props["results_dir"] == "results/default/x" and props["accel"] == "kvm"
    assert {p.get("name"): p.get("value") for p in hang.iter("property")}["accel"] == "tcg"


def test_bisect_steps_as_testcases(tmp_path: Path) -> None:
    steps = [{"n": 1, "commit": "a" * 40, "subject": "s1", "label": "bisect", "verdict": "PASS", "code": 0,
              "summary": "ok", "time_s": 80.0, "record": str(DATA / "run-default-pass" / "record.json")},
             {"n": 2, "commit": "b" * 40, "subject": "s2", "label": "confirm-bad", "verdict": "CRASH", "code": 1,
              "summary": "panic", "time_s": 50.0, "record": "/gone/record.json"}]
    f = junit.write(tmp_path / "j.xml", [junit.case_from_step(s, scenario="stall") for s in steps])
    cases = ET.parse(f).getroot().findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["step 1 aaaaaaaaaaaa bisect", "step 2 bbbbbbbbbbbb confirm-bad"]
    p1 = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    assert p1["commit"] == "a" * 40 and p1["accel"] == "tcg" and p1["results_dir"].startswith("results/default/")
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message") == "panic" and failure.get("type") == "CRASH"


def test_lab_run_and_bisect_write_junit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab run --junit` and `lab bisect --junit`, with the pipeline and the bisection stubbed out."""
    from lab import bisect, cli, pipeline

    rec = _rec("run-stall-hang")
    monkeypatch.setattr(pipeline, "run", lambda sc, opts: rec)
    assert cli.main(["run", "stall", "--repeat", "2", "--junit", str(tmp_path / "run.xml")]) == 2
    cases = ET.parse(tmp_path / "run.xml").getroot().findall("testsuite/testcase")
    assert len(cases) == 2 and all(c.find("failure") is not None for c in cases)

    step = {"n": 1, "commit": "c" * 40, "subject": "s", "label": "bisect", "verdict": "ERROR", "code": 125,
            "summary": "lab failed: boot", "time_s": 5.0, "record": str(tmp_path / "none.json")}
    res = {"scenario": "stall", "repo": "/r", "good": "a" * 40, "bad": "b" * 40, "total_s": 5.0,
           "results_dir": str(tmp_path), "steps": [step], "reason": "skipped"}
    monkeypatch.setattr(bisect, "bisect", lambda *a, **k: res)
    assert cli.main(["bisect", "--scenario", "stall", "--repo", str(tmp_path), "--good", "a", "--bad", "b",
                     "--junit", str(tmp_path / "bisect.xml")]) == 1
    (case,) = ET.parse(tmp_path / "bisect.xml").getroot().findall("testsuite/testcase")
    err = case.find("error")
    assert err is not None and err.get("message") == "lab failed: boot"


def test_a_summary_that_names_its_verdict_is_not_prefixed_twice() -> None:
    """A HANG's summary starts with "HANG:" already (a real bisect step printed
    "HANG: HANG: guest lin1 xvdb: ..." before)."""
    from lab import junit

    hang = junit.Case(name="s", verdict="HANG", message="HANG: guest lin1 xvdb: stuck")
    fail = junit.Case(name="s", verdict="FAIL", message="lin1/xvdb: errors")
    xml = junit.to_xml([hang, fail])
    texts = [e.text for e in xml.iter("failure")]
    assert texts == ["HANG: guest lin1 xvdb: stuck", "FAIL: lin1/xvdb: errors"]
