"""FreeBSD dom0 on the real stack: runs where the media are available, skips
naming what is missing where they are not (LAB_REQUIRE_FREEBSD=1 makes a missing
medium a failure)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lab import freebsd, images, scenario
from lab.run import LabRun, freebsd_version


def test_freebsd_dom0(results: Path) -> None:
    sc = scenario.load("freebsd-dom0")
    version, how = freebsd_version(sc)
    missing = freebsd.missing_media(image_file=sc.freebsd.image or None, packages_dir=sc.freebsd.packages or None,
                                    cache_dir=images.cache_dir() / "freebsd", version=version)
    if missing and os.environ.get("LAB_REQUIRE_FREEBSD") != "1":
        pytest.skip("FreeBSD media missing: " + "; ".join(missing))
    t = time.monotonic()
    rec = LabRun(sc, results_root=results).execute()
    if missing:
        pytest.fail(f"LAB_REQUIRE_FREEBSD=1 and media missing: {rec.get('error')}")
    assert rec["verdict"] == "PASS", rec.get("error") or rec.get("summary")
    del t


def test_missing_media_is_a_fast_clear_error_that_leaves_nothing(results: Path) -> None:
    """Without media the run shall be an ERROR at stage `image` within seconds,
    naming each missing medium and the [freebsd] key that supplies it, with no
    QEMU started and no work directory left."""
    sc = scenario.load("freebsd-dom0")
    version, _ = freebsd_version(sc)
    if not freebsd.missing_media(image_file=None, packages_dir=None, cache_dir=images.cache_dir() / "freebsd",
                                 version=version):
        pytest.skip("FreeBSD media are available here")
    before = set((images.cache_dir() / "runs").glob("run-*"))
    t = time.monotonic()
    rec = LabRun(sc, results_root=results).execute()
    assert time.monotonic() - t < 30
    assert rec["verdict"] == "ERROR" and rec["stage"] == "image" and rec["exit_code"] == 4
    assert "[freebsd] image" in rec["error"] and "[freebsd] packages" in rec["error"]
    assert "qemu" not in rec
    assert set((images.cache_dir() / "runs").glob("run-*")) <= before
