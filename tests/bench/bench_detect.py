#!/usr/bin/env python3
"""Benchmark: how fast a real stall is caught, and that slow or healthy I/O is
never called a hang.

    .venv/bin/python tests/bench/bench_detect.py --stalls 5 --healthy 5 --slow 5

Runs `stall` N times (detection latency from the fault's recorded start), then
`default` and `slow-disk` (zero HANG verdicts expected), all on the restored L1
where one is saved. Prints one JSON document on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab import (  # noqa: E402
    images,
    pipeline,  # noqa: E402
    scenario,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stalls", type=int, default=5)
    ap.add_argument("--healthy", type=int, default=5)
    ap.add_argument("--slow", type=int, default=5)
    ap.add_argument("--results", type=Path, default=Path("results/bench-detect"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("linux-dom0", "linux-guest"):
        images.ensure_image(name)
    plan = [("stall", args.stalls), ("default", args.healthy), ("slow-disk", args.slow)]
    out: dict = {"benchmark": "hang-detection", "runs": []}
    for name, n in plan:
        sc = scenario.load(name)
        out.setdefault("windows", scenario.to_dict(sc.watchdog))
        for _ in range(n):
            rec = pipeline.run(sc, pipeline.Options(results_root=args.results))
            wl = (rec.get("workloads") or [{}])[0]
            out["runs"].append({
                "scenario": name, "verdict": rec["verdict"], "l1": rec.get("l1", {}).get("start"),
                "detected_after_s": (rec.get("hang") or {}).get("detected_after_s"),
                "longest_completion_gap_s": wl.get("longest_completion_gap_s"),
                "clat_max_ms": (wl.get("result") or {}).get("clat_max_ms"),
                "results_dir": rec["results_dir"],
            })
            print(json.dumps(out["runs"][-1]), file=sys.stderr)
    stalls = [r for r in out["runs"] if r["scenario"] == "stall"]
    latencies = [r["detected_after_s"] for r in stalls if r["detected_after_s"] is not None]
    healthy = [r for r in out["runs"] if r["scenario"] != "stall"]
    gaps = [r["longest_completion_gap_s"] for r in healthy if r["longest_completion_gap_s"] is not None]
    out["summary"] = {
        "stall_runs": len(stalls),
        "stall_hang_verdicts": sum(r["verdict"] == "HANG" for r in stalls),
        "detected_after_s_median": statistics.median(latencies) if latencies else None,
        "detected_after_s_max": max(latencies) if latencies else None,
        "healthy_and_slow_runs": len(healthy),
        "healthy_and_slow_hang_verdicts": sum(r["verdict"] == "HANG" for r in healthy),
        "healthy_and_slow_verdicts": {v: sum(r["verdict"] == v for r in healthy) for v in
                                      sorted({r["verdict"] for r in healthy})},
        "longest_completion_gap_s_max": max(gaps) if gaps else None,
    }
    print(json.dumps(out, indent=1))
    s = out["summary"]
    ok = s["stall_hang_verdicts"] == len(stalls) and s["healthy_and_slow_hang_verdicts"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
