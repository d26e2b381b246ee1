"""`lab bisect`: find the commit that broke I/O, with `git bisect run`.

Each step builds the backend at the repository's HEAD and runs the scenario; the
verdict maps to git's codes (PASS 0 good; FAIL/HANG/CRASH 1 bad; ERROR and "L1
unresponsive" 125 skip: a lab failure never blames a commit). If the lab cannot
even reach the `backend` stage (it cannot boot), the step exits 128 and git stops
the bisection at once instead of skipping every commit.

Confirm before blaming (OSSTest's rule): the first bad commit is reported only
after N runs at it all fail and N runs at its parent all pass; otherwise the
result is "not reproducible". Ctrl-C leaves the repository as it was."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab import report, scenario
from lab.errors import LabError

log = logging.getLogger("lab.bisect")
ABORT = 128  # git bisect run: an exit code >= 128 stops the bisection
EARLY_STAGES = ("setup", "scenario", "image", "boot:qemu", "boot:xen", "boot:dom0", "boot:ssh", "boot:save",
                "boot:restore")


def step_code(rec: dict) -> int:
    """The exit code of one bisect step for `git bisect run`."""
    if rec["verdict"] == "ERROR" and rec.get("stage") in EARLY_STAGES:
        return ABORT
    return int(rec.get("bisect_code", report.BISECT_CODES[rec["verdict"]]))


def git(repo: Path, *args: str, check: bool = True, timeout: float = 120) -> str:
    res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise LabError("bisect", f"git {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def run_step(sc: scenario.Scenario, repo: Path, out: Path, *, label: str = "", accel: str | None = None,
             cold: bool = False) -> dict:
    """One lab run of `sc` with the backend built from `repo` at its HEAD."""
    from lab import pipeline

    sha = git(repo, "rev-parse", "HEAD")
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    n = len(list(steps.iterdir())) + 1
    d = steps / f"{n:02d}-{sha[:12]}{'-' + label if label else ''}"
    sc = dataclasses.replace(sc, backend=dataclasses.replace(sc.backend, source=str(repo)))
    t = time.monotonic()
    rec = pipeline.run(sc, pipeline.Options(results_root=out, results_dir=d, accel=accel, cold=cold))
    entry = {
        "n": n, "commit": sha, "subject": git(repo, "log", "-1", "--format=%s"), "label": label or "bisect",
        "verdict": rec["verdict"], "code": step_code(rec), "summary": rec.get("summary"),
        "stage": rec.get("stage"), "oo_req": [w.get("oo_req") for w in rec.get("workloads", [])],
        "time_s": round(time.monotonic() - t, 1), "record": str(d / "record.json"),
    }
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"step {n}: {sha[:12]} {entry['subject']!r}: {rec['verdict']} ({entry['time_s']:.0f}s) -> {entry['code']}",
          flush=True)
    return entry


def bisect(scenario_spec: str, repo: Path, good: str, bad: str, *, runs: int, results_root: Path,
           accel: str | None = None) -> dict:
    sc = scenario.load(scenario_spec)
    repo = repo.resolve()
    if git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise LabError("bisect", f"{repo} has uncommitted changes: commit or stash them first")
    good_sha, bad_sha = git(repo, "rev-parse", good), git(repo, "rev-parse", bad)
    # absolute: `git bisect run` runs each step in the repository's top directory
    out = (results_root / "bisect" / report.utc_stamp()).resolve()
    out.mkdir(parents=True)
    t0 = time.monotonic()
    result: dict = {"scenario": sc.name, "repo": str(repo), "good": good_sha, "bad": bad_sha, "runs": runs,
                    "first_bad": None, "results_dir": str(out)}
    orig = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False) or git(repo, "rev-parse", "HEAD")
    try:
        git(repo, "bisect", "start", bad_sha, good_sha)
        argv = [sys.executable, "-m", "lab.bisect", "step", "--scenario", str(Path(sc.source).resolve()),
                "--repo", str(repo), "--out", str(out)]
        if accel:
            argv += ["--accel", accel]
        proc = subprocess.run(["git", "-C", str(repo), "bisect", "run", *argv], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        (out / "git-bisect-run.log").write_text(proc.stdout)
        steps = _steps(out)
        if steps and steps[-1]["code"] == ABORT:
            result["reason"] = f"the lab cannot get to the backend stage: {steps[-1]['summary']}"
        else:
            first = git(repo, "rev-parse", "--verify", "-q", "refs/bisect/bad", check=False)
            if "is the first bad commit" not in proc.stdout or not first:
                result["reason"] = "git bisect found no single first bad commit (skipped steps?)"
            else:
                result["candidate"] = first
                result.update(_confirm(sc, repo, first, runs, out, accel))
    finally:
        git(repo, "bisect", "reset", orig, check=False)
        result["steps"] = _steps(out)
        result["total_s"] = round(time.monotonic() - t0, 1)
        report.write_record(out / "bisect.json", result)
    return result


def _confirm(sc: scenario.Scenario, repo: Path, first: str, runs: int, out: Path, accel: str | None) -> dict:
    """N runs at the candidate must all fail, N at its parent all pass."""
    parent = git(repo, "rev-parse", f"{first}^")
    verdicts: dict[str, list[str]] = {"bad": [], "parent": []}
    for sha, label, want in ((first, "confirm-bad", "bad"), (parent, "confirm-parent", "parent")):
        git(repo, "checkout", "-q", sha)
        for _ in range(runs):
            e = run_step(sc, repo, out, label=label, accel=accel)
            verdicts[want].append(e["verdict"])
    bad_ok = all(v in ("FAIL", "HANG", "CRASH") for v in verdicts["bad"])
    parent_ok = all(v == "PASS" for v in verdicts["parent"])
    conf: dict[str, Any] = {"confirm": {"first_bad_runs": verdicts["bad"], "parent_runs": verdicts["parent"], "parent": parent}}
    if bad_ok and parent_ok:
        conf["first_bad"] = first
        conf["subject"] = git(repo, "log", "-1", "--format=%s", first)
    else:
        conf["reason"] = "not reproducible: " + json.dumps(conf["confirm"])
    return conf


def _steps(out: Path) -> list[dict]:
    f = out / "steps.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def summary_lines(res: dict) -> list[str]:
    lines = [f"bisect {res['scenario']} over {res['repo']} ({res['good'][:12]}..{res['bad'][:12]}), "
             f"{res['total_s']:.0f}s"]
    for s in res.get("steps", []):
        lines.append(f"  {s['n']:2}  {s['commit'][:12]}  {s['verdict']:5} {s['label']:14} {s['time_s']:5.0f}s  "
                     f"{s['subject']}")
    if res.get("first_bad"):
        lines.append(f"first bad commit: {res['first_bad']} {res.get('subject', '')} "
                     f"(confirmed: {res['confirm']['first_bad_runs']} at it, {res['confirm']['parent_runs']} "
                     "at its parent)")
    else:
        lines.append(f"no first bad commit: {res.get('reason')}")
    lines.append(f"results: {res['results_dir']}/bisect.json")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m lab.bisect step ...`: what `git bisect run` calls at each commit."""
    ap = argparse.ArgumentParser(prog="lab.bisect")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("step")
    st.add_argument("--scenario", required=True)
    st.add_argument("--repo", type=Path, required=True)
    st.add_argument("--out", type=Path, required=True)
    st.add_argument("--accel")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused channels while a guest boots
    try:
        sc = scenario.load(args.scenario)
        return run_step(sc, args.repo.resolve(), args.out, accel=args.accel)["code"]
    except KeyboardInterrupt:
        return ABORT
    except Exception as e:  # not a verdict on this commit: skip it (never "bad")
        print(f"lab bisect step: ERROR: {type(e).__name__}: {e}", file=sys.stderr)
        return report.BISECT_CODES["ERROR"]


if __name__ == "__main__":
    sys.exit(main())
