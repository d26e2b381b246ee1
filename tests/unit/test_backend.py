"""The backend builder's pure parts and the bisect step mapping."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lab import backend, bisect
from lab.errors import LabError


def test_build_id_shall_match_readelf() -> None:
    elf = Path("/bin/true").read_bytes()
    out = subprocess.run(["readelf", "-n", "/bin/true"], capture_output=True, text=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    if not m:
        pytest.skip("/bin/true has no build-id note here")
    assert backend.elf_build_id(elf) == m.group(1)


def test_build_id_of_a_non_elf_is_none() -> None:
    assert backend.elf_build_id(b"#!/bin/sh\n") is None


def _tree(tmp: Path, blkback: str = "int x;") -> Path:
    d = tmp / "src" / backend.DRIVER_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "blkback.c").write_text(blkback)
    (d / "xenbus.c").write_text("int y;")
    (d / "common.h").write_text("#define Z 1")
    return tmp / "src"


def test_tree_hash_follows_the_source_and_the_patches(tmp_path: Path) -> None:
    b = backend.LinuxBackendBuilder("6.1.0-0-test")
    src = _tree(tmp_path)
    h0 = b.tree_hash(src, [])
    assert b.tree_hash(src, []) == h0
    patch = tmp_path / "p.patch"
    patch.write_text("--- a\n+++ b\n")
    assert b.tree_hash(src, [patch]) != h0
    _tree(tmp_path, "int x = 1;")
    assert b.tree_hash(src, []) != h0
    assert backend.LinuxBackendBuilder("6.1.0-1-test").tree_hash(src, []) != b.tree_hash(src, [])


def test_a_tree_without_the_driver_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(LabError) as e:
        backend.LinuxBackendBuilder("x").tree_hash(tmp_path, [])
    assert e.value.stage == "backend" and "xen-blkback" in str(e.value)


@pytest.mark.parametrize("rec,code", [
    ({"verdict": "PASS"}, 0),
    ({"verdict": "FAIL"}, 1),
    ({"verdict": "HANG"}, 1),
    ({"verdict": "CRASH"}, 1),
    ({"verdict": "HANG", "bisect_code": 125}, 125),  # L1 unresponsive
    ({"verdict": "ERROR", "stage": "guest:create"}, 125),
    ({"verdict": "ERROR", "stage": "backend"}, 125),
    ({"verdict": "ERROR", "stage": "boot:dom0"}, bisect.ABORT),  # cannot boot: stop the bisection
    ({"verdict": "ERROR", "stage": "image"}, bisect.ABORT),
])
def test_step_codes_shall_never_blame_a_commit_for_a_lab_failure(rec: dict, code: int) -> None:
    assert bisect.step_code(rec) == code
