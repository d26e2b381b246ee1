"""The Linux PV guest (`GuestPlatform`): its image (kernel + an initramfs holding
its whole root, so no disk served by the backend under test is needed to boot),
blkfront's parameters, the test disk's device and the guest's own view of it
(completed and in-flight I/O from /sys/block/X/stat)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from lab import images
from lab.runner import LocalRunner, Runner
from lab.scenario import GuestCfg

# /sys/block/X/stat fields (Documentation/block/stat.rst), 0-based
_READS, _WRITES, _INFLIGHT, _DISCARDS, _FLUSHES = 0, 4, 8, 11, 15


def parse_block_stat(text: str | None) -> dict[str, int] | None:
    """/sys/block/X/stat into completed (reads+writes+discards+flushes) and inflight."""
    if text is None:
        return None
    f = text.split()
    if len(f) < 11 or not all(x.isdigit() for x in f):
        return None
    n = [int(x) for x in f]

    def get(i: int) -> int:  # older kernels have fewer fields
        return n[i] if i < len(n) else 0

    return {
        "reads": n[_READS],
        "writes": n[_WRITES],
        "discards": get(_DISCARDS),
        "flushes": get(_FLUSHES),
        "completed": n[_READS] + n[_WRITES] + get(_DISCARDS) + get(_FLUSHES),
        "inflight": n[_INFLIGHT],
        "sectors_read": n[_READS + 2],
        "sectors_written": n[_WRITES + 2],
    }


class LinuxGuest:
    os = "linux"

    def image(self, *, l0: LocalRunner) -> images.Image:
        return images.ensure_image("linux-guest", runner=l0)

    def cmdline(self, g: GuestCfg, *, ip: str) -> str:
        # ramfs: the root is the initramfs, and the default (tmpfs) caps it at half
        # the guest's memory, which the 135 MiB root does not fit at 320 MiB
        return " ".join([g.cmdline, "rootfstype=ramfs", f"lab.ip={ip}", f"lab.name={g.name}"])

    @staticmethod
    def frontend_params(g: GuestCfg) -> dict[str, str]:
        """The scenario's ring and queue limits for blkfront (-1: the driver's default)."""
        params = {}
        if g.max_ring_page_order >= 0:
            params["max_ring_page_order"] = str(g.max_ring_page_order)
        if g.max_queues >= 0:
            params["max_queues"] = str(g.max_queues)
        return params

    @classmethod
    def frontend_argv(cls, g: GuestCfg) -> list[str]:
        """(Re)load blkfront with the scenario's limits before any test disk is
        attached: its parameters are read when a device connects, and no disk
        uses it yet, so unloading is safe (the guest's init may have loaded it)."""
        params = " ".join(f"{k}={v}" for k, v in cls.frontend_params(g).items())
        return ["sh", "-c", f"modprobe -r xen_blkfront 2>/dev/null; modprobe xen_blkfront {params}".rstrip()]

    @staticmethod
    def disk_device(vdev: str) -> str:
        return f"/dev/{vdev}"

    @staticmethod
    def disk_present_argv(vdev: str) -> list[str]:
        return ["test", "-b", f"/dev/{vdev}"]

    def stat_argv(self, interval: str, vdevs: Sequence[str]) -> list[str]:
        return ["lab-sample", interval, *[f"/sys/block/{v}/stat" for v in vdevs]]

    @staticmethod
    def parse_stat(value: str | None) -> dict[str, int] | None:
        return parse_block_stat(value)

    def blkfront_params(self, runner: Runner, *, timeout: float) -> dict[str, str]:
        res = runner.run(["sh", "-c", "cd /sys/module/xen_blkfront/parameters && grep -H . *"], timeout=timeout)
        out = {}
        for line in res.stdout.splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
        return out

    @staticmethod
    def console_path(name: str) -> str:
        """Where dom0's xenconsoled logs this guest's console."""
        return f"/var/log/xen/console/guest-{shlex.quote(name)}.log"
