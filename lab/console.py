"""Console logs: milestones with per-stage deadlines, and crash signatures.

A console is a file QEMU (or xenconsoled) appends to. We read it incrementally and
never block on it: every wait is bounded by a Deadline."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.timing import Deadline


@dataclass(frozen=True)
class Milestone:
    stage: str  # the record's stage name when this milestone is missed
    what: str  # human words for the error message
    pattern: re.Pattern[bytes]


# The Linux-dom0 boot, in order (Xen's banner, dom0's kernel, dom0's PID 1).
XEN_BANNER = Milestone("boot:xen", "the Xen banner", re.compile(rb"Xen version \d+\.\d+"))
DOM0_KERNEL = Milestone(
    "boot:dom0", "the dom0 kernel's first line", re.compile(rb"Linux version \d+\.\d+|\[ *0\.000000\]")
)
DOM0_INIT = Milestone("boot:dom0", "dom0's init to report ready", re.compile(rb"lab-dom0: ready"))
GUEST_READY = Milestone("guest:boot", "the guest's init to report ready", re.compile(rb"lab-guest: ready"))

# Signatures that make a run CRASH. Hung-task reports are not here: they are
# evidence of a hang, which the counters decide.
CRASH_PATTERNS = [
    (re.compile(rb"Kernel panic - not syncing[^\n]*"), "Linux panic"),
    (re.compile(rb"\(XEN\) Panic on CPU \d+"), "Xen panic"),
    (re.compile(rb"\(XEN\) \*\*\*\* [^\n]*FATAL[^\n]*|\(XEN\) FATAL [^\n]*"), "Xen fatal trap"),
    (re.compile(rb"BUG: unable to handle [^\n]*"), "Linux oops"),
    (re.compile(rb"Oops: [^\n]*"), "Linux oops"),
    (re.compile(rb"kernel BUG at [^\n]*"), "Linux BUG"),
    (re.compile(rb"watchdog: BUG: soft lockup[^\n]*"), "soft lockup"),
    (re.compile(rb"Watchdog detected hard LOCKUP[^\n]*"), "hard lockup"),
    (re.compile(rb"Fatal trap \d+[^\n]*"), "FreeBSD fatal trap"),
    (re.compile(rb"panic: [^\n]*"), "FreeBSD panic"),
]
LOCKUP_KINDS = {"soft lockup", "hard lockup"}
# The lab's own init scripts print this when they cannot go on: fail at once
# instead of waiting for the milestone's deadline.
LAB_FATAL = re.compile(rb"lab-[a-z0-9]+: FATAL: [^\n]*")


def find_crash(text: bytes) -> tuple[str, str] | None:
    """(kind, line) of the first crash signature in `text`, or None."""
    first: tuple[int, str, str] | None = None
    for pat, kind in CRASH_PATTERNS:
        m = pat.search(text)
        if m and (first is None or m.start() < first[0]):
            first = (m.start(), kind, m.group(0).decode(errors="replace").strip())
    return (first[1], first[2]) if first else None


def tail_text(data: bytes, n: int = 30) -> str:
    lines = data.decode(errors="replace").replace("\r", "").splitlines()
    return "\n".join(lines[-n:])


class Console:
    """One console log file, read from the point where this object last looked."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.pos = 0

    def read_all(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def tail(self, n: int = 30) -> str:
        return tail_text(self.read_all(), n)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for(self, m: Milestone, deadline: Deadline, *, alive: callable = lambda: True) -> float:  # type: ignore[valid-type]
        """Wait until `m` appears after the current position; returns when it did.

        Raises LabError(m.stage) if the deadline passes, if a crash signature shows
        first, or if `alive()` says the VM is gone."""
        while True:
            data = self.read_all()
            hit = m.pattern.search(data, self.pos)
            if hit:
                self.pos = hit.end()
                return time.monotonic()
            crash = find_crash(data[self.pos:])
            if crash:
                raise LabError(m.stage, f"{crash[0]} on the {self.name} console while waiting for {m.what}: {crash[1]}",
                               tail=tail_text(data))
            fatal = LAB_FATAL.search(data, self.pos)
            if fatal:
                raise LabError(m.stage, f"{fatal.group(0).decode(errors='replace')} (while waiting for {m.what})",
                               tail=tail_text(data))
            if not alive():
                raise LabError(m.stage, f"the VM exited while waiting for {m.what}", tail=tail_text(data))
            if deadline.expired():
                raise LabError(
                    m.stage,
                    f"no {m.what} on the {self.name} console within {deadline.seconds:.0f}s",
                    tail=tail_text(data),
                )
            time.sleep(0.2)
