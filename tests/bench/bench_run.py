#!/usr/bin/env python3
"""Benchmark: the default scenario end to end, per phase, the lab's own overhead
(wall time minus L1 boot, guest boot and the workload itself), and warm start:
the first run boots L1 cold (`--cold`), the others restore the saved state.

    make bench            # or: .venv/bin/python tests/bench/bench_run.py --runs 3

Prints one JSON document on stdout. Images are built first (not timed), so every
timed run is a warm-cache run."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab import (  # noqa: E402
    images,
    pipeline,  # noqa: E402
    scenario,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--results", type=Path, default=Path("results/bench"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("linux-dom0", "linux-guest"):
        images.ensure_image(name)
    sc = scenario.load(args.scenario)
    runs = []
    for i in range(args.runs):
        t = time.monotonic()
        rec = pipeline.run(sc, pipeline.Options(results_root=args.results, cold=(i == 0)))
        ph = rec["phases"]
        runs.append({
            "verdict": rec["verdict"],
            "wall_s": round(time.monotonic() - t, 2),
            "accel": rec.get("accel"),
            "l1_start": rec.get("l1", {}).get("start"),
            "l1_key": rec.get("l1", {}).get("key"),
            "dom0_ready_s": rec.get("boot", {}).get("dom0_ssh"),
            "boot": rec.get("boot"),
            "phases": ph,
            "overhead_s": rec.get("overhead_s"),
            "iops": [(w.get("result") or {}).get("iops") for w in rec.get("workloads", [])],
            "results_dir": rec["results_dir"],
        })
    walls = [r["wall_s"] for r in runs]

    def by_start(kind: str) -> dict:
        rs = [r for r in runs if r["l1_start"] == kind]
        if not rs:
            return {}
        return {"runs": len(rs),
                "dom0_ready_s_median": statistics.median(r["dom0_ready_s"] or 0 for r in rs),
                "wall_s_median": statistics.median(r["wall_s"] for r in rs)}

    out = {
        "benchmark": "default-scenario",
        "scenario": sc.name,
        "runs": runs,
        "summary": {
            "verdicts": [r["verdict"] for r in runs],
            "wall_s_median": statistics.median(walls),
            "dom0_ready_s_median": statistics.median(r["dom0_ready_s"] or 0 for r in runs),
            "overhead_s_median": statistics.median(r["overhead_s"] or 0 for r in runs),
            "cold": by_start("cold"),
            "restored": by_start("restored"),
        },
    }
    print(json.dumps(out, indent=1))
    return 0 if all(r["verdict"] == "PASS" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
