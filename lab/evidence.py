"""Evidence for any verdict but PASS: best effort, each item with its own short
deadline, L0's first (it never depends on L1 answering). Evidence never changes
the verdict."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

from lab import console
from lab.boot import L1
from lab.guests import Guest
from lab.observe import PROBE_SECONDS
from lab.runner import Runner

log = logging.getLogger("lab.evidence")


CONSOLE_MARK = "@@lab-console:"
_CONSOLE_SPLIT = re.compile("\n" + re.escape(CONSOLE_MARK) + "([^\n]*)\n")


def l1_answers_with_consoles(l1: L1 | None, names: list[str], results: Path) -> tuple[bool, dict[str, console.Console]]:
    """Whether dom0 answers (a short probe: evidence must not wait out every
    item's deadline on an L1 that stopped answering) and, on the same round
    trip, each guest's console as xenconsoled logged it in dom0, copied into the
    results (console-<guest>.log)."""
    if l1 is None or not l1.dom0.alive():
        return False, {}
    # each mark on a line of its own, also after a log whose last line has no newline
    script = "".join(f"printf '\\n%s\\n' {shlex.quote(CONSOLE_MARK + n)}; "
                     f"tail -n 2000 {shlex.quote(f'/var/log/xen/console/guest-{n}.log')} 2>/dev/null; "
                     for n in names) + "true"
    res = l1.dom0.run(["sh", "-c", script], timeout=2 * PROBE_SECONDS)
    if not res.ok:
        return False, {}
    out = {}
    for name, text in split_consoles(res.stdout).items():
        if text:
            path = results / f"console-{name}.log"
            path.write_text(text)
            out[name] = console.Console(path, f"guest {name}")
    return True, out


def split_consoles(stdout: str) -> dict[str, str]:
    """l1_answers_with_consoles' output: each guest's console text by name (the
    newline the script puts before each mark is not the console's)."""
    parts = _CONSOLE_SPLIT.split("\n" + stdout)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def collect(results: Path, l1: L1 | None, guests: list[Guest], consoles: dict[str, console.Console],
            *, answers: bool) -> dict[str, str]:
    ev: dict[str, str] = {}
    edir = results / "evidence"
    edir.mkdir(exist_ok=True)
    if l1 is not None:
        (edir / "qemu-state.txt").write_text(
            f"pid {l1.vm.pid} alive={l1.vm.alive()} status={l1.vm.status()}\n")
        ev["qemu_state"] = "evidence/qemu-state.txt"
    for name, con in consoles.items():
        (edir / f"tail-{name}.txt").write_text(con.tail(80) + "\n")
        ev[f"console_tail_{name}"] = f"evidence/tail-{name}.txt"
    items: list[tuple[str, Runner, list[str]]] = []
    if l1 is None:
        ev["l1"] = "the run stopped before dom0 was up: only L0 evidence was collected"
    elif not answers:
        ev["l1"] = "dom0 did not answer an SSH probe: only L0 evidence was collected"
    else:
        items += [(label, l1.dom0, argv) for label, argv in l1.ops.evidence_commands()]
        for g in guests:
            if g.runner.alive():
                items += [(f"{g.cfg.name}-inflight", g.runner, ["sh", "-c", "grep -H . /sys/block/*/inflight"]),
                          (f"{g.cfg.name}-diskstats", g.runner, ["cat", "/proc/diskstats"]),
                          (f"{g.cfg.name}-dmesg", g.runner, ["dmesg"])]
    for label, runner, argv in items:
        res = runner.run(argv, timeout=10)
        (edir / f"{label}.txt").write_text(res.stdout + (f"\n[rc {res.rc}] {res.stderr}" if not res.ok else ""))
        ev[label] = f"evidence/{label}.txt"
    return ev
