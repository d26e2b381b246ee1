"""L1 up: per-run disks, the VM (through the run's L0 driver, lab/l0.py: QEMU
itself or a libvirt domain), then a saved state restored (same inputs only,
guests included: lab/l1state.py) or a cold boot through the platform's console
milestones, each with its own deadline; then dom0 over SSH with its clock set.
A cold boot leaves a state pending, which `save_state` writes once the pipeline
has the guests up. Everything it starts is handed to the caller's exit stack, so
teardown unwinds it whatever happens."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from lab import console, l1state, qemu, scenario, ssh
from lab.errors import LabError, StateBusy
from lab.platform import Dom0Ops, Dom0Platform, Media
from lab.runner import CommandLog, LocalRunner
from lab.timing import Deadline

if TYPE_CHECKING:  # lab/l0.py builds on this module (Where); boot only calls what it is handed
    from lab.l0 import Driver, Vm

log = logging.getLogger("lab.boot")
BOOT_DISK_MIB = 512  # fixed: a restored dom0 has this disk's capacity cached from its boot
GUEST_NET = "10.99.0"  # dom0's xenbr0 is .1; guests from .10 (inside L1 only)


@dataclass
class L1:
    """The running Xen VM and dom0, as the later phases use them."""

    vm: Vm
    spec: qemu.VmSpec
    dom0: ssh.SshRunner
    ops: Dom0Ops
    xen_console: console.Console
    slots: list[l1state.Slot]
    record: dict[str, Any]  # record.json's "l1"
    boot: dict[str, float]  # record.json's "boot"
    driver: Driver  # what runs the VM (lab/l0.py)
    pending_state: l1state.State | None = None  # saved during this run; kept only if it reaches a verdict
    socket_dirs: list[Path] = field(default_factory=list)
    pending_inputs: dict[str, Any] | None = None  # the pending state's key inputs (its meta.json)
    guests_saved: bool = False  # restored: the scenario's guests are up in it (lab/guests.py: adopt)


@dataclass(frozen=True)
class Where:
    """Where a run keeps its files: results (kept) and work (throwaway)."""

    results: Path
    work: Path
    cmdlog: CommandLog
    l0: LocalRunner
    keep: bool = False  # --keep: L1 may outlive the lab process (no parent-death signal)


def slots(sc: scenario.Scenario, media: Media) -> list[l1state.Slot]:
    """L1's writable disks: dom0's root overlay, then each guest test disk (a fresh
    empty disk per run; guests boot from their initramfs, not from a disk)."""
    out = [l1state.Slot("dom0-root", "lab-dom0-root", base=media.dom0_root[0], base_fmt=media.dom0_root[1])]
    for g in sc.guests:
        for d in g.disks:
            out.append(l1state.Slot(f"{g.name}-{d.vdev}", f"lab-{g.name}-{d.vdev}", size=d.size))
    return out


def guest_ip(sc: scenario.Scenario, name: str) -> str:
    return f"{GUEST_NET}.{10 + [g.name for g in sc.guests].index(name)}"


def guest_files(sc: scenario.Scenario, media: Media, g: scenario.GuestCfg) -> tuple[Path, Path]:
    """The guest's kernel and initrd on L0: the scenario's own, else the lab image's."""
    kernel = scenario.user_file(sc, g.kernel, "guests.kernel") or media.guest.kernel
    initrd = scenario.user_file(sc, g.initrd, "guests.initrd") or media.guest.initrd
    return kernel, initrd


def boot_disk(sc: scenario.Scenario, media: Media, where: Where, img: Path) -> Path:
    """A read-only ext4 disk holding each guest's kernel and initrd, which dom0's xl
    needs as files (copying them over SSH costs seconds: dom0's crypto is emulated)."""
    stage = where.work / "boot"
    stage.mkdir()
    total = 0
    for g in sc.guests:
        kernel, initrd = guest_files(sc, media, g)
        for src, dst in ((kernel, f"{g.name}-vmlinuz"), (initrd, f"{g.name}-initrd")):
            shutil.copyfile(src, stage / dst)
            total += src.stat().st_size
    if total * 1.2 > BOOT_DISK_MIB * 2**20:
        raise LabError("image", f"the guests' kernels and initrds ({total >> 20} MiB) do not fit the "
                       f"{BOOT_DISK_MIB} MiB boot disk")
    where.l0.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(stage), str(img), f"{BOOT_DISK_MIB}M"],
                 timeout=60).check("image")
    shutil.rmtree(stage)
    return img


def drives(disks: list[Path], slots_: list[l1state.Slot], boot: Path) -> list[qemu.Drive]:
    """L1's disks, whatever the dom0 OS: each slot by its serial, then the read-only
    disk with the guests' kernels."""
    out = [qemu.Drive(p, s.serial) for p, s in zip(disks, slots_, strict=True)]
    return [*out, qemu.Drive(boot, "lab-boot", fmt="raw", readonly=True)]


def qmp_path(work: Path, socket_dirs: list[Path]) -> Path:
    """The QMP socket in the run's work directory, unless that path is too long for
    a Unix socket (108 bytes, a deep $LAB_CACHE): then in a short private
    directory under /tmp, removed with the run."""
    p = work / "qmp.sock"
    if len(os.fsencode(p)) < 100:
        return p
    d = Path(tempfile.mkdtemp(prefix="lab-qmp-", dir="/tmp"))
    socket_dirs.append(d)
    return d / "qmp.sock"


def write_owner(where: Where, *, qemu_pid: int | None) -> None:
    """Who owns this work directory: a later run removes it once both are gone."""
    owner = {"pid": os.getpid(), "qemu_pid": qemu_pid, "results": str(where.results)}
    tmp = where.work / "owner.json.tmp"
    tmp.write_text(json.dumps(owner))
    tmp.replace(where.work / "owner.json")


def start_vm(driver: Driver, spec: qemu.VmSpec, where: Where, stack: contextlib.ExitStack) -> tuple[Vm, qemu.VmSpec]:
    vm, spec = driver.start(spec, where, stack)  # owned by `stack` before it returns
    write_owner(where, qemu_pid=vm.pid)
    return vm, spec


def connect_dom0(media: Media, spec: qemu.VmSpec, where: Where, deadline: Deadline, *, stage: str) -> ssh.SshRunner:
    keys = media.keys
    dom0 = ssh.SshRunner(
        "dom0", host_key=ssh.load_pinned_key(Path(str(keys.host("dom0")) + ".pub")),
        client_key=paramiko.Ed25519Key.from_private_key_file(str(keys.client)),
        log_=where.cmdlog, connect=ssh.tcp_connect(spec.ssh_port),
    )
    dom0.connect(deadline, stage=stage)
    return dom0


def up(sc: scenario.Scenario, platform: Dom0Platform, media: Media, where: Where, stack: contextlib.ExitStack,
       *, driver: Driver, cold: bool, progress: list[str], deadline: Deadline,
       guests: list[dict[str, Any]] | None = None) -> L1:
    """Restore a saved L1 whose key matches, else boot cold (and, when the platform
    supports warm start, leave a state pending: the pipeline saves it once the
    guests are up, `save_state`). `guests`: the key inputs of the scenario's
    guests (lab/guests.py: state_inputs). `driver` runs the VM (lab/l0.py).
    `progress[0]` is kept at the current stage."""
    progress[0] = "boot:qemu"
    slots_ = slots(sc, media)
    socket_dirs: list[Path] = []
    def remove_socket_dirs() -> None:
        for d in socket_dirs:
            shutil.rmtree(d, ignore_errors=True)

    stack.callback(remove_socket_dirs)
    con = console.Console(where.results / "console-xen.log", "Xen serial")
    accel = media.accel
    if platform.direct_boot and platform.warm_start:
        # the key replaces every drive's path by its serial: the boot disk's path is no input
        probe = platform.vm_spec(sc, media, accel=accel,
                                 drives=drives([Path(s.name) for s in slots_], slots_, Path("boot.img")),
                                 console_log=con.path, qmp_sock=None, ssh_port=0)
        inputs = l1state.key_inputs(probe, slots_, guests, driver.key_inputs())
        key = l1state.state_key(inputs)
        rec: dict[str, Any] = {"key": key}
        state = None if cold else l1state.find(key)
        if state is not None:
            try:
                with contextlib.ExitStack() as attempt:
                    l1 = _restore(sc, platform, media, where, attempt, driver, state, slots_, rec, socket_dirs,
                                  progress, deadline)
                    stack.push(attempt.pop_all())
                    return l1
            except StateBusy as e:
                # another run has it (libvirt: one run per saved state at a time): boot
                # cold, and leave the state to that run (no new one is taken either)
                log.warning("L1 state %s is in use, booting cold: %s", key, e.message)
                rec["restore_failed"] = rec["state_busy"] = e.message
                for s in slots_:
                    (where.work / f"{s.name}.qcow2").unlink(missing_ok=True)
                con.path.unlink(missing_ok=True)
                con = console.Console(con.path, con.name)
            except LabError as e:
                # never a PASS of a run that did not happen as described: say so,
                # drop the state that failed, boot cold and save a new one
                log.warning("restore of L1 state %s failed, booting cold: %s", key, e)
                rec["restore_failed"] = str(e)
                for s in slots_:
                    (where.work / f"{s.name}.qcow2").unlink(missing_ok=True)
                l1state.remove(key)
                con.path.unlink(missing_ok=True)
                con = console.Console(con.path, con.name)
        return _cold(sc, platform, media, where, stack, driver, slots_, rec, inputs, socket_dirs, con, progress,
                     deadline)
    rec = {"start": "cold", "warm_start": f"not for a {platform.os} dom0 yet"}
    return _cold(sc, platform, media, where, stack, driver, slots_, rec, None, socket_dirs, con, progress, deadline)


def _restore(sc: scenario.Scenario, platform: Dom0Platform, media: Media, where: Where,
             stack: contextlib.ExitStack, driver: Driver, state: l1state.State, slots_: list[l1state.Slot],
             rec: dict[str, Any], socket_dirs: list[Path], progress: list[str], deadline: Deadline) -> L1:
    progress[0] = "boot:restore"
    t0 = time.monotonic()
    disks = l1state.restore_overlays(state, slots_, where.work)
    spec = platform.vm_spec(sc, media, accel=media.accel, drives=drives(disks, slots_, state.boot_disk),
                            console_log=where.results / "console-xen.log",
                            qmp_sock=qmp_path(where.work, socket_dirs), ssh_port=qemu.free_port())
    vm, spec, load_s = driver.restore(spec, state, where, stack)  # owned by `stack`; running when it returns
    write_owner(where, qemu_pid=vm.pid)
    saved_guests = [g["name"] for g in state.meta().get("inputs", {}).get("guests", [])]
    rec.update(start="restored", state=str(state.dir), guests="restored with L1" if saved_guests else "none saved",
               saved_guests=saved_guests)
    rec["load_s"] = round(load_s, 2)
    shutil.copyfile(state.dir / "console-boot.log", where.results / "console-xen-boot.log")
    dom0 = connect_dom0(media, spec, where, deadline.slice(60), stage="boot:restore")
    stack.callback(dom0.close)
    rec["dom0_ready_s"] = round(time.monotonic() - t0, 2)
    ops = _after_boot(sc, platform, dom0)
    con = console.Console(where.results / "console-xen.log", "Xen serial")
    return L1(vm, spec, dom0, ops, con, slots_, rec, {"restore_load": rec["load_s"], "dom0_ssh": rec["dom0_ready_s"]},
              driver, None, socket_dirs, guests_saved=bool(saved_guests))


def _cold(sc: scenario.Scenario, platform: Dom0Platform, media: Media, where: Where, stack: contextlib.ExitStack,
          driver: Driver, slots_: list[l1state.Slot], rec: dict[str, Any], inputs: dict[str, Any] | None,
          socket_dirs: list[Path], con: console.Console, progress: list[str], deadline: Deadline) -> L1:
    rec["start"] = "cold"
    rec["guests"] = "booted cold"
    pending = None
    if inputs is not None and l1state.find(rec["key"]) is None:
        pending = l1state.begin(rec["key"])
        # dropped unless the run saves it and reaches a verdict (the pipeline settles it)
        disks = l1state.create_disks(pending, slots_)
        boot = boot_disk(sc, media, where, pending.boot_disk)
    else:
        disks = l1state.create_disks(where.work, slots_)
        boot = boot_disk(sc, media, where, where.work / "boot.img")
    t_qemu = time.monotonic()
    spec = platform.vm_spec(sc, media, accel=media.accel, drives=drives(disks, slots_, boot),
                            console_log=con.path, qmp_sock=qmp_path(where.work, socket_dirs),
                            ssh_port=qemu.free_port())
    try:
        vm, spec = start_vm(driver, spec, where, stack)
        boot_t: dict[str, float] = {}
        for step in platform.boot_steps(sc):
            progress[0] = step.milestone.stage
            try:
                con.wait_for(step.milestone, deadline.slice(step.seconds), alive=vm.alive)
            except LabError as e:
                reached = ", ".join(f"{k} at {v:.0f}s" for k, v in boot_t.items()) or "none"
                raise LabError(e.stage, f"{e.message}; milestones reached: {reached}", tail=e.tail) from None
            boot_t[step.name] = round(time.monotonic() - t_qemu, 2)
        progress[0] = "boot:ssh"
        dom0 = connect_dom0(media, spec, where, deadline.slice(sc.deadlines.dom0_ssh), stage="boot:ssh")
        stack.callback(dom0.close)
    except BaseException:
        if pending is not None:
            l1state.promote(pending, "ERROR")  # removes it
        raise
    boot_t["dom0_ssh"] = round(time.monotonic() - t_qemu, 2)
    rec["dom0_ready_s"] = boot_t["dom0_ssh"]
    ops = _after_boot(sc, platform, dom0)
    return L1(vm, spec, dom0, ops, con, slots_, rec, boot_t, driver, pending, socket_dirs, pending_inputs=inputs)


def save_state(l1: L1, where: Where, stack: contextlib.ExitStack, progress: list[str], *, deadline: Deadline) -> bool:
    """Save the pending state now: dom0 and the scenario's guests are up, no test
    disk is attached and the backend under test is not loaded yet. A failure
    here is the lab's (ERROR): the caller's exit stack removes the half-made
    state. The qemu driver pauses QEMU for it and the SSH sessions of this run
    survive (False). The libvirt driver's save stops the domain and restores it
    at once in a new QEMU (lab/l0.py), owned by `stack`: dom0's session is opened
    again here and its clock set; True tells the caller to reconnect the guests'."""
    pending = l1.pending_state
    assert pending is not None and l1.pending_inputs is not None
    progress[0] = "boot:save"
    shutil.copyfile(l1.xen_console.path, pending.dir / "console-boot.log")
    saved = l1.driver.save(l1.vm, pending, l1.slots, where, stack, inputs=l1.pending_inputs)
    l1.record["save_paused_s"] = round(saved.paused_s, 2)
    l1.record["saved_state"] = str(l1state.states_dir() / pending.key)
    l1.record["saved_guests"] = [g["name"] for g in l1.pending_inputs.get("guests", [])]
    if not saved.restarted:
        return False
    l1.vm, l1.spec = saved.vm, saved.spec
    write_owner(where, qemu_pid=l1.vm.pid)
    l1.record["save_restarted"] = saved.detail
    # TCP did not survive the old QEMU's user network: a new session, maybe on a new port
    l1.dom0.reconnect(deadline.slice(60), stage="boot:save", connect=ssh.tcp_connect(l1.spec.ssh_port))
    l1.ops.set_clock(int(time.time()))  # dom0 stood still while saved and restored
    return True


def _after_boot(sc: scenario.Scenario, platform: Dom0Platform, dom0: ssh.SshRunner) -> Dom0Ops:
    ops = platform.ops(dom0, timeout=sc.deadlines.command)
    # the wall clock of a VM is whatever it booted with; make dom0 agree with L0
    ops.set_clock(int(time.time()))
    return ops
