"""The verdict, as a pure function of what was observed (architecture.md, style.md
point 15). Nothing here talks to a machine: the pipeline gathers observations
(counter tracks, workload outcomes, console findings, samplers, liveness, lab
errors, the platform's own rule findings) and asks.

Precedence, most severe first, and why:
  CRASH  a crash signature on any console, or the Xen VM died: a definitive
         observation of the system under test, even when the lab lost its
         transports because of it;
  ERROR  anything that is not an observation of the system under test: an
         exception in the lab, a lost SSH transport, a sampler that died or
         delivered nothing, a failed host command. Bisect skips it (125);
  HANG   I/O stopped completing (in flight or still wanted by the workload), or
         never drained; "L1 unresponsive" is a HANG that bisect skips;
  FAIL   the workload saw errors, or the platform's rules found a broken
         invariant, or a test disk completed nothing;
  PASS   everything finished, progressed and drained.

`watch` is the same decision while the workload runs: it only ever stops early
(CRASH, ERROR, HANG). `decide` is the final one."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.platform import Finding
from lab.watchdog import Drain, Track, check_drain, check_hang

EXIT_CODES = {"PASS": 0, "FAIL": 1, "HANG": 2, "CRASH": 3, "ERROR": 4}
# as a `git bisect run` step: a lab failure (ERROR) never blames a commit
BISECT_CODES = {"PASS": 0, "FAIL": 1, "HANG": 1, "CRASH": 1, "ERROR": 125}


# ---------------------------------------------------------------- observations
@dataclass(frozen=True)
class WorkloadObs:
    """One workload's outcome as the lab saw it."""

    key: str  # guest/vdev
    running: bool  # the tool had not exited when the observation was made
    rc: int | None = None  # the tool's exit code (None: not exited)
    errors: int | None = None  # I/O errors the tool reported (None: no result)
    no_result: str = ""  # why there is no parsed result ("" when there is one)
    stopped_by_lab: bool = False  # the lab's deadline ended it (the remote `timeout` fired)
    transport_error: str = ""  # the lab lost the channel it ran on
    stderr: str = ""
    lab_failure: str = ""  # the tool says it could not run at all (not the backend's doing)
    problems: tuple[str, ...] = ()  # what the tool says each error was (blkring: the case, expected, got)


@dataclass(frozen=True)
class ConsoleFinding:
    console: str  # "xen", a guest's name
    kind: str  # "Linux oops", "Linux BUG", "hung task", ...
    line: str


@dataclass(frozen=True)
class SamplerObs:
    name: str
    lines: int
    last_t: float | None
    error: str | None
    ended_early: bool


@dataclass(frozen=True)
class LabFailure:
    """Something the lab got wrong: never a verdict on the system under test."""

    stage: str
    message: str


@dataclass(frozen=True)
class FaultObs:
    kind: str
    started_at: float | None
    # a lifecycle operation's outcome (lab/faults.py Outcome), once it ended
    ended: bool = False
    ok: bool = True
    timed_out: bool = False
    transport_error: str = ""
    failed: str = ""
    leftovers: tuple[str, ...] = ()
    detail: str = ""
    target: str = ""  # guest or guest/disk
    ended_at: float | None = None


@dataclass(frozen=True)
class Observations:
    stage: str  # where the run was when observed
    now: float  # seconds since the workload started
    tracks: Sequence[Track] = ()
    workloads: Sequence[WorkloadObs] = ()
    consoles: Sequence[ConsoleFinding] = ()
    samplers: Sequence[SamplerObs] = ()
    vm_alive: bool = True
    vm_rc: int | None = None
    # dom0's SSH probe, made only once every sampler fell silent for the stall
    # window: True answered, False did not, None not probed
    dom0_probe_ok: bool | None = None
    console_silent_s: float = 0.0  # how long the Xen console has not grown
    lab_failures: Sequence[LabFailure] = ()
    findings: Sequence[Finding] = ()  # the dom0 platform's rules
    faults: Sequence[FaultObs] = ()
    workload_deadline_passed: bool = False
    gone: tuple[str, ...] = ()  # guests a lifecycle fault destroyed: not judged after it
    t_end: float | None = None  # when the workloads ended (final decision only)
    expect_errors: bool = False  # the scenario expects I/O errors (an `error` fault)


@dataclass(frozen=True)
class Config:
    stall_window: float
    drain_window: float
    workload_grace: float
    probe_seconds: float = 5.0


@dataclass(frozen=True)
class Verdict:
    verdict: str
    stage: str
    summary: str
    hang: dict[str, Any] | None = None
    drain: dict[str, Drain] = field(default_factory=dict)
    rule: str = ""  # which rule decided: a test and a reader can name it

    @property
    def bisect_code(self) -> int:
        if self.verdict == "HANG" and (self.hang or {}).get("l1_unresponsive"):
            return 125  # the host may have stalled, not the commit
        return BISECT_CODES[self.verdict]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


# ---------------------------------------------------------------- the rules
def _crash(obs: Observations) -> Verdict | None:
    if obs.consoles:
        c = obs.consoles[0]
        return Verdict("CRASH", obs.stage, f"{c.kind} on the {c.console} console: {c.line}", rule="console")
    if not obs.vm_alive:
        return Verdict("CRASH", obs.stage, f"QEMU (the Xen VM) exited with rc {obs.vm_rc}", rule="vm-died")
    return None


def _lab_error(obs: Observations, *, final: bool) -> Verdict | None:
    if obs.lab_failures:
        f = obs.lab_failures[0]
        return Verdict("ERROR", f.stage, f"lab failed at stage {f.stage}: {f.message}", rule="lab-failure")
    for w in obs.workloads:
        if w.transport_error:
            return Verdict("ERROR", obs.stage, f"lab lost the connection running the workload on {w.key}: "
                           f"{w.transport_error}", rule="transport")
        if w.lab_failure:
            return Verdict("ERROR", obs.stage, f"the workload on {w.key} could not run: {w.lab_failure}",
                           rule="workload-lab")
    for s in obs.samplers:
        if s.ended_early:
            return Verdict("ERROR", obs.stage, f"lab's sampler on {s.name} died: {s.error}", rule="sampler-died")
        if final and s.lines == 0:
            return Verdict("ERROR", obs.stage, f"lab's sampler on {s.name} delivered no sample", rule="sampler-empty")
    return None


def _silent_since(obs: Observations) -> float:
    return max((s.last_t for s in obs.samplers if s.last_t is not None), default=0.0)


def samplers_silent(obs: Observations, cfg: Config) -> bool:
    """Every sampler silent for the stall window: time to probe dom0 (the
    pipeline does, and passes the answer back as `dom0_probe_ok`)."""
    return bool(obs.samplers) and obs.now - _silent_since(obs) >= cfg.stall_window


def _unresponsive(obs: Observations, cfg: Config) -> Verdict | None:
    """"L1 unresponsive", from what a wedged host shows: no samples from any
    machine, dom0's SSH probe past its deadline, QEMU alive; never from QEMU's run
    state. If dom0 answers while every sampler is silent, the samplers are the
    lab's problem."""
    if obs.dom0_probe_ok is None or not samplers_silent(obs, cfg):
        return None
    last = _silent_since(obs)
    if obs.dom0_probe_ok:
        return Verdict("ERROR", obs.stage, f"lab's samplers delivered nothing for {obs.now - last:.0f}s "
                       "while dom0 answered its SSH probe", rule="samplers-silent")
    hang = {
        "cause": "L1 unresponsive", "l1_unresponsive": True,
        "detected_at_s": round(obs.now, 2), "last_progress_at_s": round(last, 2),
        "detected_after_s": round(obs.now - last, 2),
        "evidence": f"no samples from dom0 or guests for {obs.now - last:.0f}s; dom0's SSH probe got no answer "
                    f"within {cfg.probe_seconds:.0f}s; Xen console silent for {obs.console_silent_s:.0f}s; "
                    "QEMU process alive",
        "side_stopped_first": "both",
    }
    return _hang_verdict(obs, hang, "L1 unresponsive", rule="l1-unresponsive")


def _running(obs: Observations, key: str) -> bool:
    return any(w.key == key and w.running for w in obs.workloads)


# lifecycle operations that take a guest away for a while: its disks are not
# judged while one runs, and the stall clock starts again when it ended
SUSPENDING = ("save-restore",)
# ... and those that end its workload (the guest's disks are judged by the
# operation's own outcome from then on)
ENDING = ("destroy", "reboot")


def suspended(obs: Observations, guest: str) -> tuple[bool, float]:
    """(a suspending operation on `guest` is under way, when the last one ended)."""
    since = 0.0
    for f in obs.faults:
        if f.kind in SUSPENDING and f.target == guest and f.started_at is not None:
            if not f.ended:
                return True, since
            since = max(since, f.ended_at or 0.0)
    return False, since


def _stalled(obs: Observations, cfg: Config) -> Verdict | None:
    for tr in obs.tracks:
        away, since = suspended(obs, tr.guest)
        if away:
            continue
        h = check_hang(tr, obs.now, cfg.stall_window, io_running=_running(obs, tr.key), since=since)
        if h:
            return _hang_verdict(obs, h.as_dict(), h.cause, rule="no-progress")
    for f in obs.findings:
        if f.verdict == "HANG":
            return _hang_verdict(obs, {"disk": f.disk, **f.detail}, f.message, rule="platform")
    return None


def _hang_verdict(obs: Observations, hang: dict[str, Any], cause: str, *, rule: str) -> Verdict:
    hang = dict(hang)
    hang.setdefault("cause", cause)
    started = [f for f in obs.faults if f.kind in ("stall", "pause-l1") and f.started_at is not None]
    if started and "detected_at_s" in hang:
        # for an induced fault, detection latency counts from its recorded start
        f = min(started, key=lambda f: f.started_at or 0.0)
        assert f.started_at is not None
        hang["fault_started_at_s"] = round(f.started_at, 2)
        hang["detected_after_s"] = round(hang["detected_at_s"] - f.started_at, 2)
        hang["detected_after_from"] = f"fault {f.kind}"
    hang.setdefault("detected_after_from", "last progress")
    return Verdict("HANG", obs.stage, hang_summary(hang, cause, hang.get("last_progress_at_s")), hang=hang,
                   rule=rule)


def hang_summary(hang: dict[str, Any], cause: str, t: float | None) -> str:
    """One line: what stopped, where, and since when."""
    since = f" since t={t:.0f}s of the workload" if t is not None else ""
    where = ""
    if hang.get("backend_taken") is not None and hang.get("guest_completed") is not None:
        held = hang["backend_taken"] - hang["guest_completed"]
        where = (f"; dom0: blkback took {hang['backend_taken']} requests, {held} not completed to the guest, "
                 f"{hang.get('backing_inflight')} in flight on the backing device")
    elif hang.get("evidence"):
        where = f": {hang['evidence']}"
    first = hang.get("side_stopped_first")
    side = f"; stopped first: {first}" if first and first != "unknown" else ""
    return f"HANG: {cause}{since}{where}{side}"


def watch(obs: Observations, cfg: Config) -> Verdict | None:
    """While the workload runs: a verdict as soon as one is certain, else None."""
    return (_crash(obs) or _lab_error(obs, final=False) or _fault_lab_error(obs) or _unresponsive(obs, cfg)
            or _stalled(obs, cfg) or _fault_hang(obs) or _deadline(obs, cfg))


def _fault_lab_error(obs: Observations) -> Verdict | None:
    for f in obs.faults:
        if f.transport_error:
            return Verdict("ERROR", f"fault:{f.kind}", f"lab failed carrying out {f.kind} on {f.target}: "
                           f"{f.transport_error}", rule="fault-lab")
    return None


def _fault_hang(obs: Observations) -> Verdict | None:
    """A lifecycle operation that never completed (its step ran out of time)."""
    for f in obs.faults:
        if f.timed_out:
            hang = {"cause": f"{f.kind} of {f.target} never completed", "fault": f.kind, "detail": f.detail}
            return Verdict("HANG", f"fault:{f.kind}", f"HANG: {f.kind} of {f.target}: {f.detail}", hang=hang,
                           rule="fault-hang")
    return None


def _fault_fail(obs: Observations) -> list[str]:
    out = []
    for f in obs.faults:
        if f.failed:
            out.append(f"{f.kind} of {f.target}: {f.failed}")
        if f.leftovers:
            out.append(f"{f.kind} of {f.target} left behind: " + "; ".join(f.leftovers))
    return out


def _deadline(obs: Observations, cfg: Config) -> Verdict | None:
    """The workload outlived its runtime plus grace: I/O stopped being completed
    for it, whatever the in-flight counts say."""
    late = [w.key for w in obs.workloads if w.running or w.stopped_by_lab]
    if not (obs.workload_deadline_passed and late) and not any(w.stopped_by_lab for w in obs.workloads):
        return None
    cause = f"workload on {', '.join(late)} still running {cfg.workload_grace:.0f}s past its runtime"
    return _hang_verdict(obs, {"cause": cause, "disks": late}, cause, rule="workload-deadline")


def drains(tracks: Sequence[Track], t_end: float) -> dict[str, Drain]:
    return {tr.key: check_drain(tr, t_end) for tr in tracks}


def decide(obs: Observations, cfg: Config) -> Verdict:
    """The final verdict, once the workloads ended (or the run stopped)."""
    early = (_crash(obs) or _lab_error(obs, final=True) or _fault_lab_error(obs) or _unresponsive(obs, cfg)
             or _stalled(obs, cfg) or _fault_hang(obs) or _deadline(obs, cfg))
    if early:
        return early
    dr = drains(obs.tracks, obs.t_end if obs.t_end is not None else obs.now)
    for tr in obs.tracks:
        d = dr[tr.key]
        if suspended(obs, tr.guest)[1] and d.mismatches and d.guest_inflight == 0 and d.backing_inflight == 0:
            # the frontend re-issues after the restore what was pending at the
            # save, and the old connection may have counted it already
            dr[tr.key] = dataclasses.replace(d, drained=True, not_compared="a save-restore: requests pending at "
                                             "the save are counted by both connections")
    for key, d in dr.items():
        if d.drained:
            continue
        if d.guest_inflight is None or d.backing_inflight is None:
            return Verdict("ERROR", "drain", f"lab has no samples of {key} after the workload ended", drain=dr,
                           rule="drain-no-samples")
    for key, d in dr.items():
        if not d.drained:
            why = ("requests still in flight" if (d.guest_inflight or d.backing_inflight)
                   else "; ".join(d.mismatches))
            hang = {"disk": key, "cause": "never drained", **d.as_dict()}
            return Verdict("HANG", "drain", f"{key} did not drain within {cfg.drain_window:.0f}s: {why}",
                           hang=hang, drain=dr, rule="drain")
    errors: list[str] = []
    for w in obs.workloads:
        if w.errors and not obs.expect_errors:
            errors.append(f"{w.key}: the workload reported {w.errors} errors"
                          + (": " + "; ".join(_clip(p, 240) for p in w.problems[:8]) if w.problems else ""))
        elif w.errors:
            errors.append(f"{w.key}: the workload reported {w.errors} errors (expected by the scenario's faults)")
        if w.no_result:
            errors.append(f"{w.key}: no workload result (rc {w.rc}: {w.no_result})")
        elif w.rc not in (0, None) and not (w.problems and w.errors):  # else said above, in the tool's words
            errors.append(f"{w.key}: the workload exited {w.rc}: {w.stderr.strip()[-300:]}")
    errors += [f.message for f in obs.findings if f.verdict == "FAIL"]
    errors += _fault_fail(obs)
    if errors:
        return Verdict("FAIL", "workload", "; ".join(errors), drain=dr, rule="errors")
    idle = [tr.key for tr in obs.tracks
            if not (tr.guest_pts and tr.guest_pts[-1].completed > tr.guest_pts[0].completed)]
    if idle:
        return Verdict("FAIL", "workload", f"no I/O completed on {', '.join(idle)}", drain=dr, rule="no-io")
    summary = "all workloads finished, progressed and drained"
    if obs.gone:
        how = {f.target: f.kind for f in obs.faults if f.kind in ENDING}
        verbs = {"destroy": "destroyed", "reboot": "rebooted"}
        names = ", ".join(f"{g} {verbs.get(how.get(g, 'destroy'), 'ended')}" for g in obs.gone)
        summary = (f"{names} by a lifecycle fault as planned (its workload not judged after it); "
                   f"every other workload finished, progressed and drained" if obs.tracks
                   else f"{names} by a lifecycle fault as planned, after progressing; "
                   "nothing of the old domain left behind")
    return Verdict("PASS", "done", summary, drain=dr, rule="pass")


# Stages from which a crash on a console is the system under test's: the backend
# under test is in place. Before it (setup, images, L1 boot) and while guests boot
# (they do not use the backend) a crash is the lab's ERROR, with the console tail.
CRASH_STAGES = ("backend", "guest:attach", "workload", "drain", "done", "teardown", "teardown:detach",
                "teardown:destroy", "teardown:unload")


def with_consoles(v: Verdict, findings: Sequence[ConsoleFinding], *, interrupted: bool = False) -> Verdict:
    """The verdict once every console has been read (guest consoles are fetched
    from dom0 only at the end): a crash signature anywhere outranks any other
    outcome of a run that got as far as the backend, even one that passed."""
    if v.verdict == "HANG":  # a hung-task report is the hang's own evidence, not another outcome
        findings = [f for f in findings if f.kind != "hung task"]
    if interrupted or v.verdict == "CRASH" or not findings or v.stage not in CRASH_STAGES:
        return v
    c = findings[0]
    return Verdict("CRASH", v.stage, f"{c.kind} on the {c.console} console: {c.line}", hang=v.hang, drain=v.drain,
                   rule="console")


def after_teardown(v: Verdict, td: Any) -> Verdict:
    """The verdict once the orderly teardown inside L1 ran (lab/teardown.py): a
    crash during it is CRASH, a step that never completed is HANG at its
    `teardown:` stage, the lab losing dom0 is ERROR, anything of the backend left
    behind is FAIL naming it. Only a PASS or a FAIL is taken further; the most
    severe finding wins."""
    if v.verdict not in ("PASS", "FAIL") or td.skipped:
        return v
    for s in td.steps:
        if s.crash is not None:
            return Verdict("CRASH", f"teardown:{s.kind}", f"{s.crash.kind} on the {s.crash.console} console during "
                           f"teardown (`{s.name}`): {s.crash.line}", rule="teardown-crash")
    for s in td.steps:
        if s.transport_error:
            return Verdict("ERROR", f"teardown:{s.kind}", f"lab lost dom0 during teardown (`{s.name}`): "
                           f"{s.transport_error}", rule="transport")
    for s in td.steps:
        if s.timed_out:
            hang = {"cause": f"teardown step `{s.name}` never completed", "step": s.name, "elapsed_s": s.elapsed}
            return Verdict("HANG", f"teardown:{s.kind}", f"HANG: teardown step `{s.name}` did not complete "
                           f"within {s.elapsed:.0f}s", hang=hang, rule="teardown-hang")
    failed = [f"`{s.name}` failed: {s.detail}" for s in td.steps if not s.ok and s.kind != "unload"]
    left = failed + list(td.leftovers)
    if not left:
        return v
    summary = "FAIL: teardown: " + "; ".join(left)
    if v.verdict == "FAIL":
        summary = f"{v.summary}; {summary}"
    return Verdict("FAIL", "teardown", summary, drain=v.drain, rule="teardown-leftover")


def error(stage: str, message: str) -> Verdict:
    """A run that could not get to a decision (setup, boot, guests...)."""
    return Verdict("ERROR", stage, f"lab failed at stage {stage}: {message}", rule="lab-failure")


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"
