"""dom0 per OS, picked from a plain table: where the backend's counters live, how
a guest disk's backing device is made, what backend is loaded. Only Linux exists
so far; FreeBSD (sysctl dev.xbbd) plugs in as another class with the same methods."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.runner import Runner

# blkback's per-vbd statistics, summed over the vbd's rings (facts/linux-blkback-module.md)
VBD_STATS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect")


@dataclass(frozen=True)
class Backing:
    """The dom0 block device that serves one guest disk."""

    name: str  # device-mapper name
    path: str  # /dev/mapper/NAME: what xl's target points at
    lower: str  # the virtio disk under it (/dev/vdX)
    kname: str  # dm-N: where its in-flight count lives in sysfs


class LinuxDom0:
    os = "linux"

    def __init__(self, runner: Runner, *, timeout: float) -> None:
        self.r = runner
        self.timeout = timeout

    def sh(self, script: str, *, stage: str, timeout: float | None = None) -> str:
        return self.r.run(["sh", "-c", script], timeout=timeout or self.timeout).check(stage).stdout

    def disk_by_serial(self, serial: str) -> str:
        """The virtio disk QEMU gave this serial (no udev here, so no by-id links)."""
        out = self.sh(
            "for f in /sys/block/vd*/serial; do "
            f'[ "$(cat $f)" = {shlex.quote(serial)} ] && echo "${{f%/serial}}"; done; true',
            stage="guest:disk",
        )
        names = [line.rsplit("/", 1)[-1] for line in out.split()]
        if len(names) != 1:
            raise LabError("guest:disk", f"dom0 has {len(names)} virtio disks with serial {serial!r}")
        return f"/dev/{names[0]}"

    def make_backing(self, name: str, lower: str) -> Backing:
        """A dm-linear device over `lower`: faults later suspend, delay or fail it
        without touching the guest's configuration."""
        # --noudevsync + mknodes: there is no udev in the lab's dom0 to wait for.
        out = self.sh(
            f"set -e; n=$(blockdev --getsz {shlex.quote(lower)}); "
            f"dmsetup create --noudevsync {shlex.quote(name)} --table \"0 $n linear {lower} 0\"; "
            f"dmsetup mknodes {shlex.quote(name)}; "
            f"dmsetup info -c --noheadings -o minor {shlex.quote(name)}",
            stage="guest:disk",
        )
        return Backing(name, f"/dev/mapper/{name}", lower, f"dm-{int(out.strip())}")

    def remove_backing(self, b: Backing) -> None:
        self.r.run(["dmsetup", "resume", "--noudevsync", b.name], timeout=self.timeout)
        self.r.run(["dmsetup", "remove", "--noudevsync", b.name], timeout=self.timeout)

    def stat_paths(self, vbd_sysfs: str, backing: Backing) -> list[str]:
        base = f"/sys/bus/xen-backend/devices/{vbd_sysfs}/statistics"
        return [f"{base}/{s}" for s in VBD_STATS] + [f"/sys/block/{backing.kname}/inflight"]

    def backend_module(self) -> dict[str, str]:
        """What backend is loaded: the record states it; patched backends compare it."""
        out = self.r.run(["sh", "-c", BACKEND_INFO], timeout=self.timeout).stdout
        return parse_key_values(out)

    def install_backend(self, ko: Path, expect_build_id: str | None, *, put: Callable[[Path, str], object]) -> dict:
        """Swap the stock xen-blkback for `ko` (no vbd exists yet), and prove it is
        the one loaded: a run with anything else loaded is an ERROR, never a PASS."""
        put(ko, "/run/lab/xen-blkback.ko")
        self.sh("rmmod xen_blkback; insmod /run/lab/xen-blkback.ko", stage="backend")
        loaded = self.backend_module()
        if not expect_build_id or loaded.get("build_id") != expect_build_id:
            raise LabError("backend", f"dom0 runs xen-blkback with build-id {loaded.get('build_id')!r}, "
                           f"not the one built ({expect_build_id!r})")
        return loaded

    def mount_boot_disk(self, serial: str, where: str) -> None:
        """The read-only disk with the guests' kernels (cheaper than copying them
        over SSH, whose crypto runs emulated in dom0)."""
        dev = self.disk_by_serial(serial)
        # --flushbufs: after a restore, dom0's buffer cache may hold blocks of the
        # boot disk of the run that saved the state; this run's disk differs.
        self.sh(f"blockdev --flushbufs {dev} && mkdir -p {where} && mount -t ext4 -o ro,noload {dev} {where}",
                stage="guest:create")


# One line per fact, key=value; a missing fact prints an empty value.
BACKEND_INFO = r"""
m=xen_blkback
echo "kernel=$(uname -r)"
echo "module_path=$(modinfo -n $m 2>/dev/null)"
echo "srcversion=$(modinfo -F srcversion $m 2>/dev/null)"
echo "vermagic=$(modinfo -F vermagic $m 2>/dev/null)"
echo "build_id=$(od -An -tx1 -v /sys/module/$m/notes/.note.gnu.build-id 2>/dev/null | tr -d ' \n' | cut -c33-)"
echo "taint=$(cat /sys/module/$m/taint 2>/dev/null)"
for p in /sys/module/$m/parameters/*; do echo "param.${p##*/}=$(cat $p)"; done
"""


def parse_key_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip():
            out[k.strip()] = v.strip()
    return out


def parse_vbd_sample(values: list[str | None]) -> dict[str, int] | None:
    """One dom0 sample of `stat_paths`: the 7 statistics then 'reads writes' in flight."""
    if len(values) != len(VBD_STATS) + 1 or any(v is None for v in values):
        return None
    try:
        stats = {k: int(str(v).strip()) for k, v in zip(VBD_STATS, values, strict=False)}
        r, w = str(values[-1]).split()[:2]
    except ValueError:
        return None
    stats["backing_inflight"] = int(r) + int(w)
    stats["taken"] = stats["rd_req"] + stats["wr_req"] + stats["f_req"] + stats["ds_req"]
    return stats


DOM0_CLASSES = {"linux": LinuxDom0}
