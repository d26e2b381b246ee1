"""Shared helpers of the unit tier (imported by the test modules, not a conftest so
its name cannot clash with tests/e2e/conftest.py): the captured data of real runs
(tests/data, read only) and watchdog tracks rebuilt from their counters.csv."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from lab.platform.linux.dom0 import VBD_STATS
from lab.runner import Result
from lab.watchdog import BackendPoint, GuestPoint, Track

DATA = Path(__file__).resolve().parent.parent / "data"
STAT_COLUMNS = (*VBD_STATS, "backing_inflight", "taken")


def csv_rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def track_from_rows(rows: list[dict[str, str]]) -> Track:
    """A Track as the run held it: guest rows -> GuestPoint(t, completed, inflight),
    dom0 rows -> BackendPoint(t, stats) with the statistics columns as ints."""
    first = rows[0]
    tr = Track(first["guest"], first["vdev"], first["vbd"], ring_capacity=32)
    for r in rows:
        if r["source"] == "guest":
            tr.guest_pts.append(GuestPoint(float(r["t"]), int(r["completed"]), int(r["inflight"])))
        elif r["source"] == "dom0":
            tr.backend_pts.append(BackendPoint(float(r["t"]), {k: int(r[k]) for k in STAT_COLUMNS}))
        else:
            raise AssertionError(f"unexpected source {r['source']!r}")
    return tr


def sample_values(name: str) -> list[tuple[float, list[str | None]]]:
    """(t, v) of every raw `lab-sample` line in a samples-*.jsonl capture."""
    out = []
    for line in (DATA / name).read_text().splitlines():
        row = json.loads(line)
        out.append((row["t"], json.loads(row["line"])["v"]))
    return out


def xbbd_samples(name: str) -> list[tuple[float, str]]:
    """A constructed `sysctl dev.xbbd` series of tests/data/freebsd (README there):
    '# t=<s>' then that sample's output -> (t, raw text) pairs."""
    out: list[tuple[float, list[str]]] = []
    for line in (DATA / "freebsd" / name).read_text().splitlines():
        m = re.fullmatch(r"# t=([\d.]+)", line)
        if m:
            out.append((float(m[1]), []))
        elif out:
            out[-1][1].append(line)
    return [(t, "\n".join(lines) + "\n") for t, lines in out]


class FakeRunner:
    """A dom0 runner that records each argv and answers with the given outputs in
    turn (then ""), all with `rc`: for the dom0 classes' command builders."""

    name = "dom0"

    def __init__(self, *outputs: str, rc: int = 0) -> None:
        self.outputs = list(outputs)
        self.rc = rc
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        self.calls.append(argv)
        out = self.outputs.pop(0) if self.outputs else ""
        return Result(tuple(argv), self.rc, out, "boom" if self.rc else "", 0.01)
