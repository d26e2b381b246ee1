#!/usr/bin/env python3
"""Benchmark: warm guests (issue 13). The default scenario once cold (`--cold`: L1
and its guest booted; the state is saved if none matches), then N runs warm (L1
and the guest restored, a fresh test disk attached); then one `ring-saturation`
bisect step at a good and at a bad commit of a seeded leak, each with its module
already built (cached), warm.

    make bench            # or: .venv/bin/python tests/bench/bench_run.py --warm 5

Prints one JSON document on stdout. Images are built first (not timed).
Figures per run: wall time, the time from starting L1 (QEMU on the saved state,
or a cold boot) to the workload's first I/O (`first_io_s`: the first sample, of
the guest or of blkback, above the attach probe, so one sampling interval
coarse), and the phases."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from blkback_series import make_series  # noqa: E402

from lab import images, pipeline, scenario  # noqa: E402
from lab.backend import pristine_tree  # noqa: E402


def one(sc: scenario.Scenario, results: Path, *, cold: bool = False) -> dict[str, Any]:
    t = time.monotonic()
    rec = pipeline.run(sc, pipeline.Options(results_root=results, cold=cold))
    l1 = rec.get("l1", {})
    return {
        "scenario": sc.name,
        "verdict": rec["verdict"],
        "wall_s": round(time.monotonic() - t, 2),
        "accel": rec.get("accel"),
        "l1_start": l1.get("start"),
        "guests": l1.get("guests"),
        "state_key": l1.get("key"),
        "first_io_s": rec.get("first_io_s"),
        "save_paused_s": l1.get("save_paused_s"),
        "boot": rec.get("boot"),
        "phases": rec["phases"],
        "backend_cached": rec.get("backend", {}).get("cached"),
        "results_dir": rec["results_dir"],
    }


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return round(statistics.median(vals), 2) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", type=int, default=5, help="warm runs of default after the cold one")
    ap.add_argument("--no-bisect-step", action="store_true", help="skip the ring-saturation bisect steps")
    ap.add_argument("--results", type=Path, default=Path("results/bench"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    m = images.ensure_image("linux-dom0").manifest
    images.ensure_image("linux-guest")
    default = scenario.load("default")
    cold = one(default, args.results, cold=True)
    warm = [one(default, args.results) for _ in range(args.warm)]
    out: dict[str, Any] = {"benchmark": "warm-guests", "cold": cold, "warm": warm}
    steps: list[dict[str, Any]] = []
    if not args.no_bisect_step:
        # the seeded leak (tests/e2e/blkback_series.py): shas[1] good, shas[2] adds the leak
        pristine = pristine_tree(m["packages"][f"linux-image-{m['kernel_abi']}"])
        repo = Path(tempfile.mkdtemp(prefix="bench-step-")) / "repo"
        shas = make_series(repo, pristine, bad_at=2, total=2)
        base = scenario.load("ring-saturation")
        for label, sha in (("good", shas[1]), ("bad", shas[2])):
            tree = Path(tempfile.mkdtemp(prefix=f"bench-step-{label}-")) / "tree"
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(tree), sha], check=True)
            sc = dataclasses.replace(base, backend=dataclasses.replace(base.backend, source=str(tree)))
            one(sc, args.results / "uncached")  # builds and caches the module (not timed)
            steps.append({"label": label, "commit": sha, **one(sc, args.results)})
        out["bisect_steps"] = steps
    out["summary"] = {
        "verdicts": [cold["verdict"], *(r["verdict"] for r in warm), *(s["verdict"] for s in steps)],
        "cold_wall_s": cold["wall_s"],
        "cold_first_io_s": cold["first_io_s"],
        "cold_save_paused_s": cold["save_paused_s"],
        "warm_wall_s_median": median(warm, "wall_s"),
        "warm_first_io_s_median": median(warm, "first_io_s"),
        "warm_guests": sorted({str(r["guests"]) for r in warm}),
        "warm_phases_median": {k: round(statistics.median(r["phases"].get(k, 0.0) for r in warm), 2)
                               for k in warm[0]["phases"]} if warm else {},
        "bisect_step_wall_s": {s["label"]: s["wall_s"] for s in steps},
    }
    print(json.dumps(out, indent=1))
    expected = ["PASS"] * (1 + len(warm)) + [("PASS" if s["label"] == "good" else "HANG") for s in steps]
    return 0 if out["summary"]["verdicts"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
