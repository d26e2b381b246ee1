"""Scenarios: frozen dataclasses and a strict TOML loader.

Every key has a default here and is documented in docs/scenario.md. The loader
rejects unknown keys and bad values with the file, the key path and what was
expected, before anything starts. What a value may be (durations, sizes, the
characters of command lines and paths, fio's `extra`) is lab/values.py.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lab import values
from lab.errors import LabError, ScenarioError
from lab.values import Duration, Size  # the schema's field types, part of this module's API

SCENARIO_DIR = Path(__file__).parent / "scenarios"
RESERVED_NAMES = {"bisect"}  # results/bisect/ belongs to `lab bisect`


# ---------------------------------------------------------------- the schema
DEFAULT_XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_max_vcpus=2 loglvl=warning "
    "guest_loglvl=warning noreboot"
)
DEFAULT_DOM0_CMDLINE = "console=hvc0 earlyprintk=xen quiet"


@dataclass(frozen=True)
class LabCfg:
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    memory: Size = Size(1536 * 1024 * 1024)  # the Xen VM's RAM
    cpus: int = 2
    # "" picks per accelerator: qemu64,+svm,+npt under TCG (the only model whose PV
    # dom0 was stable there, facts/xen-under-qemu.md), host under KVM.
    cpu_model: str = ""
    # what runs the Xen VM on L0 (lab/l0.py): QEMU as the lab's child, or a
    # transient libvirt domain from the same VM description
    driver: Literal["qemu", "libvirt"] = "qemu"


@dataclass(frozen=True)
class XenCfg:
    binary: str = ""  # the user's own xen.gz / xen ELF; "" = the image's Debian Xen
    cmdline: str = DEFAULT_XEN_CMDLINE


@dataclass(frozen=True)
class Dom0Cfg:
    os: Literal["linux", "freebsd"] = "linux"
    memory: Size = Size(512 * 1024 * 1024)
    kernel: str = ""  # the user's own dom0 kernel; "" = the image's
    initrd: str = ""  # the user's own dom0 initrd; "" = the lab's small one
    cmdline: str = DEFAULT_DOM0_CMDLINE


@dataclass(frozen=True)
class DiskCfg:
    vdev: str = "xvdb"
    size: Size = Size(1024 * 1024 * 1024)


@dataclass(frozen=True)
class GuestCfg:
    name: str = ""
    os: Literal["linux"] = "linux"
    # the guest's root lives in its initramfs (135 MiB unpacked): 288 MiB was the
    # least that booted with fio, 320 MiB leaves fio its buffers
    memory: Size = Size(320 * 1024 * 1024)
    vcpus: int = 2
    kernel: str = ""  # the user's own guest kernel; "" = the image's
    initrd: str = ""
    cmdline: str = "console=hvc0 quiet"
    # blkfront module parameters; -1 leaves the driver's own default.
    # 0 / 1 = a one-page ring (32 requests) and one queue: easy to fill.
    max_ring_page_order: int = 0
    max_queues: int = 1
    feature_persistent: int = -1  # 0 = the frontend refuses persistent grants, 1 = offers them
    max_indirect_segments: int = -1  # the frontend's limit of segments per indirect request
    disks: tuple[DiskCfg, ...] = (DiskCfg(),)


# The userspace frontend's malformed requests (images/blkring/blkring.c), each
# with its expected outcome asserted by the program.
RING_HOSTILE_CASES = ("too-many-segments", "bad-grant-ref", "out-of-range-sector", "prod-ahead",
                      "kill-with-outstanding", "slot-reuse", "reconnect-mid-flight", "revoked-grant-ref")
RING_MAX_SEGMENTS = 256  # blkback's MAX_INDIRECT_SEGMENTS
# grants the lab lets xen-gntalloc hand out in a guest (its own default is 1024):
# every ring page, data page and indirect page of the userspace frontend is one
RING_GRANT_LIMIT = 8192
RING_MAX_RECONNECTS = 8  # blkring's MAX_RECONNECTS
RING_MAX_QUEUES = 16  # blkring's MAX_QUEUES
RING_MIN_PHASE = 5.0  # seconds of I/O each connection of a reconnect schedule gets at least


@dataclass(frozen=True)
class RingCfg:
    """The userspace frontend's options (tool = "ring": lab/ringfront.py runs
    images/blkring/blkring.c on a test disk the guest's blkfront is kept off)."""

    behaviour: Literal["aggressive", "bursty"] = "aggressive"  # re-queue on each response / fill, drain, fill
    op: Literal["read", "write", "flush", "discard", "mixed"] = "read"  # mixed: rwmixread, 1/16 flush, 1/16 discard
    segments: int = 1  # 4 KiB pages per request; more than 11 = indirect descriptors
    depth: int = 0  # requests kept in flight; 0 = every ring slot
    ring_page_order: int = 0  # a ring of 2^order pages (32 << order slots), capped at the backend's offer
    # rings (multi-queue-num-queues), each with its own event channel and kept as
    # full as one ring is; capped at the backend's multi-queue-max-queues
    queues: int = 1
    persistent: bool = False  # offer persistent grants (feature-persistent)
    notify: Literal["always", "needed"] = "always"  # an event per push, or only when the backend asks
    poll: bool = False  # busy-poll the ring instead of waiting for events
    verify: bool = False  # write a pattern, read it back, compare (op = "write"): a mismatch is a FAIL
    hostile: tuple[str, ...] = ()  # RING_HOSTILE_CASES, run first, in this order
    burst_gap: Duration = Duration(0)  # bursty: idle time between bursts
    halt_wait: Duration = Duration(2)  # prod-ahead: no response this long = the ring was halted
    # a reconnect schedule: the runtime is split into 1 + len(...) phases of equal
    # I/O time, each later one on a new connection (close, Initialising, connect)
    # asking for the next ring page order; () = one connection throughout
    reconnect_orders: tuple[int, ...] = ()
    # idle time around each reconnect (after hostile cases, between phases), so
    # that the dom0 sampler sees each connection's last statistics and their restart
    settle: Duration = Duration(2.5)


@dataclass(frozen=True)
class WorkloadCfg:
    guest: str = ""
    disk: str = "xvdb"
    tool: Literal["fio", "ring"] = "fio"
    rw: Literal["randrw", "randread", "randwrite", "read", "write", "rw", "randtrim"] = "randrw"
    rwmixread: int = 50
    bssplit: str = "4k/50:16k/25:64k/25"  # several block sizes
    iodepth: int = 32
    numjobs: int = 4  # outstanding I/O = iodepth x numjobs
    ioengine: Literal["libaio", "io_uring", "psync"] = "libaio"
    direct: bool = True
    runtime: Duration = Duration(30)
    size: str = ""  # "" = the whole disk
    extra: dict[str, str] = field(default_factory=dict)  # more fio job options
    ring: RingCfg = RingCfg()  # tool = "ring" only


@dataclass(frozen=True)
class FreeBsdCfg:
    """FreeBSD dom0 media (docs/freebsd.md). Empty paths = download on L0."""

    version: str = ""  # MAJOR.MINOR; "" = the latest 14.x RELEASE
    image: str = ""  # a VM image file (or a directory with it and CHECKSUM.SHA512)
    packages: str = ""  # a directory with packagesite.pkg/.yaml and the .pkg files
    src: str = ""  # a FreeBSD source tree (or src.txz) for a patched kernel
    patches: tuple[str, ...] = ()
    kernconf: str = "GENERIC"  # blkback is in GENERIC
    # the seed's regression: a kernel with the 2014 fix reverted runs out of request
    # structures without always hanging; this makes any growth of request_shortages FAIL
    fail_on_request_shortages: bool = False
    # VM stages without Xen, under TCG: pkg add of ~30 packages; kernel-toolchain
    # + buildkernel (tens of minutes with KVM, hours under TCG)
    provision_timeout: Duration = Duration(3600)
    build_timeout: Duration = Duration(8 * 3600)


@dataclass(frozen=True)
class BackendCfg:
    """The backend under test. "" = the stock driver of the dom0 kernel."""

    source: str = ""  # a kernel source tree (git repo or directory) holding drivers/block/xen-blkback/
    patches: tuple[str, ...] = ()  # patch files applied on top, in order


FAULT_KINDS = ("stall", "delay", "error", "corrupt", "pause-l1", "detach-attach", "destroy", "save-restore",
               "reboot")
LIFECYCLE_KINDS = ("detach-attach", "destroy", "save-restore", "reboot")  # operations of the toolstack


@dataclass(frozen=True)
class FaultCfg:
    """A fault injected into the real stack, `at` seconds after the workloads start.

    stall: the disk's dm device in dom0 is suspended (I/O stops completing);
    delay: every I/O to it takes `delay` longer (dm-delay), but completes;
    error: every I/O to it fails (dm error target);
    corrupt: every write to it lands with one byte changed (dm-flakey's
      corrupt_bio_byte) and completes okay: silent corruption, which only a
      workload that reads back what it wrote (tool = "ring", verify = true) sees;
    pause-l1: the whole Xen VM is frozen from L0 (QEMU monitor `stop`);
    detach-attach: the test disk is detached (xl block-detach) and attached again,
      `count` times (connect/disconnect churn; the disk must carry no workload:
      blkfront keeps an open disk);
    destroy: the guest is destroyed (xl destroy), whatever it has in flight;
    save-restore: the guest is saved (xl save: its frontends suspend with I/O
      pending, the domain and its backend devices go) and restored (xl restore:
      a new domain whose frontends reconnect to new backend devices and re-issue
      what was pending), under load; its workload must go on afterwards;
    reboot: the guest is rebooted (xl reboot) under load: its workload ends, the
      domain is built again with its test disks present from the start (the
      cold-plug path, where every other run hot-plugs) and each must connect
      and carry I/O."""

    kind: Literal["stall", "delay", "error", "corrupt", "pause-l1", "detach-attach", "destroy", "save-restore",
                  "reboot"] = "stall"
    guest: str = ""  # target guest and disk (not used by pause-l1)
    disk: str = "xvdb"
    at: Duration = Duration(0)
    duration: Duration = Duration(0)  # 0 = until the end of the run
    delay: Duration = Duration(0.1)  # extra latency per I/O, for kind = "delay"
    count: int = 1  # cycles, for kind = "detach-attach"


@dataclass(frozen=True)
class WatchdogCfg:
    interval: Duration = Duration(1)  # sampling interval
    stall_window: Duration = Duration(15)  # no progress this long with I/O in flight = HANG
    drain_window: Duration = Duration(30)  # after the workload, in-flight must reach 0


@dataclass(frozen=True)
class DeadlinesCfg:
    xen_banner: Duration = Duration(60)
    dom0_kernel: Duration = Duration(120)
    dom0_ssh: Duration = Duration(240)
    guest_create: Duration = Duration(120)
    guest_ssh: Duration = Duration(180)
    workload_grace: Duration = Duration(120)  # beyond the workload's own runtime
    command: Duration = Duration(60)  # any single command over SSH


@dataclass(frozen=True)
class Scenario:
    name: str = ""
    description: str = ""
    lab: LabCfg = LabCfg()
    xen: XenCfg = XenCfg()
    dom0: Dom0Cfg = Dom0Cfg()
    guests: tuple[GuestCfg, ...] = ()
    workloads: tuple[WorkloadCfg, ...] = ()
    faults: tuple[FaultCfg, ...] = ()
    backend: BackendCfg = BackendCfg()
    freebsd: FreeBsdCfg = FreeBsdCfg()
    watchdog: WatchdogCfg = WatchdogCfg()
    deadlines: DeadlinesCfg = DeadlinesCfg()
    source: str = field(default="", metadata={"internal": True})

    def guest(self, name: str) -> GuestCfg:
        return next(g for g in self.guests if g.name == name)


# ------------------------------------------------------------------ loading
def _check(s: Scenario, where: str) -> None:
    def err(path: str, msg: str) -> ScenarioError:
        return ScenarioError(f"{where}: key '{path}': {msg}")

    if not values.SCENARIO_NAME.fullmatch(s.name):
        raise err("name", f"expected lower-case letters, digits, '.', '_' or '-', got {s.name!r}")
    if len(s.name) > 64:
        raise err("name", f"expected at most 64 characters, got {len(s.name)}")
    if s.name in RESERVED_NAMES:
        raise err("name", f"'{s.name}' is reserved")
    _check_text(s, err)
    if s.lab.cpus < 1:
        raise err("lab.cpus", "expected at least 1")
    if s.dom0.memory >= s.lab.memory:
        raise err("dom0.memory", "expected less than lab.memory")
    for key, mem in [("lab.memory", s.lab.memory), ("dom0.memory", s.dom0.memory),
                     *((f"guests[{i}].memory", g.memory) for i, g in enumerate(s.guests))]:
        if mem.mib < 1:  # QEMU's -m and xl's memory count whole MiB: less would be 0
            raise err(key, f"expected at least 1M, got {mem} bytes")
    names = set()
    for i, g in enumerate(s.guests):
        if not values.GUEST_NAME.fullmatch(g.name):
            raise err(f"guests[{i}].name", f"expected a short lower-case name, got {g.name!r}")
        if g.name in names or g.name == "dom0":
            raise err(f"guests[{i}].name", f"'{g.name}' is used twice or reserved")
        names.add(g.name)
        vdevs = [d.vdev for d in g.disks]
        for j, d in enumerate(g.disks):
            if not values.VDEV.fullmatch(d.vdev):
                raise err(f"guests[{i}].disks[{j}].vdev", f"expected xvdb..xvdz (xvda stays free), got {d.vdev!r}")
        if len(set(vdevs)) != len(vdevs):
            raise err(f"guests[{i}].disks", "expected distinct vdev names")
        if g.vcpus < 1:
            raise err(f"guests[{i}].vcpus", "expected at least 1")
        _check_frontend(g, f"guests[{i}]", err)
    total = sum(g.memory for g in s.guests) + s.dom0.memory
    if total > s.lab.memory:
        raise err("guests", f"dom0 and guests need {total >> 20} MiB, more than lab.memory")
    for i, w in enumerate(s.workloads):
        if w.guest not in names:
            raise err(f"workloads[{i}].guest", f"expected one of the guests {sorted(names)}, got {w.guest!r}")
        if w.disk not in [d.vdev for d in s.guest(w.guest).disks]:
            raise err(f"workloads[{i}].disk", f"guest '{w.guest}' has no disk {w.disk!r}")
        if not 0 <= w.rwmixread <= 100:
            raise err(f"workloads[{i}].rwmixread", "expected 0..100")
        for k in ("iodepth", "numjobs"):
            if getattr(w, k) < 1:
                raise err(f"workloads[{i}].{k}", "expected at least 1")
        if w.runtime < 1:
            # fio's runtime is whole seconds: "500ms" would be runtime=0, no limit at all
            raise err(f"workloads[{i}].runtime", f"expected at least 1s, got {w.runtime:g}s")
        if problems := values.fio_extra_problems(w.extra):
            raise err(f"workloads[{i}].extra", "; ".join(problems))
        _check_ring(s, i, err)
    for i, f in enumerate(s.faults):
        if f.kind != "pause-l1":
            if f.guest not in names:
                raise err(f"faults[{i}].guest", f"expected one of the guests {sorted(names)}, got {f.guest!r}")
            if f.disk not in [d.vdev for d in s.guest(f.guest).disks]:
                raise err(f"faults[{i}].disk", f"guest '{f.guest}' has no disk {f.disk!r}")
        if f.kind == "delay" and not 0.001 <= f.delay <= 60:
            raise err(f"faults[{i}].delay", "expected a latency between 1ms and 60s")
        if f.kind == "delay" and 3 * f.delay > s.watchdog.stall_window:
            # each delayed I/O takes `delay` to complete: with the window near or
            # below that, a disk that is slow but progressing looks hung
            raise err(f"faults[{i}].delay", f"a delay of {f.delay:g}s per I/O needs watchdog.stall_window of "
                      f"at least {3 * f.delay:g}s (3x the delay; it is {s.watchdog.stall_window:g}s): the "
                      "watchdog would call the slow disk hung (docs/scenario.md, [watchdog])")
        if f.kind == "detach-attach":
            if not 1 <= f.count <= 100:
                raise err(f"faults[{i}].count", f"expected 1..100 detach-attach cycles, got {f.count}")
            if any(w.guest == f.guest and w.disk == f.disk for w in s.workloads):
                raise err(f"faults[{i}].disk", f"{f.guest}/{f.disk} carries a workload: blkfront keeps an open "
                          "disk, so its detach would wait for the workload; churn a disk without one")
        if f.kind in ("save-restore", "reboot") and s.dom0.os == "freebsd":
            raise err(f"faults[{i}].kind", f"{f.kind} is carried out with a Linux dom0 only, so far")
        if f.kind == "corrupt" and not any(w.guest == f.guest and w.disk == f.disk and w.tool == "ring"
                                           and w.ring.persistent for w in s.workloads):
            # dm-flakey changes the byte in place, in the page blkback mapped from
            # the guest: a write's page is mapped read-only unless the grant is
            # persistent, and the dom0 kernel then oopses in corrupt_bio_data
            # (measured on 6.1: "BUG: unable to handle page fault ... permissions
            # violation"), which would be the injector's crash, not the backend's
            raise err(f"faults[{i}].kind", f"corrupt needs {f.guest}/{f.disk} driven by tool = \"ring\" with "
                      "persistent = true (and verify = true to see it): dm-flakey corrupts a write in the page "
                      "blkback mapped, which is read-only without a persistent grant (dom0 oopses)")
        if f.kind == "corrupt" and s.dom0.os == "freebsd":
            raise err(f"faults[{i}].kind", "a FreeBSD dom0 cannot corrupt a disk's data (gnop(8) delays or fails "
                      "requests): use delay, error or pause-l1")
        if f.kind == "stall" and s.dom0.os == "freebsd":
            raise err(f"faults[{i}].kind", "a FreeBSD dom0 cannot stall a disk (gnop(8) delays or fails "
                      "requests, it cannot hold them): use delay, error or pause-l1")
    if s.dom0.os == "freebsd":
        if s.backend.source or s.backend.patches:
            raise err("backend.source", "a FreeBSD dom0's backend is its kernel: give the tree as "
                      "[freebsd] src (and patches) instead")
        if s.xen.binary or s.dom0.kernel or s.dom0.initrd:
            raise err("xen.binary" if s.xen.binary else "dom0.kernel", "a FreeBSD dom0 boots Xen and its "
                      "kernel from its own disk (xen-kernel package, [freebsd] src): these keys are Linux-only")
    elif s.freebsd.src or s.freebsd.patches:
        raise err("freebsd.src", "only for dom0.os = \"freebsd\"; a Linux dom0's backend is [backend] source")
    wd = s.watchdog
    if wd.interval <= 0:
        raise err("watchdog.interval", "expected more than 0s")
    if wd.stall_window < 2 * wd.interval:
        raise err("watchdog.stall_window", "expected at least twice watchdog.interval")
    if wd.drain_window <= 0:
        raise err("watchdog.drain_window", "expected more than 0s")
    for dl in dataclasses.fields(DeadlinesCfg):
        if getattr(s.deadlines, dl.name) <= 0:
            raise err(f"deadlines.{dl.name}", "expected more than 0s (a deadline of 0 fails every wait)")
    for k in ("provision_timeout", "build_timeout"):
        if getattr(s.freebsd, k) <= 0:
            raise err(f"freebsd.{k}", "expected more than 0s")


def _check_frontend(fe: GuestCfg, path: str,
                    err: typing.Callable[[str, str], ScenarioError]) -> None:
    """A guest's blkfront parameters: -1 leaves the driver's default."""
    if fe.max_ring_page_order not in range(-1, 5):
        raise err(f"{path}.max_ring_page_order", "expected -1 (driver default) or 0..4")
    if fe.max_queues < -1 or fe.max_queues == 0:
        raise err(f"{path}.max_queues", "expected -1 (driver default) or >= 1")
    if fe.feature_persistent not in (-1, 0, 1):
        raise err(f"{path}.feature_persistent", "expected -1 (driver default), 0 (off) or 1 (on)")
    if fe.max_indirect_segments != -1 and not 0 <= fe.max_indirect_segments <= 4096:
        raise err(f"{path}.max_indirect_segments", "expected -1 (driver default) or 0..4096")


FIO_ONLY_KEYS = ("rw", "bssplit", "iodepth", "numjobs", "ioengine", "direct", "size", "extra")


def _check_ring(s: Scenario, i: int, err: typing.Callable[[str, str], ScenarioError]) -> None:
    """A workload's [workloads.ring] table, and the fio keys a ring workload has no use for."""
    w, path = s.workloads[i], f"workloads[{i}]"
    r, plain = w.ring, WorkloadCfg()
    if w.tool != "ring":
        if r != RingCfg():
            raise err(f"{path}.ring", f'only for tool = "ring" (the userspace frontend); this workload\'s tool '
                      f"is {w.tool!r}")
        return
    for k in FIO_ONLY_KEYS:
        if getattr(w, k) != getattr(plain, k):
            raise err(f"{path}.{k}", 'a fio key: a ring workload (tool = "ring") takes its options from '
                      f"[workloads.ring] ({', '.join(f.name for f in dataclasses.fields(RingCfg))}); "
                      "remove it")
    if any(f.kind == "save-restore" and f.guest == w.guest for f in s.faults):
        raise err(f"{path}.tool", f"the userspace frontend cannot follow guest {w.guest!r} through a "
                  "save-restore (it does not suspend and reconnect as blkfront does): use fio on that guest")
    others = [j for j, o in enumerate(s.workloads) if j != i and (o.guest, o.disk) == (w.guest, w.disk)]
    if others:
        raise err(f"{path}.disk", f"{w.guest}/{w.disk} also carries workloads[{others[0]}]: the userspace "
                  "frontend owns its disk (the guest's blkfront is kept off it)")
    if not 1 <= r.segments <= RING_MAX_SEGMENTS:
        raise err(f"{path}.ring.segments", f"expected 1..{RING_MAX_SEGMENTS} pages per request "
                  f"(more than 11 uses indirect descriptors), got {r.segments}")
    if not 0 <= r.ring_page_order <= 4:
        raise err(f"{path}.ring.ring_page_order", f"expected 0..4 (a ring of 1..16 pages), got {r.ring_page_order}")
    if not 1 <= r.queues <= RING_MAX_QUEUES:
        raise err(f"{path}.ring.queues", f"expected 1..{RING_MAX_QUEUES} rings (multi-queue-num-queues, capped at "
                  f"the backend's multi-queue-max-queues), got {r.queues}")
    _check_reconnects(s, i, err)
    orders = (r.ring_page_order, *r.reconnect_orders)
    smallest, largest = min(orders), max(orders)
    slots = 32 << smallest
    if not 0 <= r.depth <= slots:
        which = " (the smallest of ring_page_order and reconnect_orders)" if r.reconnect_orders else ""
        raise err(f"{path}.ring.depth", f"expected 0 (every slot) or 1..{slots} (the slots of a "
                  f"{1 << smallest}-page ring{which}), got {r.depth}")
    seen: set[str] = set()
    for j, case in enumerate(r.hostile):
        if case not in RING_HOSTILE_CASES:
            raise err(f"{path}.ring.hostile[{j}]", f"expected one of {', '.join(RING_HOSTILE_CASES)}, got {case!r}")
        if case in seen:
            raise err(f"{path}.ring.hostile[{j}]", f"{case!r} is listed twice")
        seen.add(case)
    if r.verify and r.op != "write":
        raise err(f"{path}.ring.verify", f'verify writes a pattern and reads it back: it needs op = "write", '
                  f"got op = {r.op!r}")
    if r.halt_wait <= 0:
        raise err(f"{path}.ring.halt_wait", "expected more than 0s")
    if r.hostile or r.reconnect_orders:
        # each reconnect idles `settle` before and after the close; the sampler
        # must see both, and the idle time must stay well inside the stall window
        if r.settle < 2 * s.watchdog.interval:
            raise err(f"{path}.ring.settle", f"expected at least twice watchdog.interval "
                      f"({2 * s.watchdog.interval:g}s): the dom0 sampler must see each connection's last "
                      f"statistics and their restart, got {r.settle:g}s")
        idle = 2 * r.settle + (r.halt_wait if "prod-ahead" in r.hostile else 0)
        if idle >= s.watchdog.stall_window:
            raise err(f"{path}.ring.settle", f"a reconnect idles {idle:g}s (2 x settle"
                      f"{' + halt_wait' if 'prod-ahead' in r.hostile else ''}), not less than "
                      f"watchdog.stall_window ({s.watchdog.stall_window:g}s): it would read as a stall")
    # one connection's grants at a time (a close frees them): the largest rings',
    # each queue's as many as one ring's
    slots = r.depth or 32 << largest
    grants = r.queues * ((1 << largest) + slots * (r.segments + (-(-r.segments // 512) if r.segments > 11 else 0)))
    if grants > RING_GRANT_LIMIT:
        queues = f"{r.queues} queues of " if r.queues > 1 else ""
        raise err(f"{path}.ring", f"{queues}{slots} slots of {r.segments} pages need {grants} grants, more than "
                  f"the {RING_GRANT_LIMIT} the lab gives xen-gntalloc: lower depth, segments or queues")
    disk = next(d for d in s.guest(w.guest).disks if d.vdev == w.disk)
    blocks = disk.size // (r.segments * 4096)
    if r.verify and blocks < 2 * slots * r.queues:
        raise err(f"{path}.ring.verify", f"verify needs at least {2 * slots * r.queues} blocks of {r.segments * 4} KiB on "
                  f"{w.guest}/{w.disk} ({disk.size} bytes holds {blocks})")


def _check_reconnects(s: Scenario, i: int, err: typing.Callable[[str, str], ScenarioError]) -> None:
    """A ring workload's reconnect schedule: orders blkring takes, phases long
    enough to mean something, and reconnect idle time the lab's deadline covers."""
    w, key = s.workloads[i], f"workloads[{i}].ring.reconnect_orders"
    orders = w.ring.reconnect_orders
    if not orders:
        return
    for j, order in enumerate(orders):
        if not 0 <= order <= 4:
            raise err(f"{key}[{j}]", f"expected a ring page order 0..4 (a ring of 1..16 pages), got {order}")
    if len(orders) > RING_MAX_RECONNECTS:
        raise err(key, f"expected at most {RING_MAX_RECONNECTS} reconnects, got {len(orders)}")
    phases = len(orders) + 1
    if w.runtime / phases < RING_MIN_PHASE:
        raise err(key, f"runtime {w.runtime:g}s split into {phases} phases leaves {w.runtime / phases:g}s each; "
                  f"expected at least {RING_MIN_PHASE:g}s per phase: raise workloads[{i}].runtime to "
                  f"{RING_MIN_PHASE * phases:g}s or list fewer orders")
    # the phases share the runtime's I/O time; each reconnect's idle (2 x settle)
    # comes on top, inside the lab's grace for the workload
    idle = len(orders) * 2 * w.ring.settle
    if idle > s.deadlines.workload_grace / 2:
        raise err(key, f"{len(orders)} reconnects idle {idle:g}s (2 x settle each) beyond the runtime, more than "
                  f"half of deadlines.workload_grace ({s.deadlines.workload_grace:g}s), which also covers the "
                  "drain and each connect: lower settle or list fewer orders")


def _check_text(s: Scenario, err: typing.Callable[[str, str], ScenarioError]) -> None:
    """Every text value that reaches a command line, a config file or a job file."""

    def check(path: str, value: str, kind: str) -> None:
        if problem := values.text_problem(value, kind):
            raise err(path, f"expected {problem}")

    check("lab.cpu_model", s.lab.cpu_model, "cpu_model")
    check("xen.cmdline", s.xen.cmdline, "cmdline")
    check("dom0.cmdline", s.dom0.cmdline, "cmdline")
    for key in ("xen.binary", "dom0.kernel", "dom0.initrd", "freebsd.image", "freebsd.packages", "freebsd.src",
                "backend.source"):
        section, name = key.split(".")
        check(key, getattr(getattr(s, section), name), "path")
    for key in ("dom0.kernel", "dom0.initrd"):
        # QEMU's multiboot -initrd takes a module's path up to the first space
        if " " in getattr(s.dom0, key.split(".")[1]):
            raise err(key, "expected a path without spaces (QEMU passes dom0's kernel and initrd as "
                      "multiboot modules, whose path ends at the first space)")
    for j, patch in enumerate(s.freebsd.patches):
        check(f"freebsd.patches[{j}]", patch, "path")
    for j, patch in enumerate(s.backend.patches):
        check(f"backend.patches[{j}]", patch, "path")
    check("freebsd.version", s.freebsd.version, "freebsd_version")
    check("freebsd.kernconf", s.freebsd.kernconf, "kernconf")
    for i, g in enumerate(s.guests):
        check(f"guests[{i}].cmdline", g.cmdline, "cmdline")
        check(f"guests[{i}].kernel", g.kernel, "path")
        check(f"guests[{i}].initrd", g.initrd, "path")
    for i, w in enumerate(s.workloads):
        check(f"workloads[{i}].bssplit", w.bssplit, "bssplit")
        check(f"workloads[{i}].size", w.size, "fio_size")


def load(spec: str | Path) -> Scenario:
    """Load a preset name (lab/scenarios/NAME.toml) or a path to a TOML file."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{spec}.toml"
        if not path.exists():
            raise ScenarioError(
                f"no scenario '{spec}': not a file, and not a preset ({', '.join(presets())})"
            )
    if path.exists() and not path.is_file():
        raise ScenarioError(f"{path}: expected a TOML file, found a {'directory' if path.is_dir() else 'special file'}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8") from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot be read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    return from_dict(raw, str(path))


def from_dict(raw: dict[str, Any], where: str = "<scenario>") -> Scenario:
    raw = dict(raw)
    raw.setdefault("name", Path(where).stem if where.endswith(".toml") else "")
    s = values.build(Scenario, raw, "", where)
    s = dataclasses.replace(s, source=where)
    _check(s, where)
    return s


def presets() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def to_dict(obj: Any) -> Any:
    """The resolved scenario as plain data (written into every results directory)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_toml(obj: Any) -> str:
    """Render the resolved scenario back to TOML (small writer: our schema only).
    It always parses back to the same data: keys that are not bare TOML keys are
    quoted, strings escaped, floats written so TOML reads the same float."""
    lines: list[str] = []

    def string(v: str) -> str:
        text = v.replace("\\", "\\\\").replace('"', '\\"')
        # a TOML basic string cannot hold control characters (a multi-line
        # description's newlines) raw; tab is the one allowed
        text = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", text)
        return '"' + text + '"'

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else string(k)

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(int(v))
        if isinstance(v, float):
            # "30.0", "1e-05", "inf": TOML floats that read back bit for bit
            return repr(float(v))
        return string(str(v))

    def is_table_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(path: list[str], d: dict[str, Any], array: bool = False) -> None:
        nested = {k: v for k, v in d.items() if (isinstance(v, dict) and v) or is_table_list(v)}
        if path:
            header = ".".join(key(k) for k in path)
            lines.append(f"\n[[{header}]]" if array else f"\n[{header}]")
        for k, v in d.items():
            if k in nested:
                continue
            if isinstance(v, dict):
                lines.append(f"{key(k)} = {{}}")
            elif isinstance(v, list):
                lines.append(f"{key(k)} = [{', '.join(scalar(x) for x in v)}]")
            else:
                lines.append(f"{key(k)} = {scalar(v)}")
        for k, v in nested.items():
            if isinstance(v, list):
                for item in v:
                    emit([*path, k], item, array=True)
            else:
                emit([*path, k], v)

    data = to_dict(obj)
    data.pop("source", None)
    emit([], data)
    return "\n".join(lines).lstrip() + "\n"


def user_file(sc: Scenario, value: str, key: str) -> Path | None:
    """A file the scenario names (its own Xen, kernel, initrd), or None."""
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_file():
        raise LabError("image", f"{sc.source}: key '{key}': expected an existing file, got {value!r}")
    return p.resolve()
