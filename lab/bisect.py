"""`lab bisect`: find the commit that broke I/O, with `git bisect run`.

Each step builds the backend at the repository's HEAD and runs the scenario; the
verdict maps to git's codes (PASS 0 good; FAIL/HANG/CRASH 1 bad; ERROR and "L1
unresponsive" 125 skip: a lab failure never blames a commit). If the lab cannot
even reach the `backend` stage (it cannot boot), the step exits 128 and git stops
the bisection at once instead of skipping every commit.

Confirm before blaming (OSSTest's rule): the first bad commit is reported only
after N runs at it all fail and N runs at its parent all pass; otherwise the
result is "not reproducible".

Ctrl-C, SIGTERM and SIGHUP leave the repository as it was: `git bisect run` runs
in its own process group, which is ended (SIGTERM, so the lab step inside tears
its QEMU down; SIGKILL after a grace) and waited for; then `git bisect reset`,
and a check that HEAD is back where it was with no BISECT_* state. "Restored" is
said only when that check passed; otherwise the error says what is left.

What "the backend built from the repository" means is the dom0 platform's to say
(`with_backend_source`): [backend] source on a Linux dom0 (the default), the dom0
kernel's tree ([freebsd] src) on a FreeBSD one. Before anything touches the
repository, the platform's `preflight` refuses what `lab run` would refuse first
(a FreeBSD dom0 without media: the same ERROR, exit 4, in seconds). `plan` lists
the per-step work without running it."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from lab import report, scenario
from lab.errors import Interrupted, LabError
from lab.runner import die_with_parent, end_group, set_parent_death_signal, signals_deferred, signals_held

log = logging.getLogger("lab.bisect")
ABORT = 128  # git bisect run: an exit code >= 128 stops the bisection
STOP_GRACE_S = 60.0  # a step's own unwinding (QEMU killed, record written) takes seconds
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


def with_source(sc: scenario.Scenario, repo: Path) -> scenario.Scenario:
    """`sc` with `repo` as the tree of the backend under test, where the dom0
    platform puts it (its `with_backend_source`)."""
    from lab.platforms import dom0_platform

    return dom0_platform(sc.dom0.os).with_backend_source(sc, repo)


def preflight(sc: scenario.Scenario) -> None:
    """The dom0 platform's own check of what a run needs before it starts (media):
    raises the LabError `lab run` would end with."""
    from lab.platforms import dom0_platform

    dom0_platform(sc.dom0.os).preflight(sc)


def _bisect_run(argv: list[str], log_path: Path, stray: list[int]) -> subprocess.CompletedProcess[str]:
    """`git bisect run`, its output kept in `log_path` and shown as it comes: where
    git is in the range ("Bisecting: N revisions left") and each lab step's start
    and end (a bisect takes minutes per step; silence for ten minutes reads as hung).

    It runs in its own process group (its own session), and on any exception,
    Ctrl-C and SIGTERM included, that whole group is ended and waited for before
    the exception goes on: git, the step, and whatever the step runs in the
    group. Pids that would not die are put in `stray`."""

    shown = ("Bisecting:", "step ", "is the first bad commit", "bisect found")
    lines: list[str] = []
    with open(log_path, "w") as logf:
        proc: subprocess.Popen[str] | None = None
        try:
            with signals_held():  # a signal while Popen returns is raised once `proc` is bound
                proc = subprocess.Popen(argv, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent())
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                logf.write(line)
                logf.flush()
                if line.startswith(shown) or " is the first bad commit" in line:
                    print(f"  {line.rstrip()}", flush=True)
            rc = proc.wait()
        except BaseException:
            if proc is not None:
                with signals_deferred():  # a second Ctrl-C must not cut this short
                    _drain(proc, logf)  # an unread pipe would block the step while it unwinds
                    stray += end_group(proc, grace=STOP_GRACE_S)
            raise
    return subprocess.CompletedProcess(argv, rc, "".join(lines), "")


def _drain(proc: subprocess.Popen[str], logf: IO[str]) -> None:
    def copy() -> None:
        try:
            for line in proc.stdout or ():
                logf.write(line)
        except (OSError, ValueError):
            pass

    threading.Thread(target=copy, name="bisect-drain", daemon=True).start()


def _step_argv(sc: scenario.Scenario, repo: Path, out: Path, accel: str | None) -> list[str]:
    """What `git bisect run` runs at each commit."""
    argv = [sys.executable, "-m", "lab.bisect", "step", "--scenario", str(Path(sc.source).resolve()),
            "--repo", str(repo), "--out", str(out)]
    return argv + (["--accel", accel] if accel else [])


def _left_in(repo: Path, orig: str, *, branch: bool) -> list[str]:
    """What is not as it was before the bisection: [] when HEAD is `orig` (on
    that branch if it was one), no BISECT_* file or refs/bisect/ ref exists, no
    index.lock, and no tracked file is modified. Checked, not assumed."""
    left: list[str] = []
    top = git(repo, "rev-parse", "--absolute-git-dir", check=False)
    if not top:
        return [f"{repo} cannot be read as a git repository any more"]
    gitdir = Path(top)
    state = sorted(p.name for p in gitdir.glob("BISECT_*"))
    if state:
        left.append(f"{', '.join(state)} in {gitdir}")
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/bisect/", check=False)
    if refs:
        left.append(f"{len(refs.splitlines())} refs under refs/bisect/")
    if (gitdir / "index.lock").exists():
        left.append(f"{gitdir / 'index.lock'}")
    on = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    head = git(repo, "rev-parse", "HEAD", check=False)
    if branch and on != orig:
        left.append(f"HEAD is {'on ' + on if on else 'detached at ' + head[:12]}, not on branch {orig}")
    elif not branch and (on or head != orig):
        left.append(f"HEAD is {'on ' + on if on else head[:12]}, not detached at {orig[:12]}")
    status = git(repo, "status", "--porcelain", "--untracked-files=no", check=False)
    if status:
        left.append(f"modified files: {' '.join(line[3:] for line in status.splitlines()[:5])}")
    return left


def _put_back(repo: Path, orig: str, *, branch: bool, stray: list[int]) -> list[str]:
    """`git bisect reset` to where the repository was, then what is left (see _left_in)."""
    left = [f"`git bisect run` processes that would not die: {sorted(set(stray))}"] if stray else []
    res = subprocess.run(["git", "-C", str(repo), "bisect", "reset", orig], capture_output=True, text=True,
                         timeout=120)
    problems = _left_in(repo, orig, branch=branch)
    if problems and res.returncode != 0:
        problems.append(f"`git bisect reset {orig}` said: {(res.stderr or res.stdout).strip()[-300:]}")
    return left + problems


def run_step(sc: scenario.Scenario, repo: Path, out: Path, *, label: str = "", accel: str | None = None,
             cold: bool = False) -> dict:
    """One lab run of `sc` with the backend built from `repo` at its HEAD."""
    from lab import pipeline

    sha = git(repo, "rev-parse", "HEAD")
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    n = len(list(steps.iterdir())) + 1
    d = steps / f"{n:02d}-{sha[:12]}{'-' + label if label else ''}"
    sc = with_source(sc, repo)
    print(f"step {n}: {sha[:12]} {git(repo, 'log', '-1', '--format=%s')!r}: starting"
          f"{' (' + label + ')' if label else ''}", flush=True)
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
    """The bisection. SIGTERM and SIGHUP unwind like Ctrl-C (Interrupted); after
    an interruption the repository is put back and checked: the interruption goes
    on if it is back as it was, else a LabError says what is left."""
    from lab.pipeline import signals_as_interrupts

    with signals_as_interrupts():
        return _bisect(scenario_spec, repo, good, bad, runs=runs, results_root=results_root, accel=accel)


def _bisect(scenario_spec: str, repo: Path, good: str, bad: str, *, runs: int, results_root: Path,
            accel: str | None) -> dict:

    sc = scenario.load(scenario_spec)
    repo = repo.resolve()
    preflight(sc)  # e.g. a FreeBSD dom0 without media: lab run's ERROR, before git is touched
    with_source(sc, repo)  # a tree the platform cannot use is refused now, not skipped at every step
    if git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise LabError("bisect", f"{repo} has uncommitted changes: commit or stash them first")
    good_sha, bad_sha = git(repo, "rev-parse", good), git(repo, "rev-parse", bad)
    # absolute: `git bisect run` runs each step in the repository's top directory
    # claimed, not just made: two bisects started in the same second each get one
    out = report.claim(results_root / "bisect").resolve()
    t0 = time.monotonic()
    result: dict = {"scenario": sc.name, "repo": str(repo), "good": good_sha, "bad": bad_sha, "runs": runs,
                    "first_bad": None, "results_dir": str(out)}
    branch = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    orig = branch or git(repo, "rev-parse", "HEAD")
    stray: list[int] = []
    failed: BaseException | None = None
    try:
        git(repo, "bisect", "start", bad_sha, good_sha)
        proc = _bisect_run(["git", "-C", str(repo), "bisect", "run", *_step_argv(sc, repo, out, accel)],
                           out / "git-bisect-run.log", stray)
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
    except BaseException as e:
        failed = e
        raise
    finally:
        with signals_deferred():  # the repository is put back even through a second Ctrl-C
            left = _put_back(repo, orig, branch=bool(branch), stray=stray)
            where = f"branch {orig}" if branch else f"{orig[:12]} (detached)"
            result["repository"] = (f"restored: on {where}, no BISECT_* state" if not left
                                    else f"NOT restored: {'; '.join(left)}")
            result["steps"] = _steps(out)
            result["total_s"] = round(time.monotonic() - t0, 1)
            report.write_record(out / "bisect.json", result)
        _write_html(out)
        if left and isinstance(failed, (KeyboardInterrupt, Interrupted)):
            why = "Ctrl-C" if isinstance(failed, KeyboardInterrupt) else str(failed)
            raise LabError("bisect", f"interrupted ({why}); the repository is NOT restored: {'; '.join(left)} "
                           f"(`git -C {shlex.quote(str(repo))} bisect reset {shlex.quote(orig)}` by hand); "
                           f"results so far in {out}") from failed
        if left and failed is not None:
            print(f"lab bisect: the repository is NOT restored: {'; '.join(left)}", file=sys.stderr)
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


def plan(scenario_spec: str, repo: Path, good: str, bad: str, *, runs: int, accel: str | None = None
         ) -> list[dict[str, Any]]:
    """What `lab bisect` would do, run nothing: the bisection's git commands, the
    dom0 platform's plan of one step with `repo` as the backend's tree (the very
    list `lab run --plan` prints for that scenario), the verdict-to-git mapping
    and the confirmation runs."""
    from lab.platforms import dom0_platform

    sc = scenario.load(scenario_spec)
    repo = repo.resolve()
    step_sc = with_source(sc, repo)
    good_sha = git(repo, "rev-parse", good, check=False) or good
    bad_sha = git(repo, "rev-parse", bad, check=False) or bad
    count = git(repo, "rev-list", "--count", f"{good_sha}..{bad_sha}", check=False)
    n = int(count) if count.isdigit() else None
    out = "$RESULTS/bisect/<utc stamp>"
    step_argv = [sys.executable, "-m", "lab.bisect", "step", "--scenario", str(Path(sc.source).resolve()),
                 "--repo", str(repo), "--out", out, *(["--accel", accel] if accel else [])]
    size = (f"{n} commits in {good}..{bad}: about {max(1, math.ceil(math.log2(n + 1)))} steps" if n is not None
            else f"{good}..{bad} (not resolvable here)")
    steps: list[dict[str, Any]] = [
        {"step": "preflight", "what": "the dom0 platform's check of what a run needs (media), the tree checked "
         "usable, the repository clean; else ERROR, exit 4, before git is touched"},
        {"step": "bisect-start", "what": size, "command": ["git", "-C", str(repo), "bisect", "start", bad_sha, good_sha]},
        {"step": "bisect-run", "what": "git checks out each commit and runs one lab step there: the steps below, "
         "where everything cached stays cached (media and the provisioned image are made once; a kernel once per "
         "tree hash)",
         "command": ["git", "-C", str(repo), "bisect", "run", *step_argv]},
    ]
    for st in dom0_platform(sc.dom0.os).plan(step_sc):
        steps.append({**st, "step": f"each step: {st['step']}"})
    steps += [
        {"step": "each step: verdict", "what": "PASS -> 0 (good); FAIL, HANG, CRASH -> 1 (bad); ERROR and L1 "
         f"unresponsive -> 125 (skip); ERROR before the backend stage ({', '.join(EARLY_STAGES)}) -> {ABORT} "
         f"(stops the bisection). One line per step in {out}/steps.jsonl"},
        {"step": "confirm", "what": f"{runs} runs at git's first bad commit must all FAIL/HANG/CRASH and {runs} at "
         "its parent all PASS, else 'not reproducible'"},
        {"step": "reset", "what": "the repository back where it was, on every exit",
         "command": ["git", "-C", str(repo), "bisect", "reset"]},
    ]
    return steps


def plan_lines(res: list[dict[str, Any]], *, title: str) -> list[str]:
    """The plan as `lab run --plan` prints one."""
    lines = [f"# {title}; {len(res)} steps, nothing has been run"]
    for i, st in enumerate(res, 1):
        lines.append(f"\n{i:2}. [{st['step']}] {st['what']}")
        for k in ("url", "path", "command", "then", "script", "milestones", "fails_on", "unverified"):
            if k not in st:
                continue
            v = st[k]
            if k in ("command", "then") and isinstance(v, list):
                lines.append(f"      {'$' if k == 'command' else 'then $'} {shlex.join(str(a) for a in v)}")
            elif k == "then":
                lines.append(f"      then: {v}")
            elif isinstance(v, list):
                lines.append(f"      {k}:")
                lines += [f"        {line}" for line in v]
            else:
                lines.append(f"      {k}: {v}")
    return lines


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
    if res.get("repository"):
        lines.append(f"repository: {res['repository']}")
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
    # `git bisect run` killed (its `lab bisect` was): unwind as for SIGTERM, QEMU goes too
    set_parent_death_signal(signal.SIGTERM)
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


def _write_html(out: Path) -> None:
    """The bisect's page (its steps, each step's report, culprit vs parent); a
    page that cannot be drawn never changes the result."""
    from lab import html

    try:
        html.write_report(out)
    except Exception as e:
        log.warning("bisect report.html not written: %s: %s", type(e).__name__, e)
