"""FreeBSD as the dom0: a PVH dom0 whose own loader boots Xen (`xen_kernel` in
/boot/loader.conf); the backend under test, blkback (`xbbd`), is built into the
kernel (facts/freebsd-dom0.md). The platform's modules, by job:

- fetch: resumable, verified downloads into the cache (only from given URLs);
- media: the release, CHECKSUM files, the VM image (picked, fetched, unpacked),
  what is missing on this machine and how to supply it;
- packages: the release's package catalogue, dependencies, the .pkg files;
- render: loader.conf, nuageinit's user-data and scripts, the build script;
- steps: the step list the run executes and `--plan` prints, the config disk;
- provision / kernel: the provisioned dom0 image and the kernel built from the
  user's tree, each cached through lab.cache;
- vm: the VMs' QEMU spec, console milestones, the nested-KVM check;
- xbbd: blkback's sysctl counters, the sampler script and the verdict rules;
- dom0: FreeBsdDom0, the ops inside the running dom0 (gnop, diskinfo, sysctl).

Nothing here has run against real FreeBSD media yet (the development machines
cannot reach download.freebsd.org): the parts marked "unverified" are derived
from FreeBSD's sources and documentation and must be confirmed on a first run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import LabError
from lab.platform import BackendCtx, BootStep, Media, Rules
from lab.platform.freebsd.dom0 import FreeBsdDom0
from lab.platform.freebsd.kernel import kernel_plan
from lab.platform.freebsd.media import check_version, freebsd_version, media_or_error, media_plan
from lab.platform.freebsd.provision import Dom0Image, VmJob, ensure_dom0_image, plan_base, provision_plan
from lab.platform.freebsd.vm import boot_plan, dom0_boot_limits, nested_kvm_problem
from lab.platform.freebsd.vm import vm_spec as freebsd_vm_spec
from lab.platform.freebsd.xbbd import final_rules, live_rules, sample_plan

if TYPE_CHECKING:
    from lab import qemu, scenario
    from lab.runner import LocalRunner, Runner
    from lab.watchdog import Track


def plan_steps(*, version: str, arch: str, image_file: str | None, packages_dir: str | None, src: str | None,
               patches: Sequence[str], kernconf: str = "GENERIC", cpus: int = 2,
               memory_mib: int = 2048) -> list[dict[str, Any]]:
    """Every download, build and boot step of a FreeBSD-dom0 lab, with its exact
    URL or command, in order: the media steps, then the provisioning's and the
    kernel build's own step lists (the ones the run executes), the boot and the
    sampler. Paths are under the cache (`$CACHE` = images.cache_dir()) or the
    run's directory (`$RUN`); `{name}` is the image CHECKSUM.SHA512 names at run
    time (pick_vm_image), never a fixed name."""
    steps = media_plan(version=version, arch=arch, image_file=image_file, packages_dir=packages_dir)
    steps += provision_plan(version=version, arch=arch, cpus=cpus)
    if src:
        steps += kernel_plan(src=src, patches=patches, base=plan_base(version, arch), kernconf=kernconf, cpus=cpus)
    else:
        steps.append({"step": "kernel", "what": "the release's GENERIC kernel (blkback is built in): no build"})
    steps.append(boot_plan(cpus=cpus, memory_mib=memory_mib))
    steps.append(sample_plan())
    return steps


def choose_accel(requested: str) -> tuple[str, str]:
    """(accel, why). No probe VM: the probe boots the Linux dom0's Xen; a PVH dom0
    needs nested VMX/SVM, which the host states in a module parameter."""
    if requested != "auto":
        return requested, f"requested ({requested})"
    from lab import qemu

    why = qemu.kvm_usable_quick() or nested_kvm_problem()
    return ("tcg", f"TCG: {why}") if why else ("kvm", "KVM with nested virtualisation enabled")


class FreeBsdPlatform:
    """Dom0Platform for FreeBSD. Always a cold boot: no saved L1 states yet, and
    QEMU boots the disk (the loader starts Xen), not Xen with -kernel."""

    os = "freebsd"
    warm_start = False
    vif_script: str | None = None  # FreeBSD's own vif-bridge
    direct_boot = False

    def media(self, sc: scenario.Scenario, *, l0: LocalRunner, results: Path, work: Path, accel: str) -> Media:
        """Media (or LabError("image") naming what is missing), the Linux guest
        image and keys, the accelerator, the provisioned dom0 image and the kernel
        built from [freebsd] src when there is one (Media.private: the Dom0Image)."""
        from lab import images

        version, how = media_or_error(sc, cache_dir=images.cache_dir())
        guest = images.ensure_image("linux-guest", runner=l0)
        keys = images.ensure_keys()
        accel, why = choose_accel(accel)
        t = time.monotonic()
        job = VmJob(accel, sc.lab.cpus, l0, results, float(sc.deadlines.xen_banner))
        img = ensure_dom0_image(sc, version=version, job=job, keys=keys, cache=images.cache_dir() / "freebsd")
        m = img.manifest
        record = {"dom0": str(img.path), "guest": str(guest.dir), "freebsd_version": version, "version_chosen": how,
                  "base_image": m.get("image"), "packages": m.get("packages"),
                  "package_catalogue": m.get("catalogue"), "kernel_id": img.kernel_id,
                  "freebsd_image_s": round(time.monotonic() - t, 2)}
        return Media(dom0_root=(img.path, "qcow2"), guest=guest, keys=keys, record=record, accel=accel,
                     accel_reason=why, private=img)

    def vm_spec(self, sc: scenario.Scenario, media: Media, *, accel: str, drives: list[qemu.Drive],
                console_log: Path, qmp_sock: Path | None, ssh_port: int, extra: Sequence[str] = ()) -> qemu.VmSpec:
        if accel == "kvm":
            problem = nested_kvm_problem()
            if problem:
                raise LabError("boot:qemu", problem)
        return freebsd_vm_spec(drives, console_log=console_log, qmp_sock=qmp_sock, accel=accel, cpus=sc.lab.cpus,
                               memory_mib=sc.lab.memory.mib, ssh_port=ssh_port, cpu_model=sc.lab.cpu_model,
                               extra=extra)

    def boot_steps(self, sc: scenario.Scenario) -> list[BootStep]:
        """FreeBSD's loader, Xen's banner, Xen building the PVH dom0, FreeBSD's
        banner, dom0 ready: a PVH dom0 under TCG is new ground (docs/freebsd.md),
        so each is its own milestone with its own deadline."""
        return [BootStep(m.what, m, seconds) for m, seconds in dom0_boot_limits(sc.deadlines)]

    def ops(self, runner: Runner, *, timeout: float) -> FreeBsdDom0:
        return FreeBsdDom0(runner, timeout=timeout)

    def install_backend(self, ctx: BackendCtx) -> dict[str, Any]:
        """The kernel is the backend, built into the dom0 image: prove the dom0
        booted the one built (or the release's), else LabError("backend")."""
        img, ops = ctx.media.private, ctx.ops
        if not isinstance(img, Dom0Image) or not isinstance(ops, FreeBsdDom0):
            raise LabError("backend", "a FreeBSD dom0 needs the media and ops of FreeBsdPlatform")
        kid, m = img.kernel_id, img.manifest
        rec: dict[str, Any] = {"kind": "built" if kid else "stock", "os": "freebsd", "tree_hash": kid,
                               "commit": m.get("commit"), "patches": m.get("patches", []),
                               "kernconf": m.get("kernconf")}
        rec["loaded"] = ops.check_kernel(kid)
        return rec

    def rules(self, sc: scenario.Scenario, tracks: Sequence[Track], *, final: bool) -> Rules:
        """Live: a HANG when responses stay queued and are never pushed. Final:
        FAIL on errors completed by blkback, in flight above max_requests, and
        (if asked) request shortages; the per-disk report as record["xbbd"]."""
        window = float(sc.watchdog.stall_window)
        if final:
            return final_rules(tracks, stall_window=window,
                               fail_on_request_shortages=sc.freebsd.fail_on_request_shortages)
        return live_rules(tracks, stall_window=window)

    def plan(self, sc: scenario.Scenario) -> list[dict[str, Any]]:
        """The dry run: which release (and how it was chosen; an unsupported one is
        refused here too), then plan_steps, then the verdict rules."""
        version, how = freebsd_version(sc)
        check_version(version)
        release = {"step": "release", "what": f"FreeBSD {version} dom0 ({how})", "version": version,
                   "chosen": how}
        shortages = sc.freebsd.fail_on_request_shortages
        decide = {"step": "decide", "what": "the common rules (progress, drain, crash) plus blkback's: FAIL on "
                  "growth of reqs_completed_with_error or in flight above max_requests, HANG on responses queued and "
                  "never pushed; request_shortages growth is "
                  + ("FAIL ([freebsd] fail_on_request_shortages = true)" if shortages else
                     "reported only ([freebsd] fail_on_request_shortages = false)")}
        return [release, *plan_steps(version=version, arch="amd64", image_file=sc.freebsd.image or None,
                                     packages_dir=sc.freebsd.packages or None, src=sc.freebsd.src or None,
                                     patches=list(sc.freebsd.patches), kernconf=sc.freebsd.kernconf,
                                     cpus=sc.lab.cpus, memory_mib=sc.lab.memory.mib), decide]

    # ---- what `lab bisect` asks of a dom0 platform (lab/bisect.py)
    def with_backend_source(self, sc: scenario.Scenario, src: Path) -> scenario.Scenario:
        """The scenario with `src` as the tree of the backend under test: on a
        FreeBSD dom0 that is the dom0 kernel ([freebsd] src), built at each step
        (cached by source_hash: sys/, patches, KERNCONF), booted, judged."""
        if not (src / "sys" / "dev" / "xen" / "blkback" / "blkback.c").is_file():
            raise LabError("bisect", f"{src}: not a FreeBSD source tree (no sys/dev/xen/blkback/blkback.c)")
        return dataclasses.replace(sc, freebsd=dataclasses.replace(sc.freebsd, src=str(src)))

    def preflight(self, sc: scenario.Scenario) -> None:
        """What `lab run` would refuse first, in seconds: an unsupported release or
        missing media (LabError("image") naming them), before a bisect starts."""
        from lab import images

        media_or_error(sc, cache_dir=images.cache_dir())
