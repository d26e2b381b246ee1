"""The Linux PV guest (`GuestPlatform`): its image (kernel + an initramfs holding
its whole root, so no disk served by the backend under test is needed to boot),
blkfront's parameters, the test disk's device and the guest's own view of it
(completed and in-flight I/O from /sys/block/X/stat, or from the userspace
frontend's stat file for a disk it drives), and the commands that keep blkfront
off such a disk."""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence

from lab import images, ringfront
from lab.runner import LocalRunner, Runner
from lab.scenario import RING_GRANT_LIMIT, GuestCfg
from lab.timing import sh_poll

FRONTEND_PARAMS = ("max_ring_page_order", "max_queues", "feature_persistent", "max_indirect_segments")

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


# ---------------------------------------------- the userspace frontend's disks
AUTOPROBE = "/sys/bus/xen/drivers_autoprobe"
XEN_DEVICES = ("/dev/xen/xenbus", "/dev/xen/gntalloc", "/dev/xen/evtchn")


def userspace_frontend_argv(grant_limit: int = RING_GRANT_LIMIT) -> list[str]:
    """Make the guest ready for blkring: its two modules (no udev loads them),
    gntalloc allowed `grant_limit` grants (its default, 1024, is less than a
    full ring of multi-page requests), then one line on stdout for each thing
    still missing (nothing: ready)."""
    lim = "/sys/module/xen_gntalloc/parameters/limit"
    script = (
        "for m in xen-evtchn xen-gntalloc; do modprobe $m 2>&1 | sed \"s/^/modprobe $m: /\"; done; "
        f"[ -w {lim} ] && echo {int(grant_limit)} > {lim}; "
        f"for d in {' '.join(XEN_DEVICES)}; do [ -c $d ] || echo \"no $d\"; done; "
        f"command -v {ringfront.BINARY} >/dev/null || echo \"no {ringfront.BINARY} in PATH "
        "(the guest image predates the userspace frontend?)\"; "
        f"[ -w {AUTOPROBE} ] || echo \"no writable {AUTOPROBE}\"; true"
    )
    return ["sh", "-c", script]


def autoprobe_argv(on: bool) -> list[str]:
    """Whether a new Xen device in the guest gets a driver (blkfront for a vbd)
    when it appears. 0 keeps blkfront off a disk attached meanwhile; it applies
    to every Xen device, so it goes back to 1 right after."""
    return ["sh", "-c", f"echo {1 if on else 0} > {AUTOPROBE}"]


def vbd_binding_argv(devid: int) -> list[str]:
    """One word: is the guest's vbd-<devid> bound to a driver, unbound, or not
    there (yet)?"""
    d = f"/sys/bus/xen/devices/vbd-{int(devid)}"
    return ["sh", "-c", f"if [ ! -e {d} ]; then echo absent; elif [ -e {d}/driver ]; then "
            f"echo bound; else echo unbound; fi"]


def parse_vbd_binding(text: str) -> str:
    """`vbd_binding_argv`'s answer: "absent", "bound", "unbound", or "" for anything else."""
    word = text.strip()
    return word if word in ("absent", "bound", "unbound") else ""


def parse_module_params(text: str) -> dict[str, str]:
    """`grep -H . *` in /sys/module/M/parameters; a bool reads Y/N there, written
    1/0 to modprobe: normalised to 1/0 so the two compare."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        out[k] = {"Y": "1", "N": "0"}.get(v, v)
    return out


BLKFRONT_PARAMS = "cd /sys/module/xen_blkfront/parameters && grep -H . *"


class LinuxGuest:
    os = "linux"

    def image(self, *, l0: LocalRunner) -> images.Image:
        return images.ensure_image("linux-guest", runner=l0)

    def cmdline(self, g: GuestCfg, *, ip: str, rebooted: bool = False) -> str:
        # ramfs: the root is the initramfs, and the default (tmpfs) caps it at half
        # the guest's memory, which the 135 MiB root does not fit at 320 MiB.
        # blkfront's limits go on the command line only for a guest a fault reboots
        # (modprobe reads module.param there): its init loads blkfront with the
        # disks already there, and it must negotiate what the scenario says. Any
        # other guest gets them at attach (frontend_argv), so a guest saved with L1
        # (warm start) does not depend on the ring the scenario asks for.
        blkfront = [f"xen_blkfront.{k}={v}" for k, v in self.frontend_params(g).items()] if rebooted else []
        return " ".join([g.cmdline, "rootfstype=ramfs", f"lab.ip={ip}", f"lab.name={g.name}", *blkfront])

    @staticmethod
    def frontend_params(g: GuestCfg) -> dict[str, str]:
        """The scenario's blkfront parameters (-1: the driver's default), as
        modprobe takes them."""
        params = {}
        for k in FRONTEND_PARAMS:
            v = getattr(g, k)
            if v >= 0:
                params[k] = str(v)
        return params

    @classmethod
    def frontend_argv(cls, g: GuestCfg) -> list[str]:
        """(Re)load blkfront with the scenario's limits before any test disk is
        attached: its parameters are read when a device connects, and no disk
        uses it yet, so unloading is safe (the guest's init may have loaded it)."""
        params = " ".join(f"{k}={v}" for k, v in cls.frontend_params(g).items())
        # then print the parameters it took (parse_blkfront_params), in the same round trip
        return ["sh", "-c", f"modprobe -r xen_blkfront 2>/dev/null; modprobe xen_blkfront {params}".rstrip()
                + f" && {BLKFRONT_PARAMS}"]

    @staticmethod
    def parse_blkfront_params(text: str) -> dict[str, str]:
        return parse_module_params(text)

    @staticmethod
    def set_clock_argv(epoch: int) -> list[str]:
        """A guest restored with L1 kept the time it was saved at."""
        return ["date", "-u", "-s", f"@{int(epoch)}"]

    @staticmethod
    def io_check_argv(vdev: str, *, mib: int = 4) -> list[str]:
        """Direct reads through a freshly connected disk, in 64 KiB requests."""
        return ["dd", f"if=/dev/{vdev}", "of=/dev/null", "bs=64k", f"count={mib * 16}", "iflag=direct"]

    @staticmethod
    def disk_device(vdev: str) -> str:
        return f"/dev/{vdev}"

    @staticmethod
    def disk_present_argv(vdev: str, *, wait_s: float = 0.0) -> list[str]:
        """The disk's block device is there; with wait_s, waited for that long
        first (blkfront adds it just after the backend reads Connected)."""
        if wait_s <= 0:
            return ["test", "-b", f"/dev/{vdev}"]
        return ["sh", "-c", sh_poll(f"test -b /dev/{shlex.quote(vdev)}", wait_s, "exit 1")]

    def stat_argv(self, interval: str, vdevs: Sequence[str], *, ring: Collection[str] = ()) -> list[str]:
        """The guest's sampler: each disk's /sys/block/X/stat, or for a disk in
        `ring` (driven by the userspace frontend: no block device) its stat file."""
        return ["lab-sample", interval,
                *[ringfront.stat_path(v) if v in ring else f"/sys/block/{v}/stat" for v in vdevs]]

    @staticmethod
    def parse_stat(value: str | None) -> dict[str, int] | None:
        if value is not None and value.startswith("blkring"):
            return ringfront.parse_stat(value)
        return parse_block_stat(value)

    # a disk for the userspace frontend: attached with blkfront kept off (lab/guests.py)
    @staticmethod
    def userspace_frontend_argv(grant_limit: int = RING_GRANT_LIMIT) -> list[str]:
        return userspace_frontend_argv(grant_limit)

    @staticmethod
    def autoprobe_argv(on: bool) -> list[str]:
        return autoprobe_argv(on)

    @staticmethod
    def vbd_binding_argv(devid: int) -> list[str]:
        return vbd_binding_argv(devid)

    @staticmethod
    def parse_vbd_binding(text: str) -> str:
        return parse_vbd_binding(text)

    def blkfront_params(self, runner: Runner, *, timeout: float) -> dict[str, str]:
        res = runner.run(["sh", "-c", BLKFRONT_PARAMS], timeout=timeout)
        return parse_module_params(res.stdout)

    @staticmethod
    def console_path(name: str) -> str:
        """Where dom0's xenconsoled logs this guest's console."""
        return f"/var/log/xen/console/guest-{shlex.quote(name)}.log"
