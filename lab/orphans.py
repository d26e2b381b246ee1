"""What the lab may end and remove on its own: proof that a process is a lab's
QEMU, and the sweep of runs whose lab died (SIGKILL, power cut).

A pid alone proves nothing (pids are reused). A process is a run's QEMU only if
it is qemu-system-x86_64 and its command line names files inside that run's work
directory (whichever L0 driver started it: libvirt's QEMU names the run's
overlays in its -blockdev JSON); the lab never signals anything else. `lab down`
and `lab ssh` use the same proof (lab/cli.py)."""

from __future__ import annotations

import json
import logging
import os
import select
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from lab.qemu import QEMU

log = logging.getLogger("lab.orphans")
# A run creates its work directory and writes owner.json right after; a directory
# without one is a run starting now unless it is older than this (a concurrent
# sweep must never remove a live run's directory).
YOUNG_S = 300.0


def _argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def lab_qemu_problem(pid: int, works: list[str], *, qemu_name: str = QEMU) -> str | None:
    """Why process `pid` is not the QEMU of the lab whose work directory is one of
    `works`, or None if it is. A pid alone proves nothing (pids are reused): the
    process must be `qemu_name` (qemu-system-x86_64; a test passes a harmless
    stand-in's name) with that work directory's files on its command line."""
    argv = _argv(pid)
    if argv is None:
        return f"process {pid} is gone"
    shown = shlex.join(argv)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    if not argv or Path(argv[0]).name != qemu_name:
        return f"process {pid} is not {qemu_name} (its command line: {shown!r})"
    # the qemu driver's `-drive file=W/...`, `-serial file:W/...`; libvirt's JSON
    # `-blockdev {"filename":"W/..."}` (the libvirt driver's QEMU, lab/l0.py)
    if not any(a.startswith(f"{w}/") or f"={w}/" in a or f":{w}/" in a or f'"{w}/' in a
               for a in argv for w in works):
        return f"process {pid} is a QEMU that uses no file of {works[0]} (another lab's, or not a lab's)"
    return None


def _alive(pid: object) -> bool:
    """A live (not zombie) process `pid`."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


def _processes_named(name: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            argv = _argv(int(d.name))
            if argv and Path(argv[0]).name == name:
                out.append(int(d.name))
    return out


def _socket_dirs(argv: list[str]) -> list[Path]:
    """The lab-qmp-* directories under /tmp a QEMU's monitor socket lives in
    (lab/boot.py qmp_path, for a work directory too deep for a socket path)."""
    tmp = Path("/tmp").resolve()
    out = []
    for a in argv:
        if a.startswith("unix:/tmp/lab-qmp-"):
            d = Path(a[len("unix:"):].split(",", 1)[0]).parent
            if d.parent.resolve() == tmp and d.name.startswith("lab-qmp-") and not d.is_symlink():
                out.append(d)
    return out


ENDED, GONE = "ended", "gone"


def end_qemu(pid: int, works: list[str], *, qemu_name: str = QEMU, wait_s: float = 10) -> str:
    """SIGKILL `pid` if it is the QEMU of `works` (see lab_qemu_problem), through a
    pidfd so the process checked is the process killed. ENDED (killed and gone),
    GONE (it had exited already), or why it was not ended (not ours, or it did
    not die)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return GONE
    try:
        if select.select([pidfd], [], [], 0)[0]:  # readable: it has exited
            return GONE
        problem = lab_qemu_problem(pid, works, qemu_name=qemu_name)
        if problem:
            return problem
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], wait_s)[0]:
            return f"QEMU pid {pid} did not exit within {wait_s:.0f} s of SIGKILL"
        return ENDED
    finally:
        os.close(pidfd)


def _owner(d: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((d / "owner.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _kept(owner: dict[str, Any], d: Path) -> bool:
    """A lab left running with --keep: its lab.json (in the run's results) names
    this work directory. `lab down` ends it, never a sweep."""
    results = owner.get("results")
    if not isinstance(results, str):
        return False
    try:
        info = json.loads((Path(results) / "lab.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(info, dict) and info.get("work") in (str(d), str(d.resolve()))


def sweep_runs(runs: Path, *, qemu_name: str = QEMU, young_s: float = YOUNG_S) -> dict[str, list[Any]]:
    """Work directories of runs whose lab process is gone: end the QEMU each one
    left behind (only a process proven to be that run's QEMU), then remove the
    directory. Left alone: runs whose lab is alive, kept labs, directories too
    young to have their owner.json yet, and a directory whose QEMU would not die.
    (A kept lab whose QEMU is gone is removed, as before.)
    Returns {"ended": [{"pid", "run"}], "removed": [dir], "left": [{"run", "why"}]}."""
    ended: list[dict[str, Any]] = []
    removed: list[str] = []
    left: list[dict[str, str]] = []
    if not runs.is_dir():
        return {"ended": ended, "removed": removed, "left": left}
    qemus: list[int] | None = None
    for d in sorted(runs.glob("run-*")):
        if d.is_symlink() or not d.is_dir():
            continue  # the lab makes directories; anything else is not its to remove
        owner = _owner(d)
        if owner is None:
            try:
                age = time.time() - d.stat().st_mtime
            except OSError:
                continue
            if age < young_s:
                continue  # a run that has just made it and is writing owner.json
            owner = {}
        elif _alive(owner.get("pid")) or (_kept(owner, d) and _alive(owner.get("qemu_pid"))):
            continue  # a run in progress, or a lab kept with --keep whose QEMU runs (`lab down` ends it)
        works = sorted({str(d), str(d.resolve())})
        if qemus is None:
            qemus = _processes_named(qemu_name)
        pids = {p for p in (owner.get("qemu_pid"), *qemus) if isinstance(p, int) and not isinstance(p, bool)}
        ours = [p for p in sorted(pids) if lab_qemu_problem(p, works, qemu_name=qemu_name) is None]
        stuck = []
        sockets: list[Path] = []
        for pid in ours:
            sockets += _socket_dirs(_argv(pid) or [])
            why = end_qemu(pid, works, qemu_name=qemu_name)
            if why == ENDED:
                log.warning("ended QEMU pid %d left running by a dead run (%s)", pid, d)
                ended.append({"pid": pid, "run": str(d)})
            elif why != GONE:
                stuck.append(why)
        if stuck:
            left.append({"run": str(d), "why": "; ".join(stuck)})
            continue
        for s in sockets:
            shutil.rmtree(s, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return {"ended": ended, "removed": removed, "left": left}
