"""Patched backends and `lab bisect` on the real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from blkback_series import make_series  # noqa: E402

from lab import (  # noqa: E402
    bisect,
    images,
)
from lab.backend import pristine_tree  # noqa: E402
from lab.pytest_plugin import LabRun  # noqa: E402


def _pristine() -> Path:
    m = images.ensure_image("linux-dom0").manifest
    return pristine_tree(m["packages"][f"linux-image-{m['kernel_abi']}"])


def test_bisect_names_the_commit_that_broke_io(results: Path, tmp_path: Path) -> None:
    """A three-commit series on Debian's pristine xen-blkback, the middle commit
    leaking requests freed into an exhausted pool: `lab bisect` over
    ring-saturation shall name exactly that commit, confirmed (--runs 1), and
    leave the repository as it was."""
    repo = tmp_path / "blkback"
    shas = make_series(repo, _pristine(), bad_at=2, total=3)
    res = bisect.bisect("ring-saturation", repo, shas[0], shas[-1], runs=1, results_root=results)
    print("\n".join(bisect.summary_lines(res)))
    assert res["first_bad"] == shas[2], json.dumps(res, indent=1)
    assert res["confirm"]["first_bad_runs"] == ["HANG"] and res["confirm"]["parent_runs"] == ["PASS"]
    saved = json.loads((Path(res["results_dir"]) / "bisect.json").read_text())
    assert saved["first_bad"] == shas[2] and saved["steps"] and saved["total_s"] > 0
    for step in saved["steps"]:
        rec = json.loads(Path(step["record"]).read_text())
        assert rec["backend"]["kind"] == "built" and rec["backend"]["commit"] == step["commit"]
        assert rec["backend"]["loaded"]["build_id"] == rec["backend"]["build_id"]
    # the repository is as it was: on main at its tip, no bisection in progress
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == shas[-1]
    assert not (repo / ".git" / "BISECT_LOG").exists()


@pytest.mark.nightly
def test_bad_commit_hangs_only_under_saturation_and_others_pass(results: Path, tmp_path: Path,
                                                                  lab_run: LabRun) -> None:
    """The full demonstration: five commits, the third bad. Every commit under
    ring-saturation and light: the bad one HANGs under saturation (oo_req climbing)
    and PASSes light; every other commit PASSes both. Then `lab bisect --runs 2`."""
    repo = tmp_path / "blkback"
    shas = make_series(repo, _pristine(), bad_at=3, total=5)
    table = {}
    for i, sha in enumerate(shas):
        subprocess.run(["git", "-C", str(repo), "checkout", "-q", sha], check=True)
        for name in ("ring-saturation", "light"):
            rec = lab_run(name, backend=str(repo))
            table[(i, name)] = (rec["verdict"], [w.get("oo_req") for w in rec.get("workloads", [])])
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "main"], check=True)
    print(json.dumps({f"{i}:{n}": v for (i, n), v in table.items()}, indent=1))
    for i in range(len(shas)):
        assert table[(i, "light")][0] == "PASS"
        assert table[(i, "ring-saturation")][0] == ("HANG" if i >= 3 else "PASS"), table
    res = bisect.bisect("ring-saturation", repo, shas[0], shas[-1], runs=2, results_root=results)
    print("\n".join(bisect.summary_lines(res)))
    assert res["first_bad"] == shas[3]
