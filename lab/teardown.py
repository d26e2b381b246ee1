"""The orderly teardown inside L1, before L1 is stopped: where blkback's real bugs
live (teardown order of persistent grants and the page pool, devices never
freed, ring threads left running, refcounts that never drop). Every run that
reached PASS or FAIL ends with it:

    stop workloads -> detach each test disk (xl block-detach) -> destroy each
    guest -> leftovers: backend nodes in xenstore, ring threads, backing devices
    still open, domains still dying, the backend refusing to unload

Each step has its own deadline, and after each the Xen console (dom0's too) is
read for crash signatures. What was seen goes to lab/decide.py's
`after_teardown`; nothing here decides."""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lab import console, scenario
from lab.boot import L1
from lab.decide import ConsoleFinding
from lab.guests import Guest
from lab.timing import Deadline, sh_poll
from lab.xen import VDEV_DEVID

log = logging.getLogger("lab.teardown")
STEP_SECONDS = 30.0  # xl block-detach and destroy take 1-3 s under TCG
GONE_SECONDS = 15.0  # for xenstore nodes and dying domains to go once a step returned


@dataclass(frozen=True)
class Step:
    name: str  # what a person reads: "xl block-detach lin1 xvdb"
    kind: str  # detach, destroy, unload: the record's stage is teardown:<kind>
    ok: bool
    elapsed: float
    timed_out: bool = False
    transport_error: str = ""
    detail: str = ""
    crash: ConsoleFinding | None = None  # a crash signature that appeared during this step
    output: str = field(default="", repr=False, compare=False)  # stdout, for the checks folded into the step


@dataclass
class Teardown:
    steps: list[Step] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    skipped: str = ""  # why the teardown did not run

    def as_record(self) -> dict[str, Any]:
        return {"skipped": self.skipped or None, "leftovers": self.leftovers,
                "steps": [{k: v for k, v in asdict(s).items()
                           if k != "output" and (v not in (None, "", False) or k in ("ok",))}
                          for s in self.steps]}


def skipped(why: str) -> Teardown:
    return Teardown(skipped=why)


class _Crashes:
    """New crash signatures on the Xen console (dom0's hvc0 is in it) since the
    teardown began."""

    def __init__(self, con: console.Console) -> None:
        self.con = con
        self.start = con.size()

    def new(self) -> ConsoleFinding | None:
        found = console.find_crash(self.con.read_all()[self.start:])
        return ConsoleFinding("xen", found[0], found[1]) if found else None


def run(sc: scenario.Scenario, l1: L1, guests: list[Guest], *, phases: dict[str, float],
        unfinished: set[str] | None = None) -> Teardown:
    """`unfinished`: the guests whose workload may still run (None: any may)."""
    td = Teardown()
    crashes = _Crashes(l1.xen_console)
    dom0 = l1.dom0
    t0 = time.monotonic()

    def step(name: str, kind: str, argv: list[str]) -> Step:
        t = time.monotonic()
        res = dom0.run(argv, timeout=STEP_SECONDS + 2 * GONE_SECONDS)
        s = Step(name, kind, res.ok, round(time.monotonic() - t, 2), res.timed_out, res.transport_error,
                 (res.stderr or res.stdout).strip()[-400:], crashes.new(), output=res.stdout)
        td.steps.append(s)
        return s

    def stop() -> bool:
        """A step that did not complete, or a crash: what follows cannot be judged."""
        last = td.steps[-1]
        return bool(last.timed_out or last.transport_error or last.crash)

    for g in guests:  # a workload that did not end by itself (an early FAIL) stops first
        if unfinished is None or g.cfg.name in unfinished:
            g.runner.run(["sh", "-c", "pkill -x fio; true"], timeout=10)
    for g in guests:
        for vdev in g.vbds:
            node = f"/local/domain/0/backend/vbd/{g.domid}/{VDEV_DEVID[vdev]}"
            s = step(f"xl block-detach {g.cfg.name} {vdev}", "detach", detach_argv(g.cfg.name, vdev, node))
            if stop():
                return _done(td, phases, t0)
            if s.ok and f"{LEFT}node" in s.output.splitlines():
                td.leftovers.append(f"{node} still in xenstore {GONE_SECONDS:.0f}s after "
                                    f"`xl block-detach {g.cfg.name} {vdev}` returned")
    for g in guests:
        g.runner.close()  # its tunnel through dom0 dies with it
        s = step(f"xl destroy {g.cfg.name}", "destroy", destroy_argv(g.cfg.name, g.domid))
        if stop():
            return _done(td, phases, t0)
        if s.ok:
            td.leftovers += destroy_leftovers(s.output, g.cfg.name, g.domid)
    t = time.monotonic()  # the leftover checks ride on the unload's round trip
    left, problem = l1.ops.leftovers_then_unload([g.domid for g in guests],
                                                 [b for g in guests for b in g.backings.values()])
    td.leftovers += left
    td.steps.append(Step("unload the backend", "unload", problem is None, round(time.monotonic() - t, 2),
                         detail=problem or "", crash=crashes.new()))
    if problem:
        td.leftovers.append(problem)
    return _done(td, phases, t0)


def _done(td: Teardown, phases: dict[str, float], t0: float) -> Teardown:
    for s in td.steps:
        key = f"teardown_{s.kind}"
        phases[key] = round(phases.get(key, 0.0) + s.elapsed, 2)
    phases["teardown_l1"] = round(time.monotonic() - t0, 2)
    return td


# Each step's "is it gone yet" polls run in dom0 in the step's own round trip
# (a round trip costs 0.2-0.6 s under TCG, and a teardown had eight of them);
# what is still there after GONE_SECONDS is printed with LEFT in front.
LEFT = "lab-left:"


def _until_gone(test: str, what: str) -> str:
    """sh: poll `test` (succeeds while the thing exists) at most GONE_SECONDS;
    print LEFT`what` if it never went."""
    return sh_poll(f"! {test}", GONE_SECONDS, f"echo {LEFT}{what}; break")


def detach_argv(guest: str, vdev: str, node: str) -> list[str]:
    """`xl block-detach` (the step's rc is its rc), then its backend node gone."""
    return ["sh", "-c", f"xl block-detach {shlex.quote(guest)} {shlex.quote(vdev)} || exit $?; "
            + _until_gone(f"xenstore-exists {shlex.quote(node)} 2>/dev/null", "node")]


def destroy_argv(guest: str, domid: int) -> list[str]:
    """`xl destroy` (the step's rc is its rc), then the toolstack no longer lists
    it, then Xen no longer holds it: `xl list` shows a domain whose pages stay
    mapped (a grant not unmapped) as "(null)" under its old id."""
    held = f"xl list 2>/dev/null | awk '$2 == {int(domid)}' | grep -q ."
    return ["sh", "-c", f"xl destroy {shlex.quote(guest)} || exit $?; "
            + _until_gone(f"xl domid {shlex.quote(guest)} >/dev/null 2>&1", "listed") + "; "
            + _until_gone(held, "held") + "; "
            + f"xl list 2>/dev/null | awk '$2 == {int(domid)}' | sed 's/^/{LEFT}line:/'; true"]


def destroy_leftovers(out: str, guest: str, domid: int) -> list[str]:
    """What destroy_argv's polls found still there."""
    lines = out.splitlines()
    left = []
    if f"{LEFT}listed" in lines:
        left.append(f"domain {domid} ({guest}) still listed {GONE_SECONDS:.0f}s after `xl destroy`")
    if f"{LEFT}held" in lines:
        held = [ln[len(LEFT) + 5:].strip() for ln in lines if ln.startswith(f"{LEFT}line:")]
        left.append(f"domain {domid} still held by Xen after destroy: {held[0] if held else '(gone since)'}")
    return left


def _gone(dom0: Any, argv: list[str]) -> bool:
    """`argv` fails (the thing is gone) within GONE_SECONDS: one round trip per
    try (lab/lifecycle.py's checks, which run while other steps go on)."""
    dl = Deadline(GONE_SECONDS)
    while True:
        res = dom0.run(argv, timeout=10)
        if res.rc not in (0, -1):
            return True
        if dl.expired():
            return False
        time.sleep(0.5)


def _dying(dom0: Any, domids: list[int]) -> list[str]:
    """Domains the toolstack no longer lists but Xen still holds (`xl list` shows
    them as "(null)" while their pages stay mapped: a grant not unmapped)."""
    dl = Deadline(GONE_SECONDS)
    while True:
        out = dom0.run(["xl", "list"], timeout=10).stdout
        left = [line for line in out.splitlines()[1:] if line.split() and line.split()[1:2]
                and line.split()[1].isdigit() and int(line.split()[1]) in domids]
        if not left or dl.expired():
            return [f"domain {line.split()[1]} still held by Xen after destroy: {line.strip()}" for line in left]
        time.sleep(0.5)
