"""Fault scheduling, timed from the workload's start. Only the schedule lives
here; the actions come from the dom0 platform's ops (`fault_script`,
`release_scripts`): Linux suspends, delays or fails the dm device under a test
disk (lab/platform/linux/faults.py), FreeBSD reconfigures gnop. `pause-l1`
freezes the whole Xen VM from L0. Every fault records when it was requested,
when it was in force and when it ended, and is released before teardown (a
suspended device would leave a dying domain)."""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lab.platform import Backing
from lab.runner import Result, Runner
from lab.scenario import LIFECYCLE_KINDS, FaultCfg

log = logging.getLogger("lab.faults")


class FaultScripts(Protocol):
    """What a dom0 class gives the injector (dom0.LinuxDom0, dom0.FreeBsdDom0)."""

    def fault_script(self, kind: str, b: Backing, *, delay_ms: int = 0) -> str: ...
    def release_scripts(self, kind: str, b: Backing) -> list[str]: ...


@dataclass
class FaultRecord:
    cfg: FaultCfg
    planned_at: float
    requested_at: float | None = None  # when the lab issued it
    started_at: float | None = None  # when it was in force (seconds since the workload started, L0's clock)
    ended_at: float | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)
    outcome: Outcome | None = None  # a lifecycle operation's result (lab/lifecycle.py)

    def as_dict(self) -> dict:
        return {
            "kind": self.cfg.kind, "guest": self.cfg.guest or None, "disk": self.cfg.disk if self.cfg.guest else None,
            "planned_at_s": self.planned_at, "duration_s": self.cfg.duration or None,
            "requested_at_s": None if self.requested_at is None else round(self.requested_at, 2),
            "started_at_s": None if self.started_at is None else round(self.started_at, 2),
            "ended_at_s": None if self.ended_at is None else round(self.ended_at, 2),
            "error": self.error,
            **({"count": self.cfg.count} if self.cfg.kind == "detach-attach" else {}),

            **({"outcome": dataclasses.asdict(self.outcome)} if self.outcome is not None else {}),
        }


@dataclass(frozen=True)
class Outcome:
    """What a lifecycle operation (detach-attach, destroy) came to; lab/decide.py
    judges it: not completed in time is HANG, refused or leaving anything of the
    old connection behind is FAIL."""

    ok: bool
    timed_out: bool = False
    transport_error: str = ""
    failed: str = ""  # the operation was refused or went wrong
    leftovers: tuple[str, ...] = ()
    detail: str = ""


class Injector(threading.Thread):
    """Applies the scenario's faults on schedule; `release_all` undoes what is active."""

    def __init__(
        self,
        faults: tuple[FaultCfg, ...],
        *,
        dom0: Runner,
        backing: Callable[[str, str], Backing],
        scripts: FaultScripts,
        pause_l1: Callable[[], None],
        resume_l1: Callable[[], None],
        t0: float,
        lifecycle: Callable[[FaultCfg], Outcome] | None = None,
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.dom0 = dom0
        self.backing = backing
        self.scripts = scripts
        self.pause_l1 = pause_l1
        self.lifecycle = lifecycle
        self.resume_l1 = resume_l1
        self.t0 = t0
        self.records = [FaultRecord(f, float(f.at)) for f in sorted(faults, key=lambda f: f.at)]
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._ops: list[threading.Thread] = []  # lifecycle operations under way

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        # (time, order, action, record): a release is scheduled `duration` after the
        # fault was really in force, not after it was planned
        events = [(r.planned_at, i, "apply", r) for i, r in enumerate(self.records)]
        heapq.heapify(events)
        n = len(events)
        while events:
            at, _, what, rec = heapq.heappop(events)
            if self._stop_event.wait(max(0.0, at - self.now())):
                return
            with self._lock:
                if what == "apply":
                    self._apply(rec)
                    if rec.started_at is not None and rec.cfg.duration > 0:
                        n += 1
                        heapq.heappush(events, (rec.started_at + rec.cfg.duration, n, "release", rec))
                elif rec.started_at is not None and rec.ended_at is None:
                    self._release(rec)

    def _dm(self, rec: FaultRecord, script: str) -> Result:
        res = self.dom0.run(["sh", "-c", script], timeout=30)
        rec.log.append(f"{script} -> rc {res.rc} {res.stderr.strip()[-200:]}")
        return res

    def _apply(self, rec: FaultRecord) -> None:
        f = rec.cfg
        t = rec.requested_at = self.now()
        log.info("fault %s on %s/%s at %.1fs", f.kind, f.guest, f.disk, t)
        if f.kind in LIFECYCLE_KINDS:
            # in force while it runs, in a thread of its own: its checks wait for
            # the backend (seconds), and the schedule must go on meanwhile (a stall
            # it overlaps must still be released on time)
            rec.started_at = self.now()
            op = threading.Thread(target=self._lifecycle_op, args=(rec,), name=f"fault-{f.kind}", daemon=True)
            self._ops.append(op)
            op.start()
            return
        if f.kind == "pause-l1":
            try:
                self.pause_l1()
                rec.started_at = self.now()
            except Exception as e:
                rec.error = f"{type(e).__name__}: {e}"
            return
        b = self.backing(f.guest, f.disk)
        res = self._dm(rec, self.scripts.fault_script(f.kind, b, delay_ms=round(f.delay * 1000)))
        # in force from the moment the command returned (a suspend first waits for
        # the I/O already in flight to complete)
        if res.ok:
            rec.started_at = self.now()
        else:
            rec.error = res.stderr.strip()[-300:] or f"rc {res.rc}"

    def _lifecycle_op(self, rec: FaultRecord) -> None:
        try:
            assert self.lifecycle is not None, "no lifecycle operations in this run"
            rec.outcome = self.lifecycle(rec.cfg)
        except Exception as e:  # the lab's failure, not the backend's
            rec.outcome = Outcome(False, transport_error=f"{type(e).__name__}: {e}")
        rec.ended_at = self.now()
        log.info("fault %s ended at %.1fs: %s", rec.cfg.kind, rec.ended_at, rec.outcome)

    def wait(self, timeout: float) -> None:
        """The schedule and every lifecycle operation done, or `timeout` passed."""
        end = time.monotonic() + timeout
        self.join(max(0.0, end - time.monotonic()))
        for op in list(self._ops):
            op.join(max(0.0, end - time.monotonic()))

    def _release(self, rec: FaultRecord) -> None:
        f = rec.cfg
        t = self.now()
        if f.kind == "pause-l1":
            self.resume_l1()
        else:
            for script in self.scripts.release_scripts(f.kind, self.backing(f.guest, f.disk)):
                self._dm(rec, script)
        rec.ended_at = t
        log.info("fault %s released at %.1fs", f.kind, t)

    def release_all(self) -> None:
        self._stop_event.set()
        with self._lock:
            for rec in self.records:
                if rec.started_at is not None and rec.ended_at is None:
                    try:
                        self._release(rec)
                    except Exception as e:
                        rec.error = f"release failed: {e}"

    def first_started(self, kinds: tuple[str, ...]) -> FaultRecord | None:
        started = [r for r in self.records if r.started_at is not None and r.cfg.kind in kinds]
        return min(started, key=lambda r: r.started_at or 0) if started else None
