"""JUnit XML for CI: one testcase per run (`lab run --junit`) or per bisect step
(`lab bisect --junit`). PASS passes; FAIL, HANG and CRASH are failures with the
run's summary as the message; ERROR (the lab could not decide) is an error, so a
CI dashboard tells a broken lab from a broken backend. Properties carry the
results directory, the accelerator and the commit, for the way back from a red
row to the run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAILURES = ("FAIL", "HANG", "CRASH")


@dataclass(frozen=True)
class Case:
    name: str
    verdict: str
    classname: str = "lab"
    time_s: float = 0.0
    message: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    output: str = ""  # system-out: the summary lines a person reads first


def case_from_record(rec: dict[str, Any], *, name: str | None = None, commit: str | None = None) -> Case:
    """One `lab run`'s record.json as a testcase."""
    props = {"results_dir": str(rec.get("results_dir", "")), "accel": str(rec.get("accel", "")),
             "verdict": str(rec.get("verdict", "")), "stage": str(rec.get("stage", ""))}
    commit = commit or _commit(rec)
    if commit:
        props["commit"] = commit
    verdict = str(rec.get("verdict", "ERROR"))
    return Case(name=name or f"{rec.get('scenario', '?')} {rec.get('started_utc', '')}".strip(),
                classname=f"lab.run.{rec.get('scenario', '?')}", verdict=verdict,
                time_s=float(rec.get("wall_s") or 0.0),
                message=str(rec.get("error") if verdict == "ERROR" and rec.get("error") else rec.get("summary") or ""),
                properties=props)


def _commit(rec: dict[str, Any]) -> str:
    """The commit of the backend under test, where the record names one."""
    for k in ("backend_commit", "commit"):
        if rec.get(k):
            return str(rec[k])
    b = rec.get("backend") or {}
    return str(b.get("commit") or b.get("git_commit") or "")


def case_from_step(step: dict[str, Any], *, scenario: str = "") -> Case:
    """One bisect step (an entry of bisect.json's "steps") as a testcase; its
    record.json, when still there, gives the results directory and accelerator."""
    rec: dict[str, Any] = {}
    f = Path(str(step.get("record", "")))
    if f.is_file():
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            rec = {}
    commit = str(step.get("commit", ""))
    props = {"results_dir": str(rec.get("results_dir") or f.parent), "accel": str(rec.get("accel", "")),
             "commit": commit, "label": str(step.get("label", "")), "git_bisect_code": str(step.get("code", ""))}
    return Case(name=f"step {step.get('n', '?')} {commit[:12]} {step.get('label', '')}".strip(),
                classname=f"lab.bisect.{scenario or rec.get('scenario', '?')}",
                verdict=str(step.get("verdict", "ERROR")), time_s=float(step.get("time_s") or 0.0),
                message=str(step.get("summary") or ""), properties=props,
                output=str(step.get("subject") or ""))


def to_xml(cases: Sequence[Case], *, suite: str = "xen-blklab") -> ET.Element:
    failures = sum(c.verdict in FAILURES for c in cases)
    errors = sum(c.verdict not in FAILURES and c.verdict != "PASS" for c in cases)
    total = sum(c.time_s for c in cases)
    root = ET.Element("testsuites", name=suite, tests=str(len(cases)), failures=str(failures), errors=str(errors),
                      time=f"{total:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                       errors=str(errors), skipped="0", time=f"{total:.3f}")
    for c in cases:
        tc = ET.SubElement(ts, "testcase", name=c.name, classname=c.classname, time=f"{c.time_s:.3f}")
        if c.properties:
            props = ET.SubElement(tc, "properties")
            for k, v in c.properties.items():
                ET.SubElement(props, "property", name=k, value=v)
        if c.verdict in FAILURES:
            ET.SubElement(tc, "failure", message=c.message, type=c.verdict).text = _text(c)
        elif c.verdict != "PASS":
            ET.SubElement(tc, "error", message=c.message, type=c.verdict).text = _text(c)
        if c.output:
            ET.SubElement(tc, "system-out").text = c.output
    return root


def write(path: Path, cases: Sequence[Case], *, suite: str = "xen-blklab") -> Path:
    """Write the JUnit XML file of these cases (atomically: CI may read it at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = ET.ElementTree(to_xml(cases, suite=suite))
    ET.indent(tree)
    tmp = path.with_name(f".{path.name}.tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
    return path


def _text(c: Case) -> str:
    """The verdict, then the summary (which a HANG's already starts with)."""
    return c.message if c.message.startswith(f"{c.verdict}:") else f"{c.verdict}: {c.message}"
