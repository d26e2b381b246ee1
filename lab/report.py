"""The results directory: record.json, counters.csv, consoles, the QEMU argv, the
commands log. One directory per run, results/<scenario>/<UTC timestamp>/, with
results/latest pointing at the newest."""

from __future__ import annotations

import csv
import json
import os
import secrets
import time
from pathlib import Path

from lab.decide import BISECT_CODES as BISECT_CODES  # re-exported: the codes live with the decision
from lab.decide import EXIT_CODES as EXIT_CODES
from lab.watchdog import Track

VERDICTS = tuple(EXIT_CODES)


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def make_results_dir(root: Path, scenario: str) -> Path:
    """results/<scenario>/<stamp>, or <stamp>-2, -3... when runs start in the same
    second. mkdir(exist_ok=False) is the claim: of runs racing for one name exactly
    one creates it, the others take the next suffix (checking exists() first let
    two runs both see a name free and one of them fail)."""
    d = claim(root / scenario)
    point_latest(root, d)
    return d


def claim(parent: Path) -> Path:
    """parent/<stamp> (or <stamp>-2, -3...), created by this process alone."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp()
    n = 1
    while True:
        d = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1


def point_latest(root: Path, d: Path) -> None:
    """results/latest -> `d` (relative), replaced atomically: a symlink made aside
    under a name unique to this process and call, then renamed over `latest`."""
    latest = root / "latest"
    tmp = root / f".latest.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        tmp.symlink_to(d.relative_to(root))
        tmp.replace(latest)
    finally:
        tmp.unlink(missing_ok=True)


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
    l0 = rec.get("l0") or {}
    via = f", libvirt domain {(l0.get('domain') or {}).get('name', '?')}" if l0.get("driver") == "libvirt" else ""
    out = [f"{rec['verdict']}  {rec['scenario']}  ({rec.get('wall_s', 0):.0f}s, accel {rec.get('accel', '?')}{via})"]
    if rec["verdict"] == "ERROR":
        out.append(f"  stage {rec.get('stage')}: {rec.get('error', '')}")
    elif rec.get("summary"):
        out.append("  " + rec["summary"])
    for w in rec.get("workloads", []):
        r = w.get("result")
        ring = (f"ring {w.get('ring_capacity')} vs peak in flight guest {w.get('peak_inflight_guest')} / "
                f"backing {w.get('peak_inflight_backing')}")
        if r:
            what = f"{r.get('iops', 0):.0f} IOPS, p99 {r.get('clat_p99_ms', 0)} ms, errors {r.get('errors', '?')}"
        else:
            # no tool result (a HANG, a CRASH, a destroyed guest): say what the counters saw
            o = w.get("observed") or {}
            what = (f"no workload result; counters saw {o['completions_per_s']:.0f} completions/s over "
                    f"{o['seconds']:.0f}s, {o['inflight_at_end']} in flight at the end"
                    if "completions_per_s" in o else "no workload result and no samples")
        out.append(f"  {w['guest']}/{w['disk']}: {what}; {ring}")
    phases = rec.get("phases", {})
    if phases:
        out.append("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    out.append(f"  results: {rec.get('results_dir')}")
    return out


SCHEMA_VERSION = 2  # record.json's layout: 2 = verdict rule, teardown, observed counters, host facts


def host_facts() -> dict[str, str | int]:
    """What makes nightly runs comparable over time: the host's kernel, CPU and
    core count, and the lab's own version and commit."""
    import platform
    import subprocess

    from lab import __file__ as lab_init

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(Path(lab_init).parent), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    try:
        from importlib.metadata import version

        lab_version = version("xen-blklab")
    except Exception:
        lab_version = "unknown"
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count() or 0,
            "lab_version": lab_version, "lab_commit": commit or "unknown"}
