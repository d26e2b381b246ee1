"""lab/decide.py: the verdict as a pure function, driven by a table of cases.

The counter series are the captures of two real runs in tests/data (README there:
a `default` PASS and the dm-suspend negative control's HANG), cut where the case
needs; everything else in a case (workload outcomes, samplers, consoles, probes)
is what the pipeline would observe. Each case names the rule that shall decide,
so a change that reaches the same verdict by another rule fails too."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from labdata import csv_rows, track_from_rows

from lab import decide
from lab.decide import ConsoleFinding, FaultObs, LabFailure, Observations, SamplerObs, WorkloadObs
from lab.platform import Finding
from lab.watchdog import BackendPoint, GuestPoint, Track

CFG = decide.Config(stall_window=15.0, drain_window=30.0, workload_grace=120.0)
PASS_END = 34.0  # the PASS capture's workload ended here (fio ran 30 s + start-up)
KEY = "lin1/xvdb"


def pass_track(until: float | None = None) -> Track:
    tr = track_from_rows(csv_rows("counters-default-pass.csv"))
    if until is not None:
        tr.guest_pts = [p for p in tr.guest_pts if p.t <= until]
        tr.backend_pts = [p for p in tr.backend_pts if p.t <= until]
    return tr


def hang_track() -> Track:
    return track_from_rows(csv_rows("counters-dm-suspend-hang.csv"))


def stuck_without_inflight() -> Track:
    """The PASS capture up to t=20 s, then the guest's completions frozen with its
    block layer showing nothing in flight (fio's requests stuck above it) for 20 s."""
    tr = pass_track(until=20.0)
    last = tr.guest_pts[-1]
    tr.guest_pts += [GuestPoint(20.0 + k, last.completed, 0) for k in range(1, 21)]
    return tr


def idle_track() -> Track:
    """A test disk on which nothing was ever completed, nor taken by the backend."""
    tr = pass_track()
    return replace(tr, guest_pts=[GuestPoint(t, 0, 0) for t in (1.0, 35.0)],
                   backend_pts=[BackendPoint(p.t, {k: 0 for k in p.stats}) for p in tr.backend_pts])


def samplers(n: float = 35.0, **kw: object) -> list[SamplerObs]:
    base = [SamplerObs("dom0", 35, n, None, False), SamplerObs("lin1", 35, n, None, False)]
    return [replace(base[0], **kw), base[1]] if kw else base  # type: ignore[arg-type]


OK_WL = WorkloadObs(KEY, running=False, rc=0, errors=0)


@dataclass
class Case:
    id: str
    obs: Observations
    verdict: str
    rule: str
    bisect: int
    final: bool = True  # decide() (final) or watch() (live)
    consoles: list[ConsoleFinding] = field(default_factory=list)  # read at the end (with_consoles)
    interrupted: bool = False


def final(**kw: object) -> Observations:
    base: dict[str, object] = dict(stage="drain", now=40.0, tracks=[pass_track()], workloads=[OK_WL],
                                   samplers=samplers(), t_end=PASS_END)
    base.update(kw)
    return Observations(**base)  # type: ignore[arg-type]


def live(**kw: object) -> Observations:
    base: dict[str, object] = dict(stage="workload", now=20.0, tracks=[pass_track(until=20.0)],
                                   workloads=[WorkloadObs(KEY, running=True)], samplers=samplers(20.0))
    base.update(kw)
    return Observations(**base)  # type: ignore[arg-type]


def recounted_track() -> Track:
    """The PASS capture with 3 reads more on the backend's side at the end: what a
    frontend re-issuing after a restore what the old connection had counted does."""
    tr = pass_track()
    last = tr.backend_pts[-1]
    more = {**last.stats, "rd_req": last.stats["rd_req"] + 3, "taken": last.stats["taken"] + 3}
    return replace(tr, backend_pts=[*tr.backend_pts[:-1], BackendPoint(last.t, more)])


def save_restore(start: float, end: float | None) -> FaultObs:
    return FaultObs("save-restore", start, ended=end is not None, ok=True, target="lin1", ended_at=end)


CRASH_LINE = ConsoleFinding("lin1", "Linux oops", "Oops: 0000 [#1] PREEMPT SMP NOPTI")
CASES = [
    Case("pass: finished, progressed, drained", final(), "PASS", "pass", 0),
    Case("live: healthy progress decides nothing yet", live(), "", "", 0, final=False),
    Case("hang: completions stuck with 32 in flight (real dm-suspend capture)",
         live(now=27.5, tracks=[hang_track()], samplers=samplers(27.0)), "HANG", "no-progress", 1, final=False),
    Case("hang: fio still running, stuck, nothing in the guest's block layer",
         live(now=40.5, tracks=[stuck_without_inflight()], samplers=samplers(40.0)), "HANG", "no-progress", 1,
         final=False),
    Case("hang: the lab's deadline stopped fio (rc 124), whatever the in-flight count",
         final(workloads=[WorkloadObs(KEY, running=False, rc=124, stopped_by_lab=True, no_result="no JSON")]),
         "HANG", "workload-deadline", 1),
    Case("hang: workload outlived runtime + grace",
         live(now=150.0, workload_deadline_passed=True, tracks=[pass_track(until=20.0)], samplers=samplers(150.0)),
         "HANG", "workload-deadline", 1, final=False),
    Case("hang: never drained (requests still in flight after the workload)",
         final(tracks=[hang_track()], t_end=20.0, now=60.0), "HANG", "drain", 1),
    Case("hang: the platform's own rule (FreeBSD: responses queued, never pushed)",
         live(findings=[Finding("HANG", KEY, "reqs_queued_for_completion stuck at 3", {"detected_at_s": 20.0})]),
         "HANG", "platform", 1, final=False),
    Case("hang, skipped by bisect: L1 unresponsive (samplers silent, dom0 probe unanswered, QEMU alive)",
         live(now=36.0, samplers=samplers(20.0), dom0_probe_ok=False, console_silent_s=30.0),
         "HANG", "l1-unresponsive", 125, final=False),
    Case("error: samplers silent while dom0 answers its probe",
         live(now=36.0, samplers=samplers(20.0), dom0_probe_ok=True), "ERROR", "samplers-silent", 125, final=False),
    Case("error: the guest's sampler died mid-workload (not a HANG)",
         live(samplers=[SamplerObs("dom0", 20, 20.0, None, False),
                        SamplerObs("lin1", 12, 12.0, "its stream ended", True)]),
         "ERROR", "sampler-died", 125, final=False),
    Case("error: a sampler delivered nothing", final(samplers=samplers(lines=0, last_t=None)),
         "ERROR", "sampler-empty", 125),
    Case("error: dom0's SSH transport dropped mid-fio (not a FAIL)",
         final(workloads=[WorkloadObs(KEY, running=False, rc=-1, transport_error="EOFError: ")]),
         "ERROR", "transport", 125),
    Case("error: no samples after the workload (not a HANG)", final(t_end=99.0, now=130.0),
         "ERROR", "drain-no-samples", 125),
    Case("error: the workload tool could not run at all (blkring: no /dev/xen/gntalloc)",
         final(workloads=[WorkloadObs(KEY, running=False, rc=3, no_result="lab: blkring setup: no gntalloc",
                                      lab_failure="blkring setup: open /dev/xen/gntalloc: No such file")]),
         "ERROR", "workload-lab", 125),
    Case("error: an exception in the lab", final(lab_failures=[LabFailure("workload", "TypeError: boom")]),
         "ERROR", "lab-failure", 125),
    Case("fail: the workload reported I/O errors", final(workloads=[replace(OK_WL, errors=35510)]),
         "FAIL", "errors", 1),
    Case("fail: the workload exited non-zero with no result",
         final(workloads=[WorkloadObs(KEY, running=False, rc=1, no_result="no JSON object", stderr="fio: bad")]),
         "FAIL", "errors", 1),
    Case("fail: the platform's invariant (FreeBSD: completed with error)",
         final(findings=[Finding("FAIL", KEY, "blkback completed 3 request(s) with an error")]), "FAIL", "errors", 1),
    Case("fail: a test disk completed nothing",
         final(tracks=[idle_track()], t_end=0.5),
         "FAIL", "no-io", 1),
    Case("crash: a crash line on the Xen console mid-run", live(consoles=[CRASH_LINE]), "CRASH", "console", 1,
         final=False),
    Case("crash: the Xen VM died", live(vm_alive=False, vm_rc=-9), "CRASH", "vm-died", 1, final=False),
    Case("crash: a guest Oops found at the end of a run that passed", final(), "CRASH", "console", 1,
         consoles=[CRASH_LINE]),
    Case("crash outranks the lab's lost transport it caused",
         final(workloads=[WorkloadObs(KEY, running=False, rc=-1, transport_error="EOFError")]), "CRASH", "console", 1,
         consoles=[CRASH_LINE]),
    Case("hang stays hang with a hung-task report (its own evidence)",
         final(tracks=[hang_track()], t_end=20.0, now=60.0), "HANG", "drain", 1,
         consoles=[ConsoleFinding("xen", "hung task", "INFO: task fio:1 blocked for more than 120 seconds.")]),
    Case("hang: a lifecycle operation that never completed (xl block-detach did not return)",
         live(faults=[FaultObs("detach-attach", 5.0, ended=True, ok=False, timed_out=True, target="lin1/xvdc",
                               detail="cycle 2: `xl block-detach lin1 xvdc` did not return within 30s")]),
         "HANG", "fault-hang", 1, final=False),
    Case("fail: a destroy that left the domain's connection behind",
         final(faults=[FaultObs("destroy", 15.0, ended=True, ok=False, target="lin1",
                                leftovers=("blkback ring thread blkback.1.xvdb-0 still running",))]),
         "FAIL", "errors", 1),
    Case("fail: a re-attach the backend refused during a churn",
         final(faults=[FaultObs("detach-attach", 5.0, ended=True, ok=False, target="lin1/xvdc",
                                failed="cycle 3: re-attach: test disk lin1/xvdc was closed before it connected")]),
         "FAIL", "errors", 1),
    Case("error: the lab failed carrying out a lifecycle operation",
         live(faults=[FaultObs("destroy", 15.0, ended=True, ok=False, target="lin1", transport_error="EOFError")]),
         "ERROR", "fault-lab", 125, final=False),
    Case("pass: the destroyed guest is not judged after its planned destroy",
         final(tracks=[], workloads=[], gone=("lin1",),
               faults=[FaultObs("destroy", 15.0, ended=True, ok=True, target="lin1")]), "PASS", "pass", 0),
    Case("pass: the rebooted guest's workload is not judged after its planned reboot",
         final(tracks=[], workloads=[], gone=("lin1",),
               faults=[FaultObs("reboot", 10.0, ended=True, ok=True, target="lin1")]), "PASS", "pass", 0),
    Case("hang: a reboot whose domain never came back",
         live(faults=[FaultObs("reboot", 10.0, ended=True, ok=False, timed_out=True, target="lin1",
                               detail="domain 1 of lin1 did not come back as a new domain within 120s")]),
         "HANG", "fault-hang", 1, final=False),
    Case("live: a guest away for a save-restore is not judged (the same stuck series is HANG otherwise)",
         live(now=27.5, tracks=[hang_track()], samplers=samplers(27.0), faults=[save_restore(5.0, None)]),
         "", "", 0, final=False),
    Case("live: the stall clock starts again when the save-restore ended",
         live(now=27.5, tracks=[hang_track()], samplers=samplers(27.0), faults=[save_restore(5.0, 20.0)]),
         "", "", 0, final=False),
    Case("hang: I/O that never resumed after a save-restore",
         live(now=36.0, tracks=[hang_track()], samplers=samplers(36.0), faults=[save_restore(5.0, 20.0)]),
         "HANG", "no-progress", 1, final=False),
    Case("hang: the backend's totals off by 3 (no save-restore to explain them)",
         final(tracks=[recounted_track()]), "HANG", "drain", 1),
    Case("pass: totals not compared across a save-restore (both connections count what was pending)",
         final(tracks=[recounted_track()], faults=[save_restore(5.0, 20.0)]), "PASS", "pass", 0),
    Case("interrupted stays error whatever the consoles show",
         final(lab_failures=[LabFailure("workload", "interrupted (Ctrl-C)")]), "ERROR", "lab-failure", 125,
         consoles=[CRASH_LINE], interrupted=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_table(case: Case) -> None:
    v = decide.decide(case.obs, CFG) if case.final else decide.watch(case.obs, CFG)
    if v is not None:
        v = decide.with_consoles(v, case.consoles, interrupted=case.interrupted)
    if not case.verdict:
        assert v is None
        return
    assert v is not None
    assert (v.verdict, v.rule, v.bisect_code) == (case.verdict, case.rule, case.bisect), v.summary
    assert v.exit_code == decide.EXIT_CODES[case.verdict]


def test_a_crash_before_the_backend_is_in_place_stays_the_labs_error() -> None:
    v = decide.error("boot:dom0", "Linux panic on the Xen serial console while waiting for dom0's init")
    assert decide.with_consoles(v, [CRASH_LINE]).verdict == "ERROR"
    v = decide.error("guest:boot", "guest lin1 will not come up")  # guests do not boot from the backend
    assert decide.with_consoles(v, [CRASH_LINE]).verdict == "ERROR"
    v = decide.error("workload", "lab lost the connection")
    assert decide.with_consoles(v, [CRASH_LINE]).verdict == "CRASH"


def test_a_hang_summary_names_what_stopped_where_and_since_when() -> None:
    v = decide.watch(live(now=27.5, tracks=[hang_track()], samplers=samplers(27.0),
                          faults=[FaultObs("stall", 10.2)]), CFG)
    assert v is not None and v.hang is not None
    assert v.summary.startswith("HANG: guest lin1 xvdb: completed I/Os stuck at 4719")
    assert "32 in flight" in v.summary and "dom0: blkback took 4751 requests" in v.summary
    # detection latency counts from the induced fault's recorded start
    assert v.hang["detected_after_from"] == "fault stall" and v.hang["fault_started_at_s"] == 10.2


def test_the_pass_capture_never_hangs_at_any_tick() -> None:
    """Replayed tick by tick while fio runs, the healthy run is never stopped."""
    full = pass_track()
    for k in range(4, int(PASS_END * 4)):
        now = k / 4
        tr = replace(full, guest_pts=[p for p in full.guest_pts if p.t <= now],
                     backend_pts=[p for p in full.backend_pts if p.t <= now])
        obs = live(now=now, tracks=[tr], samplers=samplers(now))
        assert decide.watch(obs, CFG) is None, now


# ------------------------------------------------------------ the orderly teardown
def _td(*steps: object, leftovers: tuple[str, ...] = (), skipped: str = "") -> object:
    from lab.teardown import Teardown

    return Teardown(steps=list(steps), leftovers=list(leftovers), skipped=skipped)  # type: ignore[arg-type]


def _step(kind: str = "detach", **kw: object) -> object:
    from lab.teardown import Step

    base: dict[str, object] = dict(name=f"xl block-{kind} lin1 xvdb", kind=kind, ok=True, elapsed=1.2)
    base.update(kw)
    return Step(**base)  # type: ignore[arg-type]


PASSED = decide.Verdict("PASS", "done", "all workloads finished, progressed and drained", rule="pass")
TEARDOWN_CASES = [
    ("a clean teardown keeps the PASS", PASSED, _td(_step(), _step("destroy")), "PASS", "pass", "done"),
    ("a crash while detaching is CRASH", PASSED,
     _td(_step(crash=ConsoleFinding("xen", "Linux BUG", "kernel BUG at drivers/block/xen-blkback/xenbus.c:300!"))),
     "CRASH", "teardown-crash", "teardown:detach"),
    ("a detach that never returns is HANG at its stage", PASSED, _td(_step(ok=False, timed_out=True, elapsed=30.0)),
     "HANG", "teardown-hang", "teardown:detach"),
    ("a destroy that never returns is HANG", PASSED, _td(_step(), _step("destroy", ok=False, timed_out=True)),
     "HANG", "teardown-hang", "teardown:destroy"),
    ("a ring thread left behind is FAIL naming it", PASSED,
     _td(_step(), _step("destroy"), leftovers=("blkback ring thread blkback.1.xvdb-0 still running",)),
     "FAIL", "teardown-leftover", "teardown"),
    ("a backend that refuses to unload is FAIL", PASSED,
     _td(_step(), _step("unload", ok=False, detail="xen-blkback refuses to unload"),
         leftovers=("xen-blkback refuses to unload with no disk left: rmmod: ERROR: Module xen_blkback is in use",)),
     "FAIL", "teardown-leftover", "teardown"),
    ("losing dom0 while tearing down is the lab's ERROR", PASSED, _td(_step(ok=False, transport_error="EOFError")),
     "ERROR", "transport", "teardown:detach"),
    ("a HANG is not taken further (the teardown was skipped)",
     decide.Verdict("HANG", "workload", "HANG: ...", rule="no-progress"), _td(skipped="the run ended in HANG"),
     "HANG", "no-progress", "workload"),
    ("a FAIL with a leftover keeps both reasons", decide.Verdict("FAIL", "workload", "lin1/xvdb: errors", rule="errors"),
     _td(_step(), leftovers=("backing device lab-lin1-xvdb still held open (1 opener(s))",)),
     "FAIL", "teardown-leftover", "teardown"),
]


@pytest.mark.parametrize(("before", "td", "verdict", "rule", "stage"), [c[1:] for c in TEARDOWN_CASES],
                         ids=[c[0] for c in TEARDOWN_CASES])
def test_after_teardown_table(before: decide.Verdict, td: object, verdict: str, rule: str, stage: str) -> None:
    v = decide.after_teardown(before, td)
    assert (v.verdict, v.rule, v.stage) == (verdict, rule, stage), v.summary
    if verdict == "FAIL" and before.verdict == "FAIL":
        assert before.summary in v.summary and "teardown" in v.summary


def test_a_pass_after_a_planned_destroy_says_so() -> None:
    v = decide.decide(final(tracks=[], workloads=[], gone=("lin1",)), CFG)
    assert v.verdict == "PASS" and "lin1 destroyed by a lifecycle fault as planned" in v.summary
    rebooted = decide.decide(final(tracks=[], workloads=[], gone=("lin1",),
                                   faults=[FaultObs("reboot", 10.0, ended=True, ok=True, target="lin1")]), CFG)
    assert "lin1 rebooted by a lifecycle fault as planned" in rebooted.summary
    v = decide.decide(final(), CFG)
    assert v.summary == "all workloads finished, progressed and drained"


def test_a_fail_shall_name_each_hostile_case_in_the_tools_words() -> None:
    """blkring's output from a real run against a blkback seeded to answer bad
    requests okay (tests/data/README.md): the FAIL names every failed case, what
    was expected and what came, not the last 300 characters of stderr."""
    from labdata import DATA

    from lab import ringfront

    res = ringfront.parse_ring((DATA / "blkring-hostile-seeded-okay.json").read_text())
    wl = WorkloadObs(KEY, running=False, rc=1, errors=res.errors, stderr="…half a line",
                     problems=tuple(res.extra["problems"]))
    v = decide.decide(final(workloads=[wl]), CFG)
    assert (v.verdict, v.rule) == ("FAIL", "errors")
    for case in ("too-many-segments", "bad-grant-ref", "out-of-range-sector", "revoked-grant-ref"):
        assert f"hostile case {case}: expected" in v.summary, v.summary
    assert "got okay response" in v.summary and "half a line" not in v.summary
