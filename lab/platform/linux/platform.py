"""The Linux dom0 platform (`Dom0Platform`): Debian's Xen and kernel from the
lab's images (or the user's own Xen, dom0 kernel and initrd), booted directly by
QEMU (-kernel Xen, dom0 as a multiboot module), warm-startable; the backend is
the dom0 kernel's xen-blkback module, stock or built from a source tree and
swapped in before the first guest, proven by its ELF build-id."""

from __future__ import annotations

import dataclasses
import gzip
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import console, images, qemu, scenario
from lab.errors import LabError
from lab.platform import BackendCtx, BootStep, Media, Rules
from lab.platform.linux.dom0 import LinuxDom0
from lab.runner import LocalRunner, Runner
from lab.watchdog import Track


def space_free(xen: Path, kernel: Path, initrd: Path) -> Path | None:
    """QEMU's -initrd takes "<module> <its command line>,<module>...": a module path
    with whitespace in it (a LAB_CACHE or HOME with a space) cannot be said there,
    nor escaped. Then link the three files from a short private directory and boot
    those (the saved-state key hashes contents, not paths). None when not needed."""
    if not any(any(c.isspace() for c in str(p)) for p in (xen, kernel, initrd)):
        return None
    d = Path(tempfile.mkdtemp(prefix="lab-boot-", dir="/tmp"))
    for src, name in ((xen, "xen"), (kernel, "vmlinuz"), (initrd, "initrd.img")):
        (d / name).symlink_to(src.resolve())
    return d


class LinuxPlatform:
    os = "linux"
    warm_start = True
    # the lab's lean vif hotplug script, in the dom0 image (images/linux-dom0/rootfs)
    vif_script: str | None = "/etc/xen/scripts/lab-vif-bridge"
    direct_boot = True

    def media(self, sc: scenario.Scenario, *, l0: LocalRunner, results: Path, work: Path, accel: str) -> Media:
        dom0_img = images.ensure_image("linux-dom0", runner=l0)
        guest_img = images.ensure_image("linux-guest", runner=l0)
        keys = images.ensure_keys()
        m = dom0_img.manifest
        xen = scenario.user_file(sc, sc.xen.binary, "xen.binary") or dom0_img.xen
        if sc.xen.binary and xen.suffix == ".gz":
            plain = work / "xen"
            plain.write_bytes(gzip.decompress(xen.read_bytes()))  # QEMU's -kernel wants the ELF
            xen = plain
        kernel = scenario.user_file(sc, sc.dom0.kernel, "dom0.kernel") or dom0_img.kernel
        initrd = scenario.user_file(sc, sc.dom0.initrd, "dom0.initrd") or dom0_img.initrd
        record = {
            "dom0": str(dom0_img.dir), "guest": str(guest_img.dir),
            "kernel_abi": m.get("kernel_abi"), "xen": m.get("xen"),
            "xen_version": m.get("packages", {}).get("xen-hypervisor-4.17-amd64"),
            "kernel_version": m.get("packages", {}).get(f"linux-image-{m.get('kernel_abi')}"),
        }
        links = space_free(xen, kernel, initrd)
        if links:
            xen, kernel, initrd = (links / "xen", links / "vmlinuz", links / "initrd.img")
        chosen, why = self._accel(accel, xen, kernel, initrd)
        boot = {"xen": xen, "kernel": kernel, "initrd": initrd, "image": dom0_img}
        return Media(dom0_root=(dom0_img.root, "raw"), guest=guest_img, keys=keys, record=record,
                     accel=chosen, accel_reason=why, private=boot, scratch=(links,) if links else ())

    @staticmethod
    def _accel(requested: str, xen: Path, kernel: Path, initrd: Path) -> tuple[str, str]:
        if requested != "auto":
            return requested, f"requested ({requested})"
        from lab import kvmprobe

        ok, why = kvmprobe.kvm_works(xen, kernel, initrd)
        return ("kvm" if ok else "tcg"), why

    def vm_spec(self, sc: scenario.Scenario, media: Media, *, accel: str, drives: list[qemu.Drive],
                console_log: Path, qmp_sock: Path | None, ssh_port: int, extra: Sequence[str] = ()) -> qemu.VmSpec:
        mem = sc.dom0.memory.mib
        b = media.private
        return qemu.VmSpec(
            accel=accel, cpus=sc.lab.cpus, memory_mib=sc.lab.memory.mib, cpu_model=sc.lab.cpu_model, xen=b["xen"],
            xen_cmdline=f"{sc.xen.cmdline} dom0_mem={mem}M,max:{mem}M",
            modules=[(b["kernel"], f"{sc.dom0.cmdline} lab.root=/dev/vda"), (b["initrd"], "")],
            drives=drives, ssh_port=ssh_port, console_log=console_log, qmp_sock=qmp_sock, extra=list(extra),
        )

    def boot_steps(self, sc: scenario.Scenario) -> list[BootStep]:
        dl = sc.deadlines
        return [BootStep("xen_banner", console.XEN_BANNER, dl.xen_banner),
                BootStep("dom0_kernel", console.DOM0_KERNEL, dl.dom0_kernel),
                BootStep("dom0_init", console.DOM0_INIT, dl.dom0_ssh)]

    def ops(self, runner: Runner, *, timeout: float) -> LinuxDom0:
        return LinuxDom0(runner, timeout=timeout)

    def install_backend(self, ctx: BackendCtx) -> dict[str, Any]:
        """The stock driver must really be the stock one; a source tree is built
        (cached by its hash) and swapped in before the first guest exists."""
        ops = ctx.ops
        assert isinstance(ops, LinuxDom0)
        src = ctx.sc.backend.source
        if not src:
            loaded = ops.load_stock_backend()
            if "/updates/" in loaded.get("module_path", "") or "O" in loaded.get("taint", ""):
                raise LabError("backend", f"dom0 has a non-stock xen-blkback loaded: {loaded}")
            return {"kind": "stock", **loaded}
        from lab.backend import LinuxBackendBuilder

        tree = Path(src).expanduser()
        if not tree.is_dir():
            raise LabError("backend", f"{ctx.sc.source}: key 'backend.source': expected a kernel source "
                           f"directory, got {src!r}")
        builder = LinuxBackendBuilder(ctx.media.private["image"].manifest["kernel_abi"], ctx.l0)
        art = builder.build(tree, [Path(p).expanduser() for p in ctx.sc.backend.patches], ctx.results)
        now = ops.install_backend(art.path, art.identity.get("build_id"), put=ctx.put)
        return {"kind": "built", **art.identity, "loaded": now}

    def rules(self, sc: scenario.Scenario, tracks: Sequence[Track], *, final: bool) -> Rules:
        return Rules()  # the common rules (lab/decide.py) are Linux's

    def with_backend_source(self, sc: scenario.Scenario, src: Path) -> scenario.Scenario:
        """The backend under test is xen-blkback, built from `src` at each step."""
        if not (src / "drivers" / "block" / "xen-blkback").is_dir():
            raise LabError("bisect", f"{src}: not a kernel tree with drivers/block/xen-blkback/")
        return dataclasses.replace(sc, backend=dataclasses.replace(sc.backend, source=str(src)))

    def preflight(self, sc: scenario.Scenario) -> None:
        return None  # everything a Linux dom0 needs comes from Debian's packages, built on demand

    def plan(self, sc: scenario.Scenario) -> list[dict[str, Any]]:
        return [{"step": "images", "what": "`lab images build`: mmdebstrap from the host's Debian mirror (cached)"},
                {"step": "boot", "what": "QEMU: Xen multiboot + dom0 kernel + the lab's initramfs; "
                 "see qemu-argv.json in any results directory for the exact command line"}]
