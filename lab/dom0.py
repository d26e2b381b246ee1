"""dom0 per OS, picked from a plain table: where the backend's counters live and
how they are sampled, how a guest disk's backing device is made and how faults
act on it, what backend is loaded, what evidence a hang collects. Linux: sysfs
statistics and device-mapper. FreeBSD: `sysctl dev.xbbd` and gnop(8)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.runner import Runner
from lab.xen import VbdInfo

# blkback's per-vbd statistics, summed over the vbd's rings (facts/linux-blkback-module.md)
VBD_STATS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect")


@dataclass(frozen=True)
class Backing:
    """The dom0 block device that serves one guest disk."""

    name: str  # device-mapper name
    path: str  # /dev/mapper/NAME: what xl's target points at
    lower: str  # the virtio disk under it (/dev/vdX)
    kname: str  # dm-N: where its in-flight count lives in sysfs


class _Dom0:
    """What every dom0 class shares: the runner and one way to run a script."""

    def __init__(self, runner: Runner, *, timeout: float) -> None:
        self.r = runner
        self.timeout = timeout

    def sh(self, script: str, *, stage: str, timeout: float | None = None) -> str:
        return self.r.run(["sh", "-c", script], timeout=timeout or self.timeout).check(stage).stdout


class LinuxDom0(_Dom0):
    os = "linux"


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

    def set_clock(self, epoch: int) -> None:
        self.r.run(["date", "-u", "-s", f"@{epoch}"], timeout=self.timeout)

    def sample_argv(self, interval: str, disks: list[tuple[VbdInfo, Backing]]) -> list[str]:
        """One long-lived sampler for every test disk (images/common/lab-sample)."""
        return ["lab-sample", interval, *[p for v, b in disks for p in self.stat_paths(v.sysfs_name, b)]]

    @staticmethod
    def parse_sample(values: list[str | None], n: int) -> list[dict[str, int] | None]:
        per = len(values) // max(1, n)
        return [parse_vbd_sample(values[i * per:(i + 1) * per]) for i in range(n)]

    # faults act on the dm-linear device blkback submits to (faults.py)
    def fault_script(self, kind: str, b: Backing, *, delay_ms: int = 0) -> str:
        from lab import faults

        if kind == "stall":
            return f"dmsetup suspend --noudevsync {b.name}"
        if kind == "delay":
            return faults.delay_script(b, delay_ms)
        return faults.swap_table_script(b, faults.dm_table("error", b))

    def release_scripts(self, kind: str, b: Backing) -> list[str]:
        from lab import faults

        if kind == "stall":
            return [f"dmsetup resume --noudevsync {b.name}"]
        out = [faults.swap_table_script(b, faults.dm_table("linear", b))]
        if kind == "delay":
            out.append(f"dmsetup remove --noudevsync {b.name}-delay")
        return out

    def evidence_commands(self) -> list[tuple[str, list[str]]]:
        return [
            ("xl-list", ["xl", "list"]),
            ("xl-dmesg", ["xl", "dmesg"]),
            ("xenstore-backend", ["xenstore-ls", "-f", "/local/domain/0/backend"]),
            ("dom0-vbd-stats", ["sh", "-c", "grep -H . /sys/bus/xen-backend/devices/vbd-*/statistics/*"]),
            ("dom0-inflight", ["sh", "-c", "grep -H . /sys/block/*/inflight"]),
            ("dom0-dmsetup", ["sh", "-c", "dmsetup info; dmsetup table"]),
            # Xen's own view: 'q' dumps domain and vCPU state into the Xen console ring
            ("xen-debug-keys-q", ["sh", "-c", "xl debug-keys q && xl dmesg | tail -n 300"]),
            # blocked (D-state) task stacks in dom0, then its whole kernel log
            ("dom0-blocked-tasks", ["sh", "-c", "echo w > /proc/sysrq-trigger; dmesg | tail -n 300"]),
            ("dom0-dmesg", ["dmesg"]),
        ]

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


# ---------------------------------------------------------------- FreeBSD
# blkback (xbbd) is built into FreeBSD's kernel; its counters are sysctl nodes
# dev.xbbd.<unit>.*, each unit naming its xenstore node (xenbusb's
# `xenstore_path`, backend/vbd/<domid>/<devid>). One `sysctl dev.xbbd` per tick
# samples every unit; awk keeps the integer nodes of the units asked for, matched
# by that path, and prints the lab's sample line {"v": [unit text or null, ...]}.
# POSIX sh + awk + sleep with fractions: all in FreeBSD's base system.
XBBD_SAMPLER = r"""
iv=$1; shift
while :; do
  sysctl dev.xbbd 2>/dev/null | awk -v want="$*" '
    BEGIN { n = split(want, w, " ") }
    {
      if (!match($0, /^dev\.xbbd\.[0-9]+\./)) next
      rest = substr($0, RLENGTH + 1); unit = substr($0, 10, RLENGTH - 10)
      k = rest; sub(/:.*/, "", k); v = rest; sub(/^[^:]*: ?/, "", v)
      if (k == "xenstore_path") path[unit] = v
      else if (v ~ /^-?[0-9]+$/) text[unit] = text[unit] "dev.xbbd." unit "." k ": " v "\\n"
    }
    END {
      printf "{\"v\": ["
      for (i = 1; i <= n; i++) {
        hit = ""
        for (u in path) if (path[u] ~ ("(^|/)" w[i] "$")) hit = u
        printf "%s%s", (i > 1 ? ", " : ""), (hit == "" ? "null" : "\"" text[hit] "\"")
      }
      print "]}"
    }'
  sleep "$iv"
done
"""


class FreeBsdDom0(_Dom0):
    """FreeBSD PVH dom0 (docs/freebsd.md): disks found by their serial with
    diskinfo(8), a gnop(8) provider over each test disk (faults reconfigure it),
    the kernel itself is the backend under test (built into the image)."""

    os = "freebsd"


    def set_clock(self, epoch: int) -> None:
        self.r.run(["date", "-u", "-f", "%s", str(epoch)], timeout=self.timeout)  # FreeBSD date(1)

    def disk_by_serial(self, serial: str) -> str:
        """diskinfo -s prints a disk's ident: virtio-blk's serial."""
        out = self.sh(
            "for d in /dev/vtbd[0-9] /dev/vtbd[0-9][0-9]; do [ -e \"$d\" ] || continue; "
            f'[ "$(diskinfo -s "$d" 2>/dev/null)" = {shlex.quote(serial)} ] && echo "$d"; done; true',
            stage="guest:disk",
        )
        names = out.split()
        if len(names) != 1:
            raise LabError("guest:disk", f"dom0 has {len(names)} virtio disks with serial {serial!r}")
        return names[0]

    def make_backing(self, name: str, lower: str) -> Backing:
        """A transparent gnop provider, /dev/vtbdN.nop: delay and error faults are
        `gnop configure` on it while the guest runs."""
        self.sh(f"gnop create {shlex.quote(lower)}", stage="guest:disk")
        kname = lower.rsplit("/", 1)[-1] + ".nop"
        return Backing(name, f"/dev/{kname}", lower, kname)

    def remove_backing(self, b: Backing) -> None:
        self.r.run(["gnop", "destroy", "-f", b.path], timeout=self.timeout)

    def sample_argv(self, interval: str, disks: list[tuple[VbdInfo, Backing]]) -> list[str]:
        return ["sh", "-c", XBBD_SAMPLER, "lab-xbbd-sample", interval,
                *[f"vbd/{v.domid}/{v.devid}" for v, _b in disks]]

    @staticmethod
    def parse_sample(values: list[str | None], n: int) -> list[dict[str, int] | None]:
        return [xbbd_stats(values[i]) if i < len(values) else None for i in range(n)]

    def fault_script(self, kind: str, b: Backing, *, delay_ms: int = 0) -> str:
        """gnop delays or fails requests; it cannot hold them (no suspend), so a
        `stall` is refused when the scenario is loaded (scenario.py)."""
        if kind == "delay":
            return f"gnop configure -d {delay_ms} -q 100 -x 100 {b.path}"
        if kind == "error":
            return f"gnop configure -e 5 -r 100 -w 100 {b.path}"  # EIO on every request
        raise LabError("fault", f"a FreeBSD dom0 cannot inject {kind!r} (gnop has no suspend)")

    def release_scripts(self, kind: str, b: Backing) -> list[str]:
        return [f"gnop configure -q 0 -x 0 -r 0 -w 0 {b.path}"]

    def evidence_commands(self) -> list[tuple[str, list[str]]]:
        return [
            ("xl-list", ["xl", "list"]),
            ("xl-dmesg", ["xl", "dmesg"]),
            ("xenstore-backend", ["xenstore-ls", "-f", "/local/domain/0/backend"]),
            ("dom0-xbbd", ["sysctl", "dev.xbbd"]),
            ("dom0-gnop", ["sh", "-c", "gnop list; gstat -b -I 1s"]),
            ("xen-debug-keys-q", ["sh", "-c", "xl debug-keys q && xl dmesg | tail -n 300"]),
            # every kernel thread's stack: where blkback's taskqueue and the disk waits
            ("dom0-kernel-stacks", ["procstat", "-kka"]),
            ("dom0-dmesg", ["dmesg"]),
        ]

    def backend_module(self) -> dict[str, str]:
        """The kernel is the backend: its version string, ident, and the lab's build
        id (/boot/kernel/xen-blklab.id, written by the kernel build)."""
        out = self.r.run(["sh", "-c", FREEBSD_KERNEL_INFO], timeout=self.timeout).stdout
        return parse_key_values(out)

    def check_kernel(self, expected_id: str | None) -> dict[str, str]:
        """Refuse a dom0 that booted another kernel than the one built for it (or
        a built one when the release's own was asked for)."""
        info = self.backend_module()
        got = info.get("lab_build_id") or None
        if got != expected_id:
            want = f"the kernel built from the tree with id {expected_id}" if expected_id else "the release's kernel"
            raise LabError("backend", f"the FreeBSD dom0 booted {info.get('uname_v')!r} "
                           f"(lab build id {got!r}), not {want}")
        return info

    def mount_boot_disk(self, serial: str, where: str) -> None:
        """The guests' kernels: an ext4 disk without journal, which FreeBSD's
        ext2fs driver mounts read-only."""
        dev = self.disk_by_serial(serial)
        self.sh(f"mkdir -p {where} && mount -t ext2fs -o ro {dev} {where}", stage="guest:create")


FREEBSD_KERNEL_INFO = r"""
echo "kernel=$(uname -r)"
echo "uname_v=$(uname -v)"
echo "ident=$(sysctl -n kern.ident)"
echo "bootfile=$(sysctl -n kern.bootfile)"
echo "lab_build_id=$(cat /boot/kernel/xen-blklab.id 2>/dev/null)"
echo "xen=$(sysctl -n hw.hypervisor 2>/dev/null)"
"""


def xbbd_stats(text: str | None) -> dict[str, int] | None:
    """One unit's sampled sysctl lines -> the stats of a BackendPoint: every
    xbbd counter, plus `taken` (reqs_received: requests taken off the ring, as
    Linux's rd+wr+f+ds) and `backing_inflight` (taken, not yet completed or
    queued for completion) so the common watchdog reads both backends alike."""
    if not text:
        return None
    from lab.freebsd import parse_xbbd

    units = parse_xbbd(text)
    if len(units) != 1:
        return None
    c = {k: v for k, v in next(iter(units.values())).items() if isinstance(v, int)}
    if "reqs_received" not in c or "reqs_completed" not in c:
        return None  # not connected yet
    c["taken"] = c["reqs_received"]
    c["backing_inflight"] = c["reqs_received"] - c["reqs_completed"] - c.get("reqs_queued_for_completion", 0)
    return c


DOM0_CLASSES: dict[str, type[LinuxDom0] | type[FreeBsdDom0]] = {"linux": LinuxDom0, "freebsd": FreeBsdDom0}
