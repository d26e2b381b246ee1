"""Evidence for any verdict but PASS: best effort, each item with its own short
deadline, L0's first (it never depends on L1 answering). Evidence never changes
the verdict."""

from __future__ import annotations

import logging
from pathlib import Path

from lab import console
from lab.boot import L1
from lab.guests import Guest
from lab.observe import PROBE_SECONDS
from lab.runner import Runner

log = logging.getLogger("lab.evidence")


def l1_answers(l1: L1 | None) -> bool:
    """One short probe: evidence must not wait out every item's deadline on an L1
    that stopped answering."""
    return bool(l1 is not None and l1.dom0.alive() and l1.dom0.run(["true"], timeout=PROBE_SECONDS).ok)


def guest_consoles(l1: L1, names: list[str], results: Path) -> dict[str, console.Console]:
    """Each guest's console as xenconsoled logged it in dom0, copied into the
    results (console-<guest>.log)."""
    out = {}
    for name in names:
        res = l1.dom0.run(["tail", "-n", "2000", f"/var/log/xen/console/guest-{name}.log"], timeout=10)
        if res.ok and res.stdout:
            path = results / f"console-{name}.log"
            path.write_text(res.stdout)
            out[name] = console.Console(path, f"guest {name}")
    return out


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
