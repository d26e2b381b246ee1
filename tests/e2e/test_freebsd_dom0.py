"""FreeBSD dom0 on the real stack: runs where the media are available, skips
naming what is missing where they are not (LAB_REQUIRE_FREEBSD=1 makes a missing
medium a failure)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lab import images, scenario
from lab.platform.freebsd import kernel
from lab.platform.freebsd.kernel import ensure_kernel
from lab.platform.freebsd.media import freebsd_version, missing_media
from lab.platform.freebsd.provision import Dom0Image
from lab.pytest_plugin import LabRun

# These share the FreeBSD cache directory and look for their own provisioning VM
# among the host's processes; under xdist, `--dist loadfile` keeps them on one worker.


def _runs_dirs() -> set[Path]:
    """Work directories in the lab's runs directory but those of other processes'
    labs (other xdist workers', someone's `lab run`): a run's owner.json names it."""
    import json

    mine = set()
    for d in (images.cache_dir() / "runs").glob("run-*"):
        try:
            pid = json.loads((d / "owner.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = os.getpid()  # no owner yet: counted, so a leak is never missed
        if pid == os.getpid():
            mine.add(d)
    return mine


def test_freebsd_dom0(lab_run: LabRun) -> None:
    sc = scenario.load("freebsd-dom0")
    version, how = freebsd_version(sc)
    missing = missing_media(image_file=sc.freebsd.image or None, packages_dir=sc.freebsd.packages or None,
                            cache_dir=images.cache_dir(), version=version)
    if missing and os.environ.get("LAB_REQUIRE_FREEBSD") != "1":
        pytest.skip("FreeBSD media missing: " + "; ".join(missing))
    t = time.monotonic()
    rec = lab_run(sc)
    if missing:
        pytest.fail(f"LAB_REQUIRE_FREEBSD=1 and media missing: {rec.get('error')}")
    assert rec["verdict"] == "PASS", rec.get("error") or rec.get("summary")
    del t


def test_missing_media_is_a_fast_clear_error_that_leaves_nothing(lab_run: LabRun) -> None:
    """Without media the run shall be an ERROR at stage `image` within seconds,
    naming each missing medium and the [freebsd] key that supplies it, with no
    QEMU started and no work directory left."""
    sc = scenario.load("freebsd-dom0")
    version, _ = freebsd_version(sc)
    if not missing_media(image_file=None, packages_dir=None, cache_dir=images.cache_dir(), version=version):
        pytest.skip("FreeBSD media are available here")
    before = _runs_dirs()
    t = time.monotonic()
    rec = lab_run(sc)
    assert time.monotonic() - t < 30
    assert rec["verdict"] == "ERROR" and rec["stage"] == "image" and rec["exit_code"] == 4
    assert "[freebsd] image" in rec["error"] and "[freebsd] packages" in rec["error"]
    assert "qemu" not in rec
    assert _runs_dirs() <= before


def _stand_in_release(d: Path) -> Path:
    """A release directory shaped like the publisher's: CHECKSUM.SHA512 and the
    image it names, with its real sha512, but the image is a blank disk (no FreeBSD
    media can be had here): everything up to the first FreeBSD milestone is real."""
    import hashlib
    import subprocess

    d.mkdir()
    name = "FreeBSD-14.3-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / name), "64M"], check=True)
    subprocess.run(["xz", "-0", str(d / name)], check=True)
    digest = hashlib.sha512((d / f"{name}.xz").read_bytes()).hexdigest()
    (d / "CHECKSUM.SHA512").write_text(f"SHA512 ({name}.xz) = {digest}\n")
    return d / f"{name}.xz"


def test_provisioning_runs_for_real_up_to_the_missing_loader(lab_run: LabRun, tmp_path: Path) -> None:
    """With stand-in media (a blank disk as the image, the constructed package
    repository of tests/data with real checksums) a FreeBSD-dom0 run does every
    real step it can here: verify and unpack the image into the cache, resolve and
    verify the packages, make the cidata ISO, boot the provisioning VM offline
    under QEMU. There it must stop with an ERROR at stage `image` that names the
    milestone it waited for (FreeBSD's loader), the ones reached (none) and the
    console, within the loader's deadline, and leave no QEMU, overlay or
    half-made image behind; the user's files stay untouched."""
    import dataclasses
    import subprocess

    img = _stand_in_release(tmp_path / "release")
    before = {p: p.stat().st_mtime_ns for p in img.parent.iterdir()}
    repo = Path(__file__).parents[1] / "data" / "freebsd" / "repo"
    sc = scenario.load("freebsd-dom0")
    sc = dataclasses.replace(
        sc, freebsd=dataclasses.replace(sc.freebsd, version="14.3", image=str(img), packages=str(repo)),
        deadlines=dataclasses.replace(sc.deadlines, xen_banner=scenario.Duration(15)))
    cache = images.cache_dir() / "freebsd"
    runs_before = _runs_dirs()
    unpacked = cache / "14.3-amd64" / img.with_suffix("").name
    t = time.monotonic()
    try:
        rec = lab_run(sc, accel="tcg")
        took = time.monotonic() - t
        assert unpacked.is_file() and unpacked.stat().st_mode & 0o222 == 0  # unpacked read-only into the cache
    finally:
        # a blank disk must not stay in the cache under a real release's name
        for p in (unpacked, unpacked.with_name(unpacked.name + ".from")):
            p.unlink(missing_ok=True)
    print(rec.get("error"), f"({took:.1f}s)")
    assert rec["verdict"] == "ERROR" and rec["stage"] == "image", rec
    assert "FreeBSD provision VM" in rec["error"] and "FreeBSD's loader" in rec["error"]
    assert "milestones reached: none" in rec["error"] and "console stayed empty" in rec["error"]
    assert (Path(rec["results_dir"]) / "qemu-provision-argv.json").exists()
    assert took < 120
    assert (Path(rec["results_dir"]) / "console-freebsd-provision.log").exists()
    argv = (Path(rec["results_dir"]) / "commands.log").read_text()
    assert "genisoimage" in argv
    # nothing left: no QEMU of this run, no half-made dom0 image, no work directory
    # (lab.cache's lock files stay, empty: removing one another process waits on would let two builders in)
    left = list(cache.glob("dom0/.*"))
    assert not [p for p in left if not p.name.endswith(".lock")] and not list(cache.glob("dom0/*/dom0.qcow2"))
    assert all(p.stat().st_size == 0 for p in left)
    assert _runs_dirs() <= runs_before
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps and "provision.qcow2" not in ps
    assert {p: p.stat().st_mtime_ns for p in img.parent.iterdir()} == before


def test_kernel_build_runs_for_real_up_to_the_missing_loader(results: Path, tmp_path: Path) -> None:
    """The kernel-build path with stand-ins (blank disks as the release image and
    the provisioned dom0 image, a two-file `sys/` tree and a patch): hash the tree,
    tar it onto a raw disk, make the config disk with the patch, overlays for the
    builder and the target, boot the builder VM offline. It must stop with an ERROR
    at stage `backend` naming the loader it did not see, and leave nothing behind
    in its cache but what was there."""
    import subprocess

    from lab.errors import LabError
    from lab.runner import CommandLog, LocalRunner

    out = results / "freebsd-kernel-build" / time.strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True)
    cache = tmp_path / "cache"
    (cache / "dom0").mkdir(parents=True)
    base, dom0_img = tmp_path / "release.qcow2", tmp_path / "dom0.qcow2"
    for p in (base, dom0_img):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M"], check=True)
    src = tmp_path / "src"
    (src / "sys/dev/xen/blkback").mkdir(parents=True)
    (src / "sys/dev/xen/blkback/blkback.c").write_text("/* stand-in */\n")
    (src / "sys/conf").mkdir()
    (src / "sys/conf/newvers.sh").write_text("# stand-in\n")
    patch = tmp_path / "revert-2014.patch"
    patch.write_text("--- a/sys/dev/xen/blkback/blkback.c\n+++ b/sys/dev/xen/blkback/blkback.c\n")
    img = Dom0Image(dom0_img, "standin", "14.3", None, {"image": "stand-in"})
    runner = LocalRunner(CommandLog(out / "commands.log"))
    t = time.monotonic()
    with pytest.raises(LabError) as e:
        ensure_kernel(img, src, [patch], base=base, kernconf="GENERIC", accel="tcg", cpus=2,
                      runner=runner, results=out, cache=cache, timeout=600, loader_timeout=15)
    took = time.monotonic() - t
    print(e.value.message, f"({took:.1f}s)")
    assert e.value.stage == "backend" and "FreeBSD kernel-build VM" in e.value.message
    assert "FreeBSD's loader" in e.value.message and "milestones reached: none" in e.value.message
    assert took < 120
    argv = " ".join(__import__("json").loads((out / "qemu-kernel-build-argv.json").read_text()))
    assert "serial=lab-src" in argv and "serial=lab-dom0" in argv and "serial=lab-cidata" in argv
    assert "-netdev" not in argv and "-qmp" not in argv and "bootindex=0" in argv
    log = (out / "commands.log").read_text()
    assert '"tar", "-C"' in log and "--exclude=.git" in log and "genisoimage" in log and '"40G"' in log
    # no work directory, no half-made image: only lab.cache's empty lock file of the entry
    left = sorted((cache / "dom0").iterdir())
    assert [p.name for p in left] == [f".standin-k{kernel.source_hash(src, [patch], 'GENERIC')}.lock"]
    assert left[0].stat().st_size == 0
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
