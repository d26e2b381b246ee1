"""Everything that differs by operating system, behind small protocols, picked
from plain tables (style.md: testinfra's get_module_class).

A *dom0 platform* works on L0: it prepares the media (images, kernels, caches),
chooses the accelerator, says how the Xen VM boots (its QEMU spec and the console
milestones to wait for), puts the backend under test in place and proves which
one runs, and adds its own verdict rules over the sampled counters. Inside the
running dom0 it hands out a *dom0 ops* object bound to dom0's runner: disks by
serial, backing devices and the fault actions on them, the counter sampler, the
clock, the evidence commands.

A *guest platform* knows a guest OS: its image, the kernel command line that
sets the frontend's ring and queues, the test disk's device name, the guest's own
I/O counters and their parser.

The pipeline (lab/pipeline.py) never asks which OS it runs: it asks these. The
tables that pick a class per OS are in lab/platforms.py (outside this package,
so that the OS packages can import these types without an import cycle)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from lab import qemu, scenario
    from lab.console import Milestone
    from lab.images import Image, Keys
    from lab.runner import LocalRunner, Runner
    from lab.watchdog import Track
    from lab.xen import VbdInfo


@dataclass(frozen=True)
class Backing:
    """The dom0 block device that serves one guest test disk."""

    name: str  # device-mapper name (Linux) or the provider's name (FreeBSD)
    path: str  # what xl's disk target points at
    lower: str  # the virtio disk under it
    kname: str  # where its in-flight count lives (dm-N, vtbdN.nop)


@dataclass(frozen=True)
class Media:
    """What a dom0 platform prepared on L0 for one run (all cached, read-only)."""

    dom0_root: tuple[Path, str]  # dom0's base disk and its format ("raw", "qcow2")
    guest: Image  # the Linux guest image: kernel + initrd holding the guest's whole root
    keys: Keys
    record: dict[str, Any]  # what record.json's "images" says
    accel: str  # "kvm" or "tcg": each platform chooses in its own order (Linux probes its own Xen)
    accel_reason: str
    private: Any = None  # the platform's own (Linux: the dom0 image; FreeBSD: the provisioned image)
    scratch: tuple[Path, ...] = ()  # directories the run removes at its end (links made for QEMU)


@dataclass(frozen=True)
class BootStep:
    """One console milestone of a cold boot, with its own deadline."""

    name: str  # the key in record.json's "boot" (seconds since QEMU started)
    milestone: Milestone
    seconds: float


@dataclass(frozen=True)
class Finding:
    """A platform rule's conclusion about the system under test."""

    verdict: Literal["FAIL", "HANG"]
    disk: str  # guest/vdev
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rules:
    """A platform's verdict rules over the sampled tracks: findings, and what the
    record shows about them (record.json key -> value)."""

    findings: tuple[Finding, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)


class Dom0Base:
    """What every dom0 ops class shares: the runner and one way to run a script."""

    def __init__(self, runner: Runner, *, timeout: float) -> None:
        self.r = runner
        self.timeout = timeout

    def sh(self, script: str, *, stage: str, timeout: float | None = None) -> str:
        return self.r.run(["sh", "-c", script], timeout=timeout or self.timeout).check(stage).stdout


def parse_key_values(text: str) -> dict[str, str]:
    """key=value lines (the dom0 ops' fact scripts) into a dict; others skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip():
            out[k.strip()] = v.strip()
    return out


class Dom0Ops(Protocol):
    """Inside a running dom0, over its runner (ssh)."""

    os: str
    block_script: str | None  # the test disks' hotplug script in dom0 (None: xl's default)

    def disk_by_serial(self, serial: str) -> str: ...
    def make_backing(self, name: str, lower: str) -> Backing: ...
    def backing_by_serial(self, serial: str) -> Backing: ...  # the disk QEMU gave `serial`, named after it
    def remove_backing(self, b: Backing) -> None: ...
    def mount_boot_disk(self, serial: str, where: str) -> None: ...
    def set_clock(self, epoch: int) -> None: ...
    def sample_argv(self, interval: str, disks: list[tuple[VbdInfo, Backing]]) -> list[str]: ...
    @staticmethod
    def parse_sample(values: list[str | None], n: int) -> list[dict[str, int] | None]: ...
    def fault_script(self, kind: str, b: Backing, *, delay_ms: int = 0) -> str: ...
    def release_scripts(self, kind: str, b: Backing) -> list[str]: ...
    def evidence_commands(self) -> list[tuple[str, list[str]]]: ...
    def backend_module(self) -> dict[str, str]: ...
    def backend_leftovers(self, domids: list[int], backings: list[Backing]) -> list[str]: ...
    def point_vbd(self, b: Backing, vbd_sysfs: str) -> None: ...
    def leftovers_then_unload(self, domids: list[int], backings: list[Backing]) -> tuple[list[str], str | None]: ...


@dataclass(frozen=True)
class BackendCtx:
    """What putting the backend under test in place may use."""

    sc: scenario.Scenario
    media: Media
    ops: Dom0Ops
    l0: LocalRunner
    results: Path
    put: Callable[[Path, str], object]  # copy an L0 file into dom0


class Dom0Platform(Protocol):
    """One per dom0 OS (DOM0_PLATFORMS)."""

    os: str
    warm_start: bool  # may a booted L1 be saved and restored (l1state)
    vif_script: str | None  # the guests' vif hotplug script in dom0 (None: xl's default)
    direct_boot: bool  # QEMU boots Xen with -kernel (the state key covers those files)

    def media(self, sc: scenario.Scenario, *, l0: LocalRunner, results: Path, work: Path, accel: str) -> Media:
        """Images and media ready (cached), the accelerator chosen ("auto" or forced);
        raises LabError("image") naming what is missing and the key that supplies it."""
        ...
    def vm_spec(self, sc: scenario.Scenario, media: Media, *, accel: str, drives: list[qemu.Drive],
                console_log: Path, qmp_sock: Path | None, ssh_port: int, extra: Sequence[str] = ()
                ) -> qemu.VmSpec: ...
    def boot_steps(self, sc: scenario.Scenario) -> list[BootStep]: ...
    def ops(self, runner: Runner, *, timeout: float) -> Dom0Ops: ...
    def install_backend(self, ctx: BackendCtx) -> dict[str, Any]: ...
    def rules(self, sc: scenario.Scenario, tracks: Sequence[Track], *, final: bool) -> Rules: ...
    def plan(self, sc: scenario.Scenario) -> list[dict[str, Any]]: ...
    def with_backend_source(self, sc: scenario.Scenario, src: Path) -> scenario.Scenario:
        """The scenario with `src` as the tree of the backend under test (lab bisect)."""
        ...
    def preflight(self, sc: scenario.Scenario) -> None:
        """What `lab run` would refuse first, in seconds (missing media), before a bisect starts."""
        ...


class GuestPlatform(Protocol):
    """One per guest OS (GUEST_PLATFORMS)."""

    os: str

    def image(self, *, l0: LocalRunner) -> Image: ...
    def cmdline(self, g: scenario.GuestCfg, *, ip: str, rebooted: bool = False) -> str: ...
    @staticmethod
    def frontend_params(g: scenario.GuestCfg) -> dict[str, str]: ...
    @classmethod
    def frontend_argv(cls, g: scenario.GuestCfg) -> list[str]:
        """(Re)load the frontend with g's limits and print them as loaded."""
        ...
    @staticmethod
    def parse_blkfront_params(text: str) -> dict[str, str]: ...
    @staticmethod
    def set_clock_argv(epoch: int) -> list[str]: ...
    @staticmethod
    def io_check_argv(vdev: str, *, mib: int = 4) -> list[str]: ...
    @staticmethod
    def disk_device(vdev: str) -> str: ...
    @staticmethod
    def disk_present_argv(vdev: str, *, wait_s: float = 0.0) -> list[str]: ...
    def stat_argv(self, interval: str, vdevs: Sequence[str], *, ring: Collection[str] = ()) -> list[str]:
        """The guest's sampler; a disk in `ring` is driven by the userspace frontend."""
        ...
    @staticmethod
    def parse_stat(value: str | None) -> dict[str, int] | None: ...
    def blkfront_params(self, runner: Runner, *, timeout: float) -> dict[str, str]: ...
    # a disk for the userspace frontend (lab/ringfront.py): attached with blkfront kept off
    @staticmethod
    def userspace_frontend_argv(grant_limit: int = ...) -> list[str]: ...
    @staticmethod
    def autoprobe_argv(on: bool) -> list[str]: ...
    @staticmethod
    def vbd_binding_argv(devid: int) -> list[str]: ...
    @staticmethod
    def parse_vbd_binding(text: str) -> str: ...
