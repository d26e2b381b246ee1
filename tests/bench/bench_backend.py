#!/usr/bin/env python3
"""Benchmark: what a bisect step costs for a backend-only change, against a plain
run of the same scenario (stock driver). Three runs of `light` on the restored L1:
stock; a backend built from a changed tree (cold build); the same tree again
(cached build). Prints JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from blkback_series import make_series  # noqa: E402

from lab import (  # noqa: E402
    images,
    pipeline,  # noqa: E402
    scenario,
)
from lab.backend import pristine_tree  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    m = images.ensure_image("linux-dom0").manifest
    images.ensure_image("linux-guest")
    pristine = pristine_tree(m["packages"][f"linux-image-{m['kernel_abi']}"])
    repo = Path(tempfile.mkdtemp(prefix="bench-blkback-")) / "repo"
    # a fresh harmless commit with a unique comment: its build is not cached yet
    make_series(repo, pristine, bad_at=0, total=1)
    (repo / "drivers/block/xen-blkback/blkback.c").open("a").write(f"\n/* bench {time.time_ns()} */\n")
    base = scenario.load("light")
    results = Path("results/bench-backend")
    out: dict = {"benchmark": "backend-step-cost", "scenario": base.name, "runs": []}
    for label, sc in (("stock", base),
                      ("backend-uncached", dataclasses.replace(base, backend=dataclasses.replace(base.backend, source=str(repo)))),
                      ("backend-cached", dataclasses.replace(base, backend=dataclasses.replace(base.backend, source=str(repo))))):
        t = time.monotonic()
        rec = pipeline.run(sc, pipeline.Options(results_root=results))
        out["runs"].append({"label": label, "verdict": rec["verdict"], "wall_s": round(time.monotonic() - t, 2),
                            "l1": rec.get("l1", {}).get("start"), "backend_phase_s": rec["phases"].get("backend"),
                            "backend_build_s": rec["phases"].get("backend_build"),
                            "cached": rec.get("backend", {}).get("cached")})
    stock = out["runs"][0]["wall_s"]
    out["summary"] = {r["label"]: {"wall_s": r["wall_s"], "extra_vs_stock_s": round(r["wall_s"] - stock, 2)}
                      for r in out["runs"]}
    print(json.dumps(out, indent=1))
    return 0 if all(r["verdict"] == "PASS" for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
