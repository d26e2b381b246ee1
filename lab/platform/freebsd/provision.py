"""The provisioned FreeBSD dom0 image: the release's VM image booted once under
QEMU, offline (no NIC), with a config disk from which nuageinit installs the
packages and writes loader.conf, sshd's and root's keys; then flattened into a
read-only qcow2 cached by the hash of everything that went into it.

`provision_steps` is the one list the run executes and the plan prints."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import qemu
from lab.platform.freebsd.fetch import Fetcher, progress_logger
from lab.platform.freebsd.kernel import ensure_kernel
from lab.platform.freebsd.media import decompress_image, get_image, image_cache_sub
from lab.platform.freebsd.packages import Pkg, fetch_packages, get_catalogue, package_order
from lab.platform.freebsd.render import (
    CIDATA_PACKAGES,
    cidata_argv,
    render_loader_conf,
    render_user_data,
)
from lab.platform.freebsd.steps import (
    NO_RUNNER,
    Dom0Image,
    Step,
    VmJob,
    build_cidata,
    plan,
    put_built,
    qcow2_check,
)
from lab.platform.freebsd.vm import (
    FREEBSD_KERNEL,
    FREEBSD_LOADER,
    PROVISIONED,
    image_format,
    plan_argv,
    run_vm,
    vm_spec,
)

if TYPE_CHECKING:
    from lab import scenario
    from lab.images import Keys

PROVISION_FORMAT = 2  # bump when the provisioning changes in a way the inputs do not show


@dataclass(frozen=True)
class Provision:
    """One provisioning's inputs and paths (the plan's are placeholders)."""

    base: Path  # the unpacked release image, read-only
    work: Path  # the work directory: lab.cache.aside of the entry
    timeout: float  # the provisioning script's deadline ([freebsd] provision_timeout)
    user_data: str = ""
    instance_id: str = "lab-provision-{key}"
    pkgs: Sequence[tuple[Pkg, Path]] = ()
    inputs: dict[str, Any] = field(default_factory=dict)  # what the key hashes, into the manifest
    base_fmt: str = ""  # "" = from the base's name


def provision_steps(p: Provision, job: VmJob) -> list[Step]:
    w = p.work
    disk, iso, out = w / "provision.qcow2", w / "cidata.iso", w / "dom0.qcow2"
    spec = vm_spec([qemu.Drive(disk, "lab-root"), qemu.Drive(iso, "lab-cidata", "raw", True)],
                   console_log=job.results / "console-freebsd-provision.log", qmp_sock=None,
                   accel=job.accel, cpus=job.cpus, memory_mib=3072, ssh_port=None)
    milestones = [(FREEBSD_LOADER, job.loader_timeout), (FREEBSD_KERNEL, 300.0), (PROVISIONED, p.timeout)]
    state: dict[str, Any] = {"t0": time.monotonic()}

    def cidata() -> None:
        build_cidata(w / "cidata", iso, job.runner, user_data=p.user_data, instance_id=p.instance_id,
                     files=[(path, f"{CIDATA_PACKAGES}/{pkg.filename}") for pkg, path in p.pkgs],
                     texts={f"{CIDATA_PACKAGES}/ORDER": package_order([pkg for pkg, _ in p.pkgs])})

    def provision() -> None:
        state["milestones"] = run_vm("provision", spec, job.results, milestones, stage="image")

    def manifest() -> None:
        (w / "manifest.json").write_text(json.dumps(
            {**p.inputs, "base": str(p.base), "provisioned_in_s": round(time.monotonic() - state["t0"], 1),
             "milestones": state.get("milestones")}, indent=1) + "\n")
        for f in (disk, iso):
            f.unlink(missing_ok=True)

    return [
        Step("cidata", "make the config disk: user-data, meta-data, packages/ with ORDER",
             {"command": cidata_argv(w / "cidata", iso),
              "why": "nuageinit finds /dev/iso9660/cidata; label case kept; no size to guess (see cidata_argv)"},
             cidata),
        Step("overlay", "a writable overlay on the read-only base for provisioning, grown (growfs runs on first boot)",
             {"command": ["qemu-img", "create", "-q", "-f", "qcow2", "-F", p.base_fmt or image_format(p.base),
                          "-b", str(p.base), str(disk)],
              "then": ["qemu-img", "resize", "-q", str(disk), "16G"]}),
        Step("provision", "boot the image under QEMU without Xen and without a NIC; nuageinit runs the lab's "
             "#!/bin/sh user-data: it writes loader.conf, /boot.config (-h), keys and sshd_config, installs the "
             "packages offline from the config disk, disarms the first boot (removes /firstboot and nuageinit's "
             "cached user_data/runcmds, nuageinit_enable=NO), then powers off",
             {"command": plan_argv(spec), "milestones": [m.what for m, _ in milestones] + ["QEMU to exit (poweroff)"],
              "fails_on": "lab-provision: FATAL: ..."}, provision),
        Step("flatten", "the provisioned dom0 image, read-only, cached by the hash of its inputs (image, packages, "
             "rendered user-data)",
             {"command": ["qemu-img", "convert", "-O", "qcow2", str(disk), str(out)],
              "then": ["chmod", "0444", str(out)]}, timeout=1800),
        Step("manifest", "write manifest.json (the inputs, the milestones' times); remove the overlay and the "
             "config disk", {"output": str(w / "manifest.json")}, manifest),
        qcow2_check(job.runner, out, "image"),
    ]


def ensure_dom0_image(sc: scenario.Scenario, *, version: str, job: VmJob, keys: Keys, cache: Path,
                      fetcher: Fetcher | None = None) -> Dom0Image:
    """The provisioned dom0 base image (and, with [freebsd] src, the one with the
    kernel built from it), from the cache (`cache`: the FreeBSD cache directory)
    or made now. Media come from the scenario's [freebsd] paths or the publisher's
    URLs (L0 only: the VMs are offline)."""
    cfg, arch = sc.freebsd, "amd64"
    fetcher = fetcher or Fetcher(cache.parent, progress=progress_logger("download"))
    xz = get_image(fetcher, version=version, arch=arch, source=cfg.image or None)
    base = decompress_image(xz, out_dir=cache.parent / image_cache_sub(version, arch))
    catalogue = get_catalogue(fetcher, version=version, arch=arch, source=cfg.packages or None)
    pkgs = fetch_packages(fetcher, catalogue)
    user_data = render_user_data(
        authorized_key=keys.public(keys.client), host_key_private=keys.host("dom0").read_text(),
        host_key_public=keys.public(keys.host("dom0")), packages_dir=CIDATA_PACKAGES,
        loader_conf=render_loader_conf(dom0_mem_mb=sc.dom0.memory.mib, dom0_vcpus=sc.lab.cpus, iommu=False))
    inputs = {"format": PROVISION_FORMAT, "version": version, "image": xz.name, "image_size": xz.stat().st_size,
              "packages": sorted(f"{p.name}-{p.version}:{p.sha256}" for p, _ in pkgs),
              "user_data": hashlib.sha256(user_data.encode()).hexdigest(), "catalogue": catalogue.trust}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    final = put_built(cache / "dom0" / key, lambda work: provision_steps(Provision(
        base, work, float(cfg.provision_timeout), user_data, f"lab-provision-{key}", pkgs, inputs), job),
        runner=job.runner, stage="image")
    manifest = json.loads((final / "manifest.json").read_text())
    img = Dom0Image(final / "dom0.qcow2", key, version, None, manifest)
    if cfg.src:
        img = ensure_kernel(img, Path(cfg.src).expanduser(), [Path(p).expanduser() for p in cfg.patches],
                            base=base, kernconf=cfg.kernconf, accel=job.accel, cpus=job.cpus, runner=job.runner,
                            results=job.results, cache=cache, loader_timeout=job.loader_timeout,
                            timeout=float(cfg.build_timeout))
    return img


def plan_base(version: str, arch: str) -> str:
    """The plan's name for the unpacked release image."""
    return f"$CACHE/{image_cache_sub(version, arch)}/{{name without .xz}}"


def provision_plan(*, version: str, arch: str, accel: str = "tcg", cpus: int = 2) -> list[dict[str, Any]]:
    """The provisioning's steps as the plan prints them: `{key}` is the hash of
    the inputs, the work directory lab.cache's `.{key}.building-{pid}-{token}`."""
    dom0dir = "$CACHE/freebsd/dom0"
    p = Provision(base=Path(plan_base(version, arch)),
                  work=Path(f"{dom0dir}/.{{key}}.building-{{pid}}-{{token}}"), timeout=3600,
                  base_fmt="{qcow2 or raw}")
    return plan(provision_steps(p, VmJob(accel, cpus, NO_RUNNER, Path("$RUN"))))
