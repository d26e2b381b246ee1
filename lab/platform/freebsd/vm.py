"""The FreeBSD VMs under QEMU: their spec (no -kernel: the firmware boots the
disk, whose loader starts Xen or FreeBSD alone), the console milestones of each
boot, running a one-job VM to its poweroff, the nested-KVM check a PVH dom0
needs, and the plan's QEMU command lines (made by the same vm_spec)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab import console, qemu
from lab.errors import LabError
from lab.timing import Deadline

# -------------------------------------------------------- console milestones
# FreeBSD's side of the boot, next to console.XEN_BANNER and console.DOM0_INIT.
# Patterns are from FreeBSD's loader and kernel sources (desk-checked, never seen on
# this lab's console; tests/data/freebsd/console-*.txt reconstructs what they print).
#
# The loader picks its console from boot2's flags before it reads loader.conf
# (stand/i386/loader/main.c sets `console` from kargs->howto; stand/common/console.c
# cons_probe prints "Consoles: ..." on that console only). With no /boot.config and
# QEMU's -nodefaults (no VGA) its banner never reaches the serial port. What does:
# everything after loader.conf sets `console` (the release image's own loader.conf
# says console="comconsole,vidconsole", release/tools/basic-cloudinit.conf; the
# dom0's adds console="comconsole"; cons_set switches at once), i.e. the lua
# loader's "Loading Xen kernel..." / "Loading kernel..." (stand/lua/config.lua,
# config.loadelf) and load_elf.c's "<path> text=0x..." line for each file loaded.
# The provisioning writes /boot.config with -h, so the dom0's later boots speak on
# serial from boot2 on and the banner lines match too.
FREEBSD_LOADER = console.Milestone(
    "boot:loader", "FreeBSD's loader",
    re.compile(rb"Consoles: |FreeBSD/x86 bootstrap loader|Loading (?:Xen )?kernel\.\.\.|/boot/[\w./-]+ text=0x[0-9a-f]+ "))
FREEBSD_KERNEL = console.Milestone("boot:dom0", "the FreeBSD kernel's banner",
                                   re.compile(rb"FreeBSD \d+\.\d+-[A-Z0-9]+(?:-p\d+)? "))
XEN_PVH_DOM0 = console.Milestone("boot:xen", "Xen building the PVH dom0", re.compile(rb"Building a PVH Dom0"))
PROVISIONED = console.Milestone("image", "the provisioning script to finish", re.compile(rb"lab-provision: done"))
KERNEL_BUILT = console.Milestone("backend", "the kernel build to finish", re.compile(rb"lab-build: done"))

# The dom0's boot under Xen, in order: each missed one names how far it got.
DOM0_BOOT = (FREEBSD_LOADER, console.XEN_BANNER, XEN_PVH_DOM0, FREEBSD_KERNEL, console.DOM0_INIT)


def dom0_boot_limits(deadlines: Any) -> list[tuple[console.Milestone, float]]:
    """DOM0_BOOT with each milestone's deadline (seconds) from the scenario's
    [deadlines]: the loader and Xen's banner within xen_banner, Xen's PVH build
    and FreeBSD's banner within dom0_kernel, dom0 ready within dom0_ssh."""
    limits = {FREEBSD_LOADER: deadlines.xen_banner, console.XEN_BANNER: deadlines.xen_banner,
              XEN_PVH_DOM0: deadlines.dom0_kernel, FREEBSD_KERNEL: deadlines.dom0_kernel,
              console.DOM0_INIT: deadlines.dom0_ssh}
    return [(m, float(limits[m])) for m in DOM0_BOOT]


# ------------------------------------------------------------------ the VMs
def vm_spec(drives: Sequence[qemu.Drive], *, console_log: Path, qmp_sock: Path | None, accel: str, cpus: int,
            memory_mib: int, ssh_port: int | None, cpu_model: str = "", extra: Sequence[str] = ()) -> qemu.VmSpec:
    """A FreeBSD VM from the lab's own argv builders. No -kernel: the firmware
    boots the first drive, whose loader (with Xen, via xen_kernel) takes over. The
    provisioning and build VMs get no network at all (ssh_port None)."""
    first = qemu.Drive(drives[0].path, drives[0].serial, drives[0].fmt, drives[0].readonly, boot=True)
    return qemu.VmSpec(accel=accel, cpus=cpus, memory_mib=memory_mib, xen=None, xen_cmdline="", modules=[],
                       drives=[first, *drives[1:]], ssh_port=ssh_port or 0, console_log=console_log,
                       qmp_sock=qmp_sock, cpu_model=cpu_model, network=ssh_port is not None, extra=list(extra))


def image_format(path: Path) -> str:
    return "raw" if path.suffix == ".raw" else "qcow2"


def run_vm(name: str, spec: qemu.VmSpec, results: Path, steps: Sequence[tuple[console.Milestone, float]],
           *, stage: str, exit_timeout: float = 180) -> dict[str, float]:
    """Boot a VM without Xen that does one job and powers off: wait for each
    milestone in turn (each with its own deadline), then for QEMU to exit. The VM
    is killed whatever happens. Returns when each milestone came (s since start)."""
    t0 = time.monotonic()
    con = console.Console(spec.console_log, f"FreeBSD {name}")
    (results / f"qemu-{name}-argv.json").write_text(json.dumps(qemu.build_argv(spec), indent=1) + "\n")
    vm = qemu.start(spec, results / f"qemu-{name}-stderr.log")
    reached: dict[str, float] = {}
    try:
        for m, seconds in steps:
            try:
                con.wait_for(m, Deadline(seconds), alive=vm.alive)
            except LabError as e:
                got = ", ".join(reached) or "none"
                empty = ("; the console stayed empty: the firmware found nothing to boot (is the image a "
                         "FreeBSD VM image?)" if con.size() == 0 else "")
                raise LabError(stage, f"FreeBSD {name} VM: {e.message} (milestones reached: {got}; console "
                               f"{spec.console_log}{empty})", tail=e.tail or vm.stderr_tail()) from None
            reached[m.what] = round(time.monotonic() - t0, 1)
        try:
            vm.proc.wait(timeout=exit_timeout)
        except subprocess.TimeoutExpired:
            raise LabError(stage, f"FreeBSD {name} VM: did not power off within {exit_timeout:.0f}s "
                           "of finishing", tail=con.tail()) from None
        reached["poweroff"] = round(time.monotonic() - t0, 1)
        return reached
    finally:
        vm.stop()


def nested_kvm_problem(read: Callable[[str], str | None] | None = None) -> str | None:
    """Under KVM a PVH dom0 needs the host to pass VMX/SVM through (nested): say
    so before booting instead of letting Xen fail to start its dom0."""
    def _read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    read = read or _read
    seen = False
    for mod in ("kvm_intel", "kvm_amd"):
        v = read(f"/sys/module/{mod}/parameters/nested")
        if v is None:
            continue
        seen = True
        if v in ("Y", "y", "1"):
            return None
    if not seen:
        return "KVM is not loaded (no /sys/module/kvm_intel or kvm_amd): use --accel tcg"
    return ("nested virtualisation is disabled on this host (/sys/module/kvm_*/parameters/nested is N), and a "
            "FreeBSD dom0 is PVH: it needs VMX/SVM inside the Xen VM. Enable it (modprobe -r kvm_intel; "
            "modprobe kvm_intel nested=1, or kvm_amd) or run with --accel tcg")


# ------------------------------------------------------------------ the plan
PLAN_PORT = 1  # stands for the forwarded port in the plan's command line, printed as $PORT


def plan_argv(spec: qemu.VmSpec) -> list[str]:
    """A VM's QEMU command as the plan prints it: the run's own argv, the SSH
    port shown as $PORT (chosen at run time)."""
    return [a.replace(f"127.0.0.1:{PLAN_PORT}-", "127.0.0.1:$PORT-") for a in qemu.build_argv(spec)]


def boot_plan(*, cpus: int = 2, memory_mib: int = 2048, accel: str = "tcg", cpu_model: str = "") -> dict[str, Any]:
    """The plan's boot step: the dom0's spec as FreeBsdPlatform.vm_spec makes it
    (per-run paths as $RUN) and the milestones DOM0_BOOT waits for."""
    spec = vm_spec([qemu.Drive(Path("$RUN/dom0-root.qcow2"), "lab-dom0-root")],
                   console_log=Path("$RUN/console.log"), qmp_sock=Path("$RUN/qmp.sock"), accel=accel, cpus=cpus,
                   memory_mib=memory_mib, ssh_port=PLAN_PORT, cpu_model=cpu_model)
    return {
        "step": "boot",
        "what": "boot the dom0 image under QEMU: FreeBSD's loader loads Xen (xen_kernel) and FreeBSD as PVH "
                "dom0 (plus, as on a Linux dom0, each guest's disks and the read-only disk with the guests' kernels)",
        "command": plan_argv(spec),
        "unverified": "TCG with -cpu qemu64,+svm,+npt for a PVH dom0 (SVM+NPT emulation) has not been run here",
        "milestones": [m.what for m in DOM0_BOOT] + ["dom0 SSH"],
        "then": "the booted kernel's /boot/kernel/xen-blklab.id must equal the tree hash (or be absent for the "
                "release's kernel), else ERROR at stage backend",
    }
