"""A dom0 kernel built from the user's FreeBSD tree (+ patches): hashed first
(an unchanged tree is not rebuilt), built natively in a plain FreeBSD VM booted
from the release's image, installed into a copy of the dom0 image attached to
that VM, with the tree's hash beside the kernel so the booted dom0 can prove
which build it runs (FreeBsdDom0.check_kernel).

Built natively, not cross-built on Linux with tools/build/make.py: the native
build uses the release's own toolchain (the kernel FreeBSD itself would produce,
no second LLVM to keep in step), and installing into the dom0's UFS needs a
FreeBSD kernel anyway (Linux has no dependable UFS2 write support), so the VM is
needed either way.

`kernel_steps` is the one list the run executes and the plan prints."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess as sp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import qemu
from lab.errors import LabError
from lab.platform.freebsd.fetch import file_digest
from lab.platform.freebsd.render import SRC_SERIAL, TARGET_SERIAL, build_script, build_user_data, cidata_argv
from lab.platform.freebsd.steps import (
    NO_RUNNER,
    Dom0Image,
    Step,
    VmJob,
    build_cidata,
    check,
    plan,
    put_built,
    qcow2_check,
)
from lab.platform.freebsd.vm import (
    FREEBSD_KERNEL,
    FREEBSD_LOADER,
    KERNEL_BUILT,
    image_format,
    plan_argv,
    run_vm,
    vm_spec,
)
from lab.runner import Runner


def source_hash(src: Path, patches: Sequence[Path], kernconf: str) -> str:
    """What the kernel is built from: sys/ of the tree (every file's path and
    bytes; for a git tree, HEAD's sys/ tree object plus uncommitted changes there),
    or the src.txz itself, plus the patches and KERNCONF."""
    h = hashlib.sha256(f"kernconf={kernconf}\0".encode())
    if src.is_file():
        h.update(b"txz\0" + file_digest(src, "sha256").encode())
    elif (src / ".git").exists():
        tree = sp.run(["git", "-C", str(src), "rev-parse", "HEAD:sys"], capture_output=True, text=True, timeout=60)
        if tree.returncode != 0:
            raise LabError("backend", f"{src}: not a FreeBSD source tree (git has no sys/ at HEAD)")
        diff = sp.run(["git", "-C", str(src), "diff", "HEAD", "--", "sys"], capture_output=True, timeout=300).stdout
        extra = sp.run(["git", "-C", str(src), "ls-files", "--others", "--exclude-standard", "--", "sys"],
                       capture_output=True, timeout=300).stdout
        h.update(tree.stdout.strip().encode() + b"\0" + diff + b"\0" + extra)
    else:
        if not (src / "sys" / "dev" / "xen" / "blkback" / "blkback.c").is_file():
            raise LabError("backend", f"{src}: expected a FreeBSD source tree with sys/dev/xen/blkback/blkback.c, "
                           "or the release's src.txz")
        for p in sorted((src / "sys").rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    for p in patches:
        if not p.is_file():
            raise LabError("backend", f"[freebsd] patches: {p} is not a file")
        h.update(b"patch\0" + p.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelBuild:
    """One kernel build's inputs and paths (the plan's are placeholders)."""

    img: Dom0Image  # the provisioned dom0 image the kernel is installed into (a copy of)
    src: Path  # a FreeBSD source tree, or the release's src.txz
    patches: Sequence[Path]
    kernconf: str
    kid: str  # source_hash: the id written beside the kernel
    base: Path  # the release image the builder VM boots
    work: Path  # the work directory: lab.cache.aside of the entry
    timeout: float  # the build's deadline ([freebsd] build_timeout)


def kernel_steps(k: KernelBuild, job: VmJob) -> list[Step]:
    w, txz = k.work, k.src.is_file()
    tarball = w / ("src.txz" if txz else "src.tar")
    builder, target, iso, out = w / "builder.qcow2", w / "target.qcow2", w / "cidata.iso", w / "dom0.qcow2"
    names = [f"{i:04d}-{p.name}" for i, p in enumerate(k.patches)]
    script = build_script(patches=[str(p) for p in k.patches], kernconf=k.kernconf, ident=k.kid,
                          src_root="/" if txz else "/usr/src")
    spec = vm_spec([qemu.Drive(builder, "lab-root"), qemu.Drive(tarball, SRC_SERIAL, "raw", True),
                    qemu.Drive(target, TARGET_SERIAL), qemu.Drive(iso, "lab-cidata", "raw", True)],
                   console_log=job.results / "console-freebsd-build.log", qmp_sock=None,
                   accel=job.accel, cpus=job.cpus, memory_mib=4096, ssh_port=None)
    milestones = [(FREEBSD_LOADER, job.loader_timeout), (FREEBSD_KERNEL, 300.0), (KERNEL_BUILT, k.timeout)]
    tar = ["tar", "-C", str(k.src), "--exclude=.git", "-cf", str(tarball), "."]
    state: dict[str, Any] = {"t0": time.monotonic()}

    def source() -> None:
        w.mkdir(parents=True)
        if txz:
            # src.txz as a raw disk: padded with zeros to whole sectors (QEMU
            # drops a partial last sector; xz reads zeros as stream padding)
            shutil.copyfile(k.src, tarball)
            with open(tarball, "ab") as f:
                f.write(b"\0" * (-tarball.stat().st_size % 512))
        else:
            check(job.runner, tar, "backend", timeout=1800)

    def cidata() -> None:
        build_cidata(w / "cidata", iso, job.runner, user_data=build_user_data(script), instance_id=f"lab-build-{k.kid}",
                     files=[(p, f"patches/{n}") for p, n in zip(k.patches, names, strict=True)])

    def build() -> None:
        state["milestones"] = run_vm("kernel-build", spec, job.results, milestones, stage="backend")

    def manifest() -> None:
        from lab.backend import source_commit

        (w / "manifest.json").write_text(json.dumps(
            {**k.img.manifest, "kernel_id": k.kid, "src": str(k.src),
             "commit": source_commit(k.src) if k.src.is_dir() else None, "patches": [str(p) for p in k.patches],
             "kernconf": k.kernconf, "built_in_s": round(time.monotonic() - state["t0"], 1),
             "build_milestones": state.get("milestones")}, indent=1) + "\n")
        for f in (builder, target, iso, tarball):
            f.unlink(missing_ok=True)

    return [
        Step("source", "the source tree as a raw disk holding one tar stream (no network, no UFS tools on L0); "
             "hashed (sys/ + patches + KERNCONF) first: an unchanged tree is not rebuilt",
             {"command": ["cp", str(k.src), str(tarball), "(then zero-padded to whole 512-byte sectors)"] if txz
              else tar}, source),
        Step("kernel-cidata", "the build's config disk: the build script as a #!/bin/sh user-data, the patches "
             "under patches/",
             {"command": cidata_argv(w / "cidata", iso)},
             cidata),
        Step("builder-overlay", "the builder VM's disk: an overlay on the release image, grown to 40G",
             {"command": ["qemu-img", "create", "-q", "-f", "qcow2", "-F", image_format(k.base), "-b", str(k.base),
                          str(builder)],
              "then": ["qemu-img", "resize", "-q", str(builder), "40G"]}),
        Step("target-overlay", "the kernel's destination: an overlay on the provisioned dom0 image",
             {"command": ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(k.img.path),
                          str(target)]}),
        Step("build", "boot a plain FreeBSD VM from the release image (no NIC): unpack, patch, make "
             "kernel-toolchain + buildkernel, installkernel DESTDIR= into the dom0 overlay, write the tree hash to "
             "/boot/kernel/xen-blklab.id, power off",
             {"command": plan_argv(spec), "script": script, "patches": [str(p) for p in k.patches],
              "milestones": [m.what for m, _ in milestones] + ["QEMU to exit (poweroff)"],
              "fails_on": "lab-build: FATAL: ..."}, build),
        Step("kernel-flatten", "the dom0 image with the built kernel, read-only, cached by the tree hash",
             {"command": ["qemu-img", "convert", "-O", "qcow2", str(target), str(out)],
              "then": ["chmod", "0444", str(out)]}, timeout=1800),
        Step("kernel-manifest", "write manifest.json (the dom0 image's, plus the tree, commit, patches, KERNCONF "
             "and build times); remove the work disks", {"output": str(w / "manifest.json")}, manifest),
        qcow2_check(job.runner, out, "backend", name="kernel-check"),
    ]


def ensure_kernel(img: Dom0Image, src: Path, patches: list[Path], *, base: Path, kernconf: str, accel: str,
                  cpus: int, runner: Runner, results: Path, cache: Path, timeout: float,
                  loader_timeout: float = 120) -> Dom0Image:
    """The dom0 image with a kernel built from `src` + `patches`, cached by
    source_hash under `cache`/dom0 (lab.cache: built aside, verified, renamed)."""
    if not src.exists():
        raise LabError("backend", f"[freebsd] src: {src} does not exist (a FreeBSD source tree or src.txz)")
    kid = source_hash(src, patches, kernconf)
    job = VmJob(accel, cpus, runner, results, loader_timeout)
    final = put_built(cache / "dom0" / f"{img.key}-k{kid}", lambda work: kernel_steps(
        KernelBuild(img, src, patches, kernconf, kid, base, work, timeout), job), runner=runner, stage="backend")
    manifest = json.loads((final / "manifest.json").read_text())
    return Dom0Image(final / "dom0.qcow2", f"{img.key}-k{kid}", img.version, kid, manifest)


def kernel_plan(*, src: str, patches: Sequence[str], base: str, kernconf: str = "GENERIC", accel: str = "tcg",
                cpus: int = 2) -> list[dict[str, Any]]:
    """The kernel build's steps as the plan prints them (`{key}`: the provisioned
    image's hash, `{hash}`: the tree's)."""
    dom0dir = "$CACHE/freebsd/dom0"
    img = Dom0Image(Path(f"{dom0dir}/{{key}}/dom0.qcow2"), "{key}", "", None, {})
    k = KernelBuild(img, Path(src), [Path(p) for p in patches], kernconf, "{hash}",
                    Path(base),
                    Path(f"{dom0dir}/.{{key}}-k{{hash}}.building-{{pid}}-{{token}}"), 8 * 3600)
    return plan(kernel_steps(k, VmJob(accel, cpus, NO_RUNNER, Path("$RUN"))))
