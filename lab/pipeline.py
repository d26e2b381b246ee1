"""`lab run`, top to bottom (architecture.md's data flow):

    prepare media -> boot L1 (warm or cold) -> install the backend -> start guests
    and attach fresh test disks -> samplers, workloads, faults; watch; drain ->
    decide -> evidence -> record -> teardown

Each phase takes values and returns values; the verdict comes from the pure
decision (lab/decide.py). Everything a phase starts goes on one exit stack that
unwinds in order, on every path: a verdict, a lab error, an exception of any
kind, Ctrl-C, SIGTERM, SIGHUP. Any exception that is not an observation of the
system under test is ERROR (bisect: skip), never FAIL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import console, decide, evidence, guests, images, l0, l1state, observe, report, scenario, teardown
from lab.boot import L1, Where, save_state, up
from lab.errors import Interrupted, LabError
from lab.platform import BackendCtx, Media
from lab.platforms import dom0_platform
from lab.progress import Progress
from lab.runner import CommandLog, LocalRunner, signals_deferred
from lab.timing import Background, Deadline

log = logging.getLogger("lab.run")


@dataclass(frozen=True)
class Options:
    results_root: Path = Path("results")
    accel: str | None = None
    keep: bool = False  # leave a failed lab running for `lab ssh`
    cold: bool = False  # never restore a saved L1 (a new state is still saved if none exists)
    results_dir: Path | None = None  # an exact directory (bisect steps) instead of results/<name>/<stamp>
    on_workload_started: Callable[[observe.Started], None] | None = None
    progress: Progress | None = None  # the status line on a terminal (lab/progress.py)
    driver: str | None = None  # the L0 driver (lab/l0.py): overrides the scenario's [lab] driver
    libvirt_uri: str | None = None  # the libvirt driver's daemon (default qemu:///system)


def runs_dir() -> Path:
    return images.cache_dir() / "runs"


def clean_stale_runs() -> dict[str, list[Any]]:
    """Runs whose lab process is gone (killed with SIGKILL, power cut): end the
    QEMU each left (only one proven to be that run's) and remove the work
    directory (lab/orphans.py). Kept labs stay until `lab down`."""
    from lab import orphans

    return orphans.sweep_runs(runs_dir())


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so teardown runs for all three."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Phases:
    """Wall time per phase into record["phases"], and the phase on the progress line."""

    def __init__(self, phases: dict[str, float], progress: Progress | None) -> None:
        self.d = phases
        self.progress = progress

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress.phase(name)
        t = time.monotonic()
        try:
            yield
        finally:
            self.d[name] = round(time.monotonic() - t, 2)


def run(sc: scenario.Scenario, opts: Options) -> dict[str, Any]:
    """One lab run; returns its record (also written to record.json)."""
    t_start = time.monotonic()
    results = _results_dir(sc, opts)
    rec: dict[str, Any] = {"scenario": sc.name, "verdict": "ERROR", "stage": "setup", "summary": "",
                           "schema_version": report.SCHEMA_VERSION, "phases": {}, "results_dir": str(results),
                           "started_utc": report.utc_stamp(), "host": report.host_facts()}
    (results / "scenario.toml").write_text(scenario.to_toml(sc))
    cmdlog = CommandLog(results / "commands.log")
    driver = l0.driver(opts.driver or sc.lab.driver, uri=opts.libvirt_uri)
    rec["l0"] = driver.record
    runs_dir().mkdir(parents=True, exist_ok=True)
    rec["swept"] = clean_stale_runs()
    work = Path(tempfile.mkdtemp(prefix=f"run-{report.utc_stamp()}-", dir=runs_dir()))
    where = Where(results, work, cmdlog, LocalRunner(cmdlog), keep=opts.keep)
    progress = ["setup"]  # the stage reached, for errors raised outside a LabError
    phases = _Phases(rec["phases"], opts.progress)
    platform = dom0_platform(sc.dom0.os)
    infra = contextlib.ExitStack()  # L1 itself: QEMU, dom0's transport, the work directory
    infra.callback(shutil.rmtree, work, ignore_errors=True)
    exp = contextlib.ExitStack()  # the experiment: samplers, faults, guests' transports
    verdict: decide.Verdict | None = None
    l1: L1 | None = None
    started: list[guests.Guest] = []
    interrupted: BaseException | None = None
    outcome: observe.Outcome | None = None
    try:
        with signals_as_interrupts():
            from lab.boot import write_owner

            write_owner(where, qemu_pid=None)
            try:
                progress[0] = "boot:l0"
                # libvirt: its daemons up, dead labs' domains destroyed (qemu: nothing)
                rec["swept"].update(driver.prepare())
                progress[0] = "image"
                with phases("images"):
                    media = platform.media(sc, l0=where.l0, results=results, work=work,
                                           accel=opts.accel or sc.lab.accel)
                for d in media.scratch:
                    infra.callback(shutil.rmtree, d, ignore_errors=True)
                rec.update(images=media.record, accel=media.accel, accel_reason=media.accel_reason)
                # one deadline for the rest of the run, each phase takes its slice
                run_dl = Deadline(run_budget(sc))
                rec["deadline_s"] = round(run_dl.seconds)
                t_boot = time.monotonic()
                with phases("boot"):
                    l1 = up(sc, platform, media, where, infra, driver=driver, cold=opts.cold, progress=progress,
                            deadline=run_dl, guests=guests.state_inputs(sc, media))
                rec.update(l1=l1.record, boot=l1.boot,
                           qemu={"pid": l1.vm.pid, "version": _qemu_version(), "ssh_port": l1.spec.ssh_port})
                rec["host"]["qemu"] = rec["qemu"]["version"]
                dom0 = l1.dom0
                ctx = BackendCtx(sc, media, l1.ops, where.l0, results,
                                 put=lambda local, remote: dom0.put_file(local, remote, timeout=60))
                # A restored L1's guests were saved with no disk and nothing is saved
                # after them, so dom0's steps (the backend under test loaded; the test
                # disks' backing devices made, plain dm devices that blkback sees only
                # at `xl block-attach`) run beside each other and beside the guests'
                # (new SSH sessions, clocks, blkfront reloaded): a warm run's round
                # trips are 0.3-1.8 s each under TCG. A cold run saves the state
                # first, with guests and no backend, and then goes on in line.
                backend_job = backings_job = None
                if l1.guests_saved and l1.pending_state is None:
                    backend_job = Background("backend", lambda: platform.install_backend(ctx))
                    backings_job = Background("guest:disk", lambda: guests.make_backings(sc, l1))
                try:
                    with phases("guests"):
                        started = _guests_up(sc, l1, media, where, rec, progress, run_dl)
                    for g in started:
                        infra.callback(g.runner.close)
                    if backend_job is not None:
                        progress[0] = "guest:attach"
                        guests.load_frontends(sc, started)
                except BaseException:
                    for job in (backend_job, backings_job):
                        if job is not None:
                            job.abandon()
                    raise
                if l1.pending_state is not None:
                    with phases("save"):
                        if save_state(l1, where, infra, progress, deadline=run_dl):
                            # L1 went on in a new QEMU (libvirt): the guests' sessions died with the old one
                            guests.reconnect(sc, started, deadline=run_dl)
                            rec["qemu"].update(pid=l1.vm.pid, ssh_port=l1.spec.ssh_port)
                progress[0] = "backend"
                with phases("backend"):  # what was left of it, when it overlapped the guests
                    prepared = None
                    if backend_job is not None and backings_job is not None:
                        rec["backend"] = backend_job.result(run_dl)
                        rec["backend"]["overlapped_guests_s"] = backend_job.elapsed
                        prepared = backings_job.result(run_dl)
                    else:
                        rec["backend"] = platform.install_backend(ctx)
                # KernelCI's names for what is under test: which tree, which commit
                b = rec["backend"]
                rec["kernelci"] = {"tree": b.get("source") or b.get("kind"), "commit": b.get("commit")}
                with phases("attach"):
                    guests.attach_all(sc, l1, started, where, progress=progress, deadline=run_dl, prepared=prepared)
                rec["guests"] = {g.cfg.name: g.as_record() for g in started}
                with phases("workload"):
                    outcome = observe.run(sc, platform, l1, started, where, exp, progress=progress, deadline=run_dl,
                                          on_started=opts.on_workload_started, status=opts.progress)
                verdict = outcome.verdict
                first = observe.first_io(outcome.tracks)
                if first is not None:  # from starting L1 (a restore or a cold boot) to the workload's first I/O
                    rec["first_io_s"] = round(outcome.t0 + first - t_boot, 2)
                rec["phases"]["fio"] = outcome.fio_s
                rec["phases"]["drain"] = outcome.drain_s
            except guests.DiskFailure as e:  # the backend under test refused or never served a test disk
                verdict = decide.Verdict("FAIL", e.stage, f"FAIL: {e.message}", rule="disk-attach")
            except LabError as e:
                verdict = decide.error(e.stage, e.message)
                if e.tail:
                    rec["console_tail"] = e.tail.splitlines()[-30:]
            except (KeyboardInterrupt, Interrupted) as e:
                interrupted = e
                why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"interrupted by {e}"
                verdict = decide.error(progress[0], why)
            except Exception as e:  # a lab bug or a failure no one foresaw: never a verdict on the backend
                verdict = decide.error(progress[0], f"{type(e).__name__}: {e}")
                rec["lab_exception"] = traceback.format_exc().splitlines()[-30:]
                log.error("lab failure at %s: %s", progress[0], traceback.format_exc())
            exp.close()  # samplers stop and faults are released before anything is read for evidence
            assert verdict is not None
            if l1 is not None:
                progress[0] = "teardown"
                if opts.progress is not None:
                    opts.progress.phase("teardown inside L1")
                td = _teardown(sc, l1, started, verdict, rec, outcome, keep=opts.keep,
                               interrupted=interrupted is not None)
                verdict = decide.after_teardown(verdict, td)
            verdict = _finish(sc, rec, verdict, l1, started, outcome, results, interrupted=interrupted is not None)
    except (KeyboardInterrupt, Interrupted) as e:  # a signal while finishing: the record says so
        interrupted = interrupted or e
        verdict = decide.error(progress[0], "interrupted while finishing")
        _put_verdict(rec, verdict)
    finally:
        with signals_deferred():
            exp.close()
            if l1 is not None and l1.pending_state is not None:
                kept = l1state.promote(l1.pending_state, "ERROR" if interrupted else rec["verdict"])
                l1.record["state_kept"] = kept is not None
                if kept is None:
                    l1.record.pop("saved_state", None)
            keep = opts.keep and rec["verdict"] != "PASS" and l1 is not None and l1.vm.alive()
            t = time.monotonic()
            if keep and l1 is not None:
                _leave_running(rec, l1, where, started)
                infra.pop_all()  # QEMU, dom0 and the work directory stay up for `lab ssh`
            else:
                infra.close()
                rec["phases"]["teardown"] = round(time.monotonic() - t, 2)
            rec["wall_s"] = round(time.monotonic() - t_start, 2)
            _overhead(rec)
            rec["files"] = sorted({*(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()),
                                   "record.json", "report.html"})
            report.write_record(results / "record.json", rec)
            _write_html(results)
    if interrupted is not None:
        raise interrupted
    return rec


def _guests_up(sc: scenario.Scenario, l1: L1, media: Media, where: Where, rec: dict[str, Any],
               progress: list[str], deadline: Deadline) -> list[guests.Guest]:
    """The scenario's guests: those a restored L1 holds, else booted now. A
    restored state whose guests are not as saved is dropped (the next run boots
    cold), and this run is an ERROR: nothing of the backend was tested yet."""
    if not l1.guests_saved:
        return guests.boot_all(sc, l1, media, where, phases=rec["phases"], progress=progress, deadline=deadline)
    try:
        return guests.adopt(sc, l1, media, where, phases=rec["phases"], progress=progress, deadline=deadline)
    except LabError as e:
        key = l1.record.get("key")
        if isinstance(key, str) and l1state.is_state_key(key):
            l1state.remove(key)
            l1.record["state_dropped"] = f"its guests were not as saved: {e.message}"
        raise


def run_budget(sc: scenario.Scenario) -> float:
    """The whole run's deadline once media are ready: every phase's own deadline
    in a row, plus a command's worth per step for what has none of its own."""
    dl = sc.deadlines
    boot = dl.xen_banner + dl.dom0_kernel + dl.dom0_ssh
    disks = sum(len(g.disks) for g in sc.guests)
    guests = len(sc.guests) * (dl.guest_create + dl.guest_ssh) + disks * dl.guest_create
    work = max((w.runtime for w in sc.workloads), default=0.0) + dl.workload_grace + sc.watchdog.drain_window
    return boot + guests + work + 10 * dl.command


def _teardown(sc: scenario.Scenario, l1: L1, started: list[guests.Guest], v: decide.Verdict,
              rec: dict[str, Any], outcome: observe.Outcome | None, *, keep: bool,
              interrupted: bool) -> teardown.Teardown:
    """The orderly teardown inside L1 when the run reached PASS or FAIL; otherwise
    say why not (it would hang, or nothing in L1 can be trusted)."""
    why = ("interrupted: the user wants out" if interrupted
           else "--keep: the lab is left as it failed" if keep and v.verdict != "PASS"
           else "a test disk never connected: there is no connection to tear down" if v.stage == "guest:attach"
           else {"HANG": "the run ended in HANG: detaching a disk with requests stuck would hang too",
                 "CRASH": "the run ended in CRASH: nothing in L1 can be trusted",
                 "ERROR": "the lab failed: its view of L1 cannot be trusted"}.get(v.verdict, ""))
    if why:
        td = teardown.skipped(why)
    else:
        try:
            gone = outcome.gone if outcome is not None else set()
            td = teardown.run(sc, l1, [g for g in started if g.cfg.name not in gone], phases=rec["phases"],
                              unfinished=outcome.unfinished if outcome is not None else None)
        except Exception as e:  # the lab's own failure while tearing down: ERROR, never a verdict
            why = e.message if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
            td = teardown.Teardown(steps=[teardown.Step(f"teardown: {why}", "lab", False, 0.0,
                                                        transport_error=why)])
    rec["teardown"] = td.as_record()
    return td


def _write_html(results: Path) -> None:
    """report.html beside record.json; a report that cannot be drawn never
    changes the verdict."""
    from lab import html

    try:
        html.write_report(results)
    except Exception as e:
        log.warning("report.html not written: %s: %s", type(e).__name__, e)


def _results_dir(sc: scenario.Scenario, opts: Options) -> Path:
    if opts.results_dir is not None:
        opts.results_dir.mkdir(parents=True, exist_ok=True)
        return opts.results_dir
    return report.make_results_dir(opts.results_root, sc.name)


def _qemu_version() -> str:
    from lab import qemu

    return qemu.qemu_version()


def _finish(sc: scenario.Scenario, rec: dict[str, Any], verdict: decide.Verdict | None, l1: L1 | None,
            started: list[guests.Guest], outcome: observe.Outcome | None, results: Path, *,
            interrupted: bool) -> decide.Verdict:
    """Every console read (guests' from dom0), the verdict settled, evidence for
    anything but PASS, the series and counters written."""
    assert verdict is not None
    consoles: dict[str, console.Console] = {}
    answers = False
    if l1 is not None and not interrupted:  # the user wants out: no evidence round trips
        consoles["xen"] = l1.xen_console
        answers, guest_cons = evidence.l1_answers_with_consoles(l1, [g.name for g in sc.guests], results)
        consoles.update(guest_cons)
    findings = []
    for name, con in consoles.items():
        crash = console.find_crash(con.read_all())
        if crash:
            findings.append(decide.ConsoleFinding(name, crash[0], crash[1]))
    verdict = decide.with_consoles(verdict, findings, interrupted=interrupted)
    _put_verdict(rec, verdict)
    if outcome is not None:
        rec["workloads"] = outcome.workloads
        rec.update(outcome.platform_record)
        if outcome.faults:
            rec["faults"] = outcome.faults
        if outcome.tracks:
            n = report.write_series(results / "counters.csv", outcome.tracks)
            rec["series"] = {"file": "counters.csv", "rows": n, "interval_s": sc.watchdog.interval,
                             "samplers": {s.machine: observe.sampling.state(s).as_dict() for s in outcome.samplers}}
            rec["counters"] = {tr.vbd: report.counter_summary(tr) for tr in outcome.tracks}
    rec["watchdog"] = scenario.to_dict(sc.watchdog)
    if verdict.verdict != "PASS" and not interrupted:
        t = time.monotonic()
        try:
            if l1 is None:
                consoles = {}
            # guests the teardown destroyed cannot answer (their consoles are kept)
            alive = [] if (rec.get("teardown") or {}).get("steps") else started
            rec["evidence"] = evidence.collect(results, l1, alive, consoles, answers=answers)
        except Exception as e:  # evidence never changes the verdict
            log.warning("evidence collection failed: %s", e)
            rec["evidence_error"] = f"{type(e).__name__}: {e}"
        rec["phases"]["evidence"] = round(time.monotonic() - t, 2)
    return verdict


def _put_verdict(rec: dict[str, Any], v: decide.Verdict) -> None:
    rec.update(verdict=v.verdict, stage=v.stage, summary=v.summary, rule=v.rule,
               bisect_code=v.bisect_code, exit_code=v.exit_code)
    if v.verdict == "ERROR":
        rec["error"] = v.summary.split(": ", 1)[-1] if v.summary.startswith("lab failed") else v.summary
    if v.hang is not None:
        rec["hang"] = v.hang
    if v.drain:
        rec["drain"] = {k: d.as_dict() for k, d in v.drain.items()}


def _overhead(rec: dict[str, Any]) -> None:
    """The lab's own overhead: everything but L1 boot, guest boot and the workload."""
    ph = rec["phases"]
    boot = rec.get("boot", {}).get("dom0_ssh", 0)
    guest = sum(v for k, v in ph.items() if k.startswith(("xl_create_", "guest_ssh_")))
    rec["overhead_s"] = round(rec["wall_s"] - boot - guest - ph.get("fio", 0), 2)


def _leave_running(rec: dict[str, Any], l1: L1, where: Where, started: list[guests.Guest]) -> None:
    """--keep: leave the failed lab up for `lab ssh`, and say how to end it."""
    from lab.boot import write_owner

    info = {
        "qemu_pid": l1.vm.pid, "ssh_port": l1.spec.ssh_port, "work": str(where.work),
        "socket_dirs": [str(d) for d in l1.socket_dirs], "keys": str(images.ensure_keys().dir),
        "guests": {g.cfg.name: g.ip for g in started},
        **l1.driver.keep(l1.vm),  # libvirt: the domain, marked so that no sweep ends it
    }
    (where.results / "lab.json").write_text(json.dumps(info, indent=1) + "\n")
    write_owner(where, qemu_pid=l1.vm.pid)
    rec["kept"] = info
    rec["teardown_hint"] = f"lab down {where.results}"
    os.sync()
