"""The experiment: samplers, workloads and faults started on the attached test
disks, then watched until the workloads end, a verdict is certain, or the
deadline passes; then the drain. Every tick gathers observations and asks the
pure decision (lab/decide.py); nothing here decides by itself."""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab import console, decide, ringfront, sampling, scenario
from lab.boot import L1, Where
from lab.faults import FaultRecord, Injector
from lab.guests import Guest
from lab.lifecycle import Lifecycle
from lab.platform import Dom0Platform
from lab.progress import Progress, workload_line
from lab.runner import Result, Runner
from lab.sampling import Sampler
from lab.timing import Deadline
from lab.watchdog import Track, longest_gap, peak
from lab.workload import WORKLOADS, IoResult

PROBE_SECONDS = 5.0  # dom0's liveness probe: `true` over SSH answers in well under 1 s under TCG
LONG = 24 * 3600.0  # samplers end with the run; the channel closes then


JOB_NOT_WRITTEN = "lab-job-not-written"
OUTPUT_FOLLOWS = "@@lab-output@@"


def workload_argv(tool: str, index: int) -> list[str]:
    """One round trip for a workload: its job file goes in on stdin (one it
    could not write is the lab's failure: JOB_NOT_WRITTEN, never the tool's),
    the tool runs, and its structured output comes back after OUTPUT_FOLLOWS
    (a `cat` of its own was a round trip of 0.25-0.5 s under TCG). The rc is
    the tool's."""
    job_path, out_path = f"/run/lab/{tool}-{index}.job", f"/run/lab/{tool}-{index}.json"
    return ["sh", "-c", f"cat > {job_path} || {{ echo {JOB_NOT_WRITTEN}; exit 97; }}; "
            + shlex.join(WORKLOADS[tool].argv(job_path, out_path))
            + f"; rc=$?; echo {OUTPUT_FOLLOWS}; cat {out_path} 2>/dev/null; exit $rc"]


def split_output(stdout: str) -> tuple[str, str | None]:
    """workload_argv's stdout: the tool's own, and its structured output (None
    when the command never got that far: timed out, or the session died)."""
    own, mark, rest = stdout.partition(f"{OUTPUT_FOLLOWS}\n")
    return (own, rest) if mark else (stdout, None)


@dataclass
class Job:
    """One running workload and what became of it."""

    cfg: scenario.WorkloadCfg
    guest: Guest
    track: Track
    index: int
    grace: float  # the lab's deadline for it is its runtime plus this
    job: str = ""  # the job file's text (fio job, blkring config), sent on the run's stdin
    thread: threading.Thread | None = None
    result: Result | None = None

    @property
    def key(self) -> str:
        return self.track.key


@dataclass(frozen=True)
class Started:
    """What a test or a scripting user sees once the workloads run (a hook)."""

    dom0: Runner
    guests: dict[str, Guest]
    t0: float  # time.monotonic() at the workload's start
    cleanup: Callable[[Callable[[], object]], None]  # run before teardown, as fault releases are


@dataclass
class Outcome:
    verdict: decide.Verdict
    tracks: list[Track]
    samplers: list[Sampler]
    faults: list[dict[str, Any]]
    workloads: list[dict[str, Any]] = field(default_factory=list)
    fio_s: float = 0.0
    drain_s: float = 0.0
    platform_record: dict[str, Any] = field(default_factory=dict)  # e.g. FreeBSD's "xbbd" report
    gone: set[str] = field(default_factory=set)  # guests a lifecycle fault destroyed (no teardown for them)
    t0: float = 0.0  # time.monotonic() when the workload phase began (the tracks' t = 0)
    unfinished: set[str] | None = None  # guests with a workload that did not end on its own (None: unknown)


def first_io(tracks: Sequence[Track]) -> float | None:
    """When a workload's I/O was first seen: the t of the earliest sample, of
    either end, whose count is above that end's first sample for the disk (the
    guest's completed requests, which may already count the kernel's partition
    probe at attach; the requests blkback took). Each end's sampler is one
    interval coarse and they tick out of phase, so the earlier of the two is the
    tighter upper bound. None when no disk moved."""
    seen: list[float | None] = []
    for tr in tracks:
        g, b = tr.guest_pts, tr.backend_pts
        seen += [next((p.t for p in g if p.completed > g[0].completed), None)] if g else []
        seen += [next((p.t for p in b if p.taken > b[0].taken), None)] if b else []
    moved = [t for t in seen if t is not None]
    return min(moved) if moved else None


@dataclass
class _Watch:
    """The workload phase's live view, read by `snapshot`."""

    consoles: dict[str, console.Console]
    gone: set[str]  # guests a lifecycle fault destroyed: no longer judged
    console_size: int = -1
    console_moved_t: float = 0.0
    last_probe_t: float = -1e9
    probe_ok: bool | None = None


def _cfg(sc: scenario.Scenario) -> decide.Config:
    wd, dl = sc.watchdog, sc.deadlines
    return decide.Config(stall_window=wd.stall_window, drain_window=wd.drain_window,
                         workload_grace=dl.workload_grace, probe_seconds=PROBE_SECONDS)


def run(sc: scenario.Scenario, platform: Dom0Platform, l1: L1, guests: list[Guest], where: Where,
        stack: contextlib.ExitStack, *, progress: list[str], deadline: Deadline,
        on_started: Callable[[Started], None] | None = None, status: Progress | None = None) -> Outcome:
    progress[0] = "workload"
    dl, wd = sc.deadlines, sc.watchdog
    by_name = {g.cfg.name: g for g in guests}
    jobs: list[Job] = []
    for i, w in enumerate(sc.workloads):
        g = by_name[w.guest]
        info = g.vbds[w.disk]
        tool = WORKLOADS[w.tool]
        job = tool.job(w, g.os.disk_device(w.disk))
        (where.results / f"{w.tool}-{i}.job").write_text(job)
        jobs.append(Job(w, g, Track(w.guest, w.disk, info.sysfs_name, info.ring_capacity), i, dl.workload_grace,
                        job))
    tracks = [j.track for j in jobs]
    lock = threading.Lock()
    t0 = time.monotonic()
    samplers = _start_samplers(sc, l1, guests, tracks, where, t0, lock)

    def stop_samplers() -> None:
        for s in samplers:
            s.stop()

    stack.callback(stop_samplers)
    injector = None
    life = Lifecycle(sc, l1, by_name, where)
    if sc.faults:
        vm = l1.vm
        injector = Injector(sc.faults, dom0=l1.dom0, backing=lambda g, d: by_name[g].backings[d], scripts=l1.ops,
                            pause_l1=vm.pause, resume_l1=vm.resume, t0=t0,
                            lifecycle=life)
        stack.callback(injector.release_all)
        injector.start()
    for j in jobs:
        argv = workload_argv(j.cfg.tool, j.index)

        def go(j: Job = j, argv: list[str] = argv) -> None:
            j.result = j.guest.runner.run(argv, timeout=j.cfg.runtime + j.grace, input=j.job)

        j.thread = threading.Thread(target=go, name=f"workload-{j.index}", daemon=True)
        j.thread.start()
    if on_started:
        def cleanup(fn: Callable[[], object]) -> None:
            stack.callback(fn)

        on_started(Started(l1.dom0, by_name, t0, cleanup))
    cfg = _cfg(sc)
    end_by = deadline.slice(max(w.runtime for w in sc.workloads) + dl.workload_grace)
    watch = _Watch({"xen": l1.xen_console}, life.gone)
    verdict: decide.Verdict | None = None
    while verdict is None:
        # decide on a finer tick than the sampling interval: a stall is called
        # within a quarter interval of the window closing, not up to a whole one
        time.sleep(wd.interval / 4)
        now = time.monotonic() - t0
        obs = _snapshot(sc, platform, l1, jobs, samplers, injector, watch, now, end_by, final=False)
        if not decide.samplers_silent(obs, cfg):
            watch.probe_ok = None  # a probe answers only for the silence it was made in
        elif now - watch.last_probe_t >= wd.stall_window:
            watch.last_probe_t = now
            watch.probe_ok = l1.dom0.run(["true"], timeout=PROBE_SECONDS).ok
            obs = _snapshot(sc, platform, l1, jobs, samplers, injector, watch, now, end_by, final=False)
        verdict = decide.watch(obs, cfg)
        if status is not None:
            active = [r.cfg.kind for r in (injector.records if injector else [])
                      if r.started_at is not None and r.ended_at is None]
            status.status(workload_line(obs.tracks, now, wd.stall_window, active))
        if verdict is None and all(j.thread is not None and not j.thread.is_alive() for j in jobs):
            break
    if verdict is None and injector is not None:
        # a lifecycle operation still running (a churn outlasting the workload) is
        # part of the experiment: its outcome is judged, within the run's deadline
        injector.wait(timeout=max(0.0, end_by.remaining()))
    if status is not None:
        status.done()
    fio_s = round(time.monotonic() - t0, 2)
    t_end = time.monotonic() - t0
    drain_s = 0.0
    if verdict is None:
        progress[0] = "drain"
        drain_dl = deadline.slice(wd.drain_window)
        while not drain_dl.expired():
            live = [j.track for j in jobs if j.cfg.guest not in life.gone]
            if all(d.drained for d in decide.drains(live, t_end).values()):
                break
            # a look at the samples in memory costs nothing: the drain is seen
            # within 0.1 s of the sample that shows it, not up to half an interval
            time.sleep(min(0.1, wd.interval / 2))
        drain_s = round(time.monotonic() - t0 - t_end, 2)
    # after an early verdict no workload finished: nothing to fetch (and L1 may not answer)
    results = _fetch_results(sc, [j for j in jobs if j.cfg.guest not in life.gone], where) if verdict is None else {}
    if verdict is None:
        obs = _snapshot(sc, platform, l1, jobs, samplers, injector, watch, time.monotonic() - t0, end_by,
                        final=True, t_end=t_end, results=results)
        verdict = decide.decide(obs, cfg)
    now = time.monotonic() - t0
    records = [_workload_entry(j, results.get(j.index), now if verdict.verdict != "PASS" else t_end) for j in jobs]
    for j, r in zip(jobs, records, strict=True):
        if j.cfg.guest in life.gone:
            r["ended_by"] = f"{life.ended_by.get(j.cfg.guest, 'destroy')} (a lifecycle fault): not judged after it"
    destroyed = {g for g in life.gone if life.ended_by.get(g) == "destroy"}
    return Outcome(verdict, tracks, samplers, [r.as_dict() for r in injector.records] if injector else [],
                   records, fio_s, drain_s, platform.rules(sc, tracks, final=True).record, destroyed, t0,
                   {j.cfg.guest for j in jobs if not _ended(j)})


def _ended(j: Job) -> bool:
    """The workload's command returned by itself: no tool of it is left running."""
    r = j.result
    return (j.thread is not None and not j.thread.is_alive() and r is not None
            and not r.timed_out and not r.transport_error)


def _streamer(runner: Any, argv: list[str]) -> Callable[[], Iterable[str]]:
    return lambda: runner.stream(argv, timeout=LONG)


def _start_samplers(sc: scenario.Scenario, l1: L1, guests: list[Guest], tracks: list[Track], where: Where,
                    t0: float, lock: threading.Lock) -> list[Sampler]:
    iv = str(sc.watchdog.interval)
    by_name = {g.cfg.name: g for g in guests}
    disks = [(by_name[tr.guest].vbds[tr.vdev], by_name[tr.guest].backings[tr.vdev]) for tr in tracks]
    dom0_argv = l1.ops.sample_argv(iv, disks)
    dom0 = l1.dom0
    samplers = [Sampler("dom0", _streamer(dom0, dom0_argv),
                        sampling.on_backend(tracks, l1.ops.parse_sample, lock), t0,
                        raw=where.results / "samples-dom0.jsonl")]
    for g in guests:
        mine = [tr for tr in tracks if tr.guest == g.cfg.name]
        if not mine:
            continue
        # a disk the userspace frontend drives has no block device: its stat file instead
        ring = {w.disk for w in sc.workloads if w.guest == g.cfg.name and w.tool == "ring"}
        argv = g.os.stat_argv(iv, [tr.vdev for tr in mine], ring=ring)
        samplers.append(Sampler(g.cfg.name, _streamer(g.runner, argv),
                                sampling.on_guest(mine, g.os.parse_stat, lock), t0,
                                raw=where.results / f"samples-{g.cfg.name}.jsonl"))
    for s in samplers:
        s.start()
    return samplers


def _snapshot(sc: scenario.Scenario, platform: Dom0Platform, l1: L1, jobs: Sequence[Job],
              samplers: Sequence[Sampler], injector: Injector | None, watch: _Watch, now: float, end_by: Deadline,
              *, final: bool, t_end: float | None = None, results: dict[int, IoResult | NoResult] | None = None
              ) -> decide.Observations:
    jobs = [j for j in jobs if j.cfg.guest not in watch.gone]
    samplers = [s for s in samplers if s.machine not in watch.gone]
    size = watch.consoles["xen"].size()
    if size != watch.console_size:
        watch.console_size, watch.console_moved_t = size, now
    found = []
    for name, con in watch.consoles.items():
        crash = console.find_crash(con.read_all())
        if crash:
            found.append(decide.ConsoleFinding(name, crash[0], crash[1]))
    tracks = [j.track for j in jobs]
    rules = platform.rules(sc, tracks, final=final)
    return decide.Observations(
        stage="drain" if final else "workload", now=now, tracks=tracks,
        workloads=[_workload_obs(j, (results or {}).get(j.index)) for j in jobs],
        consoles=found, samplers=[decide.SamplerObs(**vars(sampling.state(s))) for s in samplers],
        vm_alive=l1.vm.alive(), vm_rc=l1.vm.returncode, dom0_probe_ok=watch.probe_ok,
        console_silent_s=now - watch.console_moved_t, findings=rules.findings,
        faults=[_fault_obs(r) for r in (injector.records if injector else [])],
        workload_deadline_passed=end_by.expired(), t_end=t_end, gone=tuple(sorted(watch.gone)),
    )


def _fault_obs(r: FaultRecord) -> decide.FaultObs:
    o = r.outcome
    target = f"{r.cfg.guest}/{r.cfg.disk}" if r.cfg.kind == "detach-attach" else r.cfg.guest
    if o is None:
        return decide.FaultObs(r.cfg.kind, r.started_at, target=target)
    return decide.FaultObs(r.cfg.kind, r.started_at, ended=True, ok=o.ok, timed_out=o.timed_out,
                           transport_error=o.transport_error, failed=o.failed, leftovers=o.leftovers,
                           detail=o.detail, target=target, ended_at=r.ended_at)


@dataclass(frozen=True)
class NoResult:
    """A finished workload that left no parsable result: why, and whether that
    is the lab's failure (the tool says it could not run at all) rather than
    the backend's."""

    why: str
    lab_failure: str = ""


def _workload_obs(j: Job, parsed: IoResult | NoResult | None) -> decide.WorkloadObs:
    running = j.thread is not None and j.thread.is_alive()
    r = j.result
    if r is None:
        return decide.WorkloadObs(j.key, running=running)
    # the remote `timeout` (ssh.remote_command) fires with 124, or kills with 137,
    # at the lab's deadline (not earlier: an OOM kill is 137 too)
    limit = j.cfg.runtime + j.grace
    stopped = r.timed_out or (r.rc in (124, 137) and r.elapsed >= limit - 1)
    return decide.WorkloadObs(
        j.key, running=running, rc=r.rc, transport_error=r.transport_error, stopped_by_lab=stopped,
        stderr=r.stderr, errors=parsed.errors if isinstance(parsed, IoResult) else None,
        no_result=parsed.why if isinstance(parsed, NoResult) else "",
        lab_failure=parsed.lab_failure if isinstance(parsed, NoResult) else "",
        problems=tuple(str(p) for p in parsed.extra.get("problems", [])) if isinstance(parsed, IoResult) else (),
    )


def _fetch_results(sc: scenario.Scenario, jobs: Sequence[Job], where: Where) -> dict[int, IoResult | NoResult]:
    """Each finished workload's structured output, parsed; the reason when there is none."""
    out: dict[int, IoResult | NoResult] = {}
    for j in jobs:
        if j.result is None or j.result.transport_error:
            continue
        if JOB_NOT_WRITTEN in j.result.stdout:
            why = f"the lab could not write the job file in guest {j.guest.cfg.name}: {j.result.stderr.strip()[-200:]}"
            out[j.index] = NoResult(why, why)
            continue
        name = f"{j.cfg.tool}-{j.index}.json"
        text = split_output(j.result.stdout)[1]
        if text is None:  # it did not end on its own: whatever it wrote so far
            text = j.guest.runner.run(["cat", f"/run/lab/{name}"], timeout=sc.deadlines.command).stdout
        (where.results / name).write_text(text)
        tool = WORKLOADS[j.cfg.tool]
        try:
            out[j.index] = tool.parse(text)
        except ValueError as e:
            out[j.index] = NoResult(str(e) or "unparsable output", tool.lab_failure(text))
    return out


def _observed(tr: Track, until: float) -> dict[str, Any]:
    g = [p for p in tr.guest_pts if p.t <= until]
    if len(g) < 2 or g[-1].t <= g[0].t:
        return {"samples": len(g)}
    return {"samples": len(g), "completed": g[-1].completed - g[0].completed,
            "completions_per_s": round((g[-1].completed - g[0].completed) / (g[-1].t - g[0].t), 1),
            "inflight_at_end": g[-1].inflight, "seconds": round(g[-1].t - g[0].t, 1)}


def _workload_entry(j: Job, parsed: IoResult | NoResult | None, until: float) -> dict[str, Any]:
    w, tr = j.cfg, j.track
    during = [p for p in tr.backend_pts if p.t <= until]
    slots = tr.ring_capacity
    outstanding = w.iodepth * w.numjobs
    if w.tool == ringfront.TOOL:  # blkring negotiates its own ring, after the attach
        slots = (ringfront.capacity(parsed.extra) if isinstance(parsed, IoResult) else None) or slots
        outstanding = slots
    return {
        "guest": w.guest, "disk": w.disk, "tool": w.tool, "outstanding": outstanding,
        "ring_capacity": slots,
        "result": parsed.as_dict() if isinstance(parsed, IoResult) else None,
        # what the counters saw, whether or not the tool left a result (a HANG, a CRASH)
        "observed": _observed(tr, until),
        "peak_inflight_guest": peak(p.inflight for p in tr.guest_pts),
        "peak_inflight_backing": peak(p.backing_inflight for p in tr.backend_pts),
        "longest_completion_gap_s": longest_gap(tr),
        # share of the workload's dom0 samples in which the backing device held at
        # least a full ring: did the backend's pool of requests stay exhausted?
        "backing_full_fraction": round(
            sum(p.backing_inflight >= slots for p in during) / max(1, len(during)), 3),
        # the backend ran out of request structures: Linux's oo_req, FreeBSD's
        # request_shortages (None where the backend lacks the counter)
        **{k: (tr.backend_pts[-1].stats[k] - tr.backend_pts[0].stats[k])
           if tr.backend_pts and k in tr.backend_pts[0].stats else None
           for k in ("oo_req", "request_shortages")},
    }
