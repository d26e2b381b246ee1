"""Console logs: milestones with per-stage deadlines, and crash signatures.

A console is a file QEMU (or xenconsoled) appends to. We read it incrementally and
never block on it: every wait is bounded by a Deadline."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
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

# Signatures that make a run CRASH, on any console (Xen's serial log with dom0's
# hvc0, each guest's). The images keep the console log level at 5 so that
# KERN_CRIT (`kernel BUG at`), KERN_DEFAULT (`Oops`, `invalid opcode:`: how 6.1
# prints a BUG()) and KERN_WARNING lines reach the console at all.
CRASH_PATTERNS = [
    (re.compile(rb"Kernel panic - not syncing[^\n]*"), "Linux panic"),
    (re.compile(rb"\(XEN\) Panic on CPU \d+"), "Xen panic"),
    (re.compile(rb"\(XEN\) \*\*\*\* [^\n]*FATAL[^\n]*|\(XEN\) FATAL [^\n]*"), "Xen fatal trap"),
    (re.compile(rb"BUG: unable to handle [^\n]*"), "Linux oops"),
    (re.compile(rb"Oops: [^\n]*"), "Linux oops"),
    (re.compile(rb"kernel BUG at [^\n]*"), "Linux BUG"),
    (re.compile(rb"invalid opcode: [0-9a-f]{4} [^\n]*"), "Linux BUG (invalid opcode)"),
    (re.compile(rb"general protection fault[^\n]*"), "Linux general protection fault"),
    (re.compile(rb"watchdog: BUG: soft lockup[^\n]*"), "soft lockup"),
    (re.compile(rb"Watchdog detected hard LOCKUP[^\n]*"), "hard lockup"),
    (re.compile(rb"BUG: [a-z][^\n]*"), "Linux BUG"),
    (re.compile(rb"INFO: task [^\n]* blocked for more than \d+ seconds[^\n]*"), "hung task"),
    (re.compile(rb"Fatal trap \d+[^\n]*"), "FreeBSD fatal trap"),
    (re.compile(rb"panic: [^\n]*"), "FreeBSD panic"),
]
LOCKUP_KINDS = {"soft lockup", "hard lockup"}
# A WARN is a crash only where it concerns the block path under test: the WARNING
# line names the source file, or the splat's next lines name the module.
WARNING = re.compile(rb"WARNING: CPU: \d+ PID: \d+ at [^\n]*")
BLOCK_PATH = re.compile(rb"xen-blk(back|front)|xen_blk(back|front)|xen_blkif|blkif_|blkfront|blkback")
WARN_CONTEXT_LINES = 40
# The lab's own init scripts print this when they cannot go on: fail at once
# instead of waiting for the milestone's deadline.
LAB_FATAL = re.compile(rb"lab-[a-z0-9]+: FATAL: [^\n]*")
# A guest whose root (its initramfs) does not fit its memory never runs the lab's
# init, so no FATAL line comes: these are the kernel's own words for it.
GUEST_TOO_SMALL = re.compile(rb"Initramfs unpacking failed[^\n]*|Out of memory: Killed process[^\n]*")


def find_crash(text: bytes) -> tuple[str, str] | None:
    """(kind, line) of the first crash signature in `text`, or None."""
    first: tuple[int, str, str] | None = None
    for pat, kind in CRASH_PATTERNS:
        m = pat.search(text)
        if m and (first is None or m.start() < first[0]):
            first = (m.start(), kind, m.group(0).decode(errors="replace").strip())
    for m in WARNING.finditer(text):
        if first is not None and m.start() > first[0]:
            break
        # every loaded module is listed after a WARNING: that line names nothing
        context = b"\n".join(line for line in text[m.start():].split(b"\n")[:WARN_CONTEXT_LINES]
                              if b"Modules linked in" not in line)
        if BLOCK_PATH.search(context):
            first = (m.start(), "Linux WARNING in the block path", m.group(0).decode(errors="replace").strip())
            break
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

    def wait_for(self, m: Milestone, deadline: Deadline, *, alive: Callable[[], bool] = lambda: True) -> float:
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
