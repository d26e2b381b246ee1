"""The results directory: record.json, counters.csv, consoles, the QEMU argv, the
commands log. One directory per run, results/<scenario>/<UTC timestamp>/, with
results/latest pointing at the newest."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from lab.decide import BISECT_CODES as BISECT_CODES  # re-exported: the codes live with the decision
from lab.decide import EXIT_CODES as EXIT_CODES
from lab.watchdog import Track

VERDICTS = tuple(EXIT_CODES)


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def make_results_dir(root: Path, scenario: str) -> Path:
    d = root / scenario / utc_stamp()
    n = 1
    while d.exists():  # two runs in the same second
        n += 1
        d = root / scenario / f"{utc_stamp()}-{n}"
    d.mkdir(parents=True)
    latest = root / "latest"
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(d.relative_to(root))
    tmp.replace(latest)
    return d


CSV_FIELDS = [
    "t", "source", "guest", "vdev", "vbd", "completed", "inflight",
    "taken", "oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "backing_inflight",
]


def write_series(path: Path, tracks: list[Track]) -> int:
    rows: list[dict] = []
    for tr in tracks:
        base = {"guest": tr.guest, "vdev": tr.vdev, "vbd": tr.vbd}
        for g in tr.guest_pts:
            rows.append({**base, "t": round(g.t, 3), "source": "guest", "completed": g.completed,
                         "inflight": g.inflight})
        for b in tr.backend_pts:
            rows.append({**base, "t": round(b.t, 3), "source": "dom0",
                         **{k: v for k, v in b.stats.items() if k in CSV_FIELDS}})
    rows.sort(key=lambda r: (r["t"], r["source"]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def counter_summary(track: Track) -> dict:
    if not track.backend_pts:
        return {}
    first, last = track.backend_pts[0].stats, track.backend_pts[-1].stats
    return {
        "first": first, "last": last,
        "delta": {k: last[k] - first.get(k, 0) for k in last},
    }


def write_record(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def summary_lines(rec: dict) -> list[str]:
    """The few lines a developer reads first."""
    out = [f"{rec['verdict']}  {rec['scenario']}  ({rec.get('wall_s', 0):.0f}s, accel {rec.get('accel', '?')})"]
    if rec["verdict"] == "ERROR":
        out.append(f"  stage {rec.get('stage')}: {rec.get('error', '')}")
    elif rec.get("summary"):
        out.append("  " + rec["summary"])
    for w in rec.get("workloads", []):
        r = w.get("result") or {}
        out.append(
            f"  {w['guest']}/{w['disk']}: {r.get('iops', 0):.0f} IOPS, p99 {r.get('clat_p99_ms', 0)} ms, "
            f"errors {r.get('errors', '?')}; ring {w.get('ring_capacity')} vs peak in flight "
            f"guest {w.get('peak_inflight_guest')} / backing {w.get('peak_inflight_backing')}"
        )
    phases = rec.get("phases", {})
    if phases:
        out.append("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    out.append(f"  results: {rec.get('results_dir')}")
    return out
