"""Inside a Linux dom0 (the `Dom0Ops` of lab/platform): disks by serial, the
dm-linear device under each guest test disk and the fault actions on it, the
blkback statistics sampler, the clock, which backend is loaded, what evidence a
hang collects."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

from lab.errors import LabError
from lab.platform import Backing, Dom0Base, parse_key_values
from lab.platform.linux import faults
from lab.xen import VbdInfo

# blkback's per-vbd statistics, summed over the vbd's rings (facts/linux-blkback-module.md)
# blkback's ring threads: blkback_name() names them "<domid>.<dev>" plus "-<ring>"
# (xenbus.c), the kernel keeps 15 characters: `ps -eo comm=` in dom0 shows 1.xvdb-0
RING_THREAD = re.compile(r"(\d+)\.([a-z0-9]+)-(\d+)")

BACKEND_DEVICES = "/sys/bus/xen-backend/devices"
VBD_LINKS = "/run/lab/vbd"  # a link per test disk to its backend device: see point_vbd

VBD_STATS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect")




class LinuxDom0(Dom0Base):
    os = "linux"
    # the lab's lean phy hotplug script, in the dom0 image (images/linux-dom0/rootfs)
    block_script: str | None = "/etc/xen/scripts/lab-block-phy"

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
        out = self.sh(f"set -e; lower={shlex.quote(lower)}; " + _DM_LINEAR.format(q=shlex.quote(name)),
                      stage="guest:disk")
        return _backing(name, lower, out)

    def backing_by_serial(self, serial: str) -> Backing:
        """disk_by_serial then make_backing (named after the serial) in one round
        trip: a warm run's attach is a chain of them, 0.3-0.6 s each under TCG."""
        q = shlex.quote(serial)
        out = self.sh(
            "set -e; n=0; lower=; "
            f'for f in /sys/block/vd*/serial; do if [ "$(cat $f)" = {q} ]; then '
            'd=${f%/serial}; lower=/dev/${d##*/}; n=$((n+1)); fi; done; '
            f'[ $n -eq 1 ] || {{ echo "dom0 has $n virtio disks with serial {serial}" >&2; exit 3; }}; '
            'echo "lower=$lower"; ' + _DM_LINEAR.format(q=q),
            stage="guest:disk",
        )
        return _backing(serial, parse_key_values(out).get("lower", ""), out)

    def remove_backing(self, b: Backing) -> None:
        self.r.run(["dmsetup", "resume", "--noudevsync", b.name], timeout=self.timeout)
        self.r.run(["dmsetup", "remove", "--noudevsync", b.name], timeout=self.timeout)

    def stat_paths(self, vbd_sysfs: str, backing: Backing) -> list[str]:
        base = f"{VBD_LINKS}/{backing.name}/statistics"
        return [f"{base}/{s}" for s in VBD_STATS] + [f"/sys/block/{backing.kname}/inflight"]

    def set_clock(self, epoch: int) -> None:
        self.r.run(["date", "-u", "-s", f"@{epoch}"], timeout=self.timeout)

    def sample_argv(self, interval: str, disks: list[tuple[VbdInfo, Backing]]) -> list[str]:
        """One long-lived sampler for every test disk (images/common/lab-sample),
        reading each disk's statistics through a link `point_vbd` can move."""
        links = "".join(f"{_link(v.sysfs_name, b)} && " for v, b in disks)
        paths = " ".join(shlex.quote(p) for v, b in disks for p in self.stat_paths(v.sysfs_name, b))
        return ["sh", "-c", f"mkdir -p {VBD_LINKS} && {links}exec lab-sample {shlex.quote(interval)} {paths}"]

    @staticmethod
    def parse_sample(values: list[str | None], n: int) -> list[dict[str, int] | None]:
        per = len(values) // max(1, n)
        return [parse_vbd_sample(values[i * per:(i + 1) * per]) for i in range(n)]

    # faults act on the dm-linear device blkback submits to (faults.py)
    def fault_script(self, kind: str, b: Backing, *, delay_ms: int = 0) -> str:
        if kind == "stall":
            return f"dmsetup suspend --noudevsync {b.name}"
        if kind == "delay":
            return faults.delay_script(b, delay_ms)
        if kind in ("error", "corrupt"):
            return faults.swap_table_script(b, faults.dm_table(kind, b))
        raise LabError("fault", f"a Linux dom0 has no dm fault {kind!r}")

    def release_scripts(self, kind: str, b: Backing) -> list[str]:
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

    def load_stock_backend(self) -> dict[str, str]:
        """Load the stock xen-blkback afresh (no vbd exists yet), then say what is
        loaded: the backend under test never served a disk before this run, also
        when L1 and its guests were restored from a saved state. One round trip."""
        script = ("[ -e /sys/module/xen_blkback/refcnt ] && rmmod xen_blkback; modprobe xen_blkback || exit 1\n"
                  + BACKEND_INFO)
        return parse_key_values(self.sh(script, stage="backend"))

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

    def backend_leftovers(self, domids: list[int], backings: list[Backing]) -> list[str]:
        """After every disk was detached and every guest destroyed, nothing of the
        backend may remain: no vbd node in xenstore for those domains, no ring
        thread (named <domid>.<dev>-<ring> by blkback_name(), e.g. `1.xvdb-0`),
        no backing device still held open.
        One round trip."""
        out = self.r.run(["sh", "-c", _leftovers_script(backings) + "true"], timeout=self.timeout).stdout
        return parse_leftovers(out, domids)

    def point_vbd(self, b: Backing, vbd_sysfs: str) -> None:
        """The sampler reads a test disk's statistics through a link named after
        its backing device (stable for the run); after a save-restore the disk is
        a new backend device, and the link follows it."""
        self.sh(_link(vbd_sysfs, b), stage="fault:save-restore")

    def leftovers_then_unload(self, domids: list[int], backings: list[Backing]) -> tuple[list[str], str | None]:
        """backend_leftovers, then xen-blkback must unload: a reference it forgot
        to drop keeps it in (None: it unloaded, or is built into the kernel).
        One round trip: the teardown's last two checks cost 0.3-0.7 s each
        under TCG."""
        out = self.r.run(["sh", "-c", _leftovers_script(backings)
                          + f'u=$( ({_UNLOAD}) 2>&1 ); echo "unload-rc=$?"; printf "%s\\n" "$u" | sed "s/^/unload:/"'],
                         timeout=self.timeout).stdout
        lines = out.splitlines()
        if "unload-rc=0" in lines:
            problem = None
        else:  # a non-zero rc, or the script never got that far
            problem = _refuses_unload(" ".join(ln[len("unload:"):] for ln in lines if ln.startswith("unload:"))
                                      or "(no answer)")
        return parse_leftovers(out, domids), problem

    def mount_boot_disk(self, serial: str, where: str) -> None:
        """The read-only disk with the guests' kernels (cheaper than copying them
        over SSH, whose crypto runs emulated in dom0)."""
        dev = self.disk_by_serial(serial)
        # --flushbufs: after a restore, dom0's buffer cache may hold blocks of the
        # boot disk of the run that saved the state; this run's disk differs.
        self.sh(f"blockdev --flushbufs {dev} && mkdir -p {where} && mount -t ext4 -o ro,noload {dev} {where}",
                stage="guest:create")


def _leftovers_script(backings: list[Backing]) -> str:
    """sh for backend_leftovers: its lines are parse_leftovers' input."""
    return ("xenstore-ls -f /local/domain/0/backend/vbd 2>/dev/null | sed 's/^/xs:/'; "
            "ps -eo comm= | grep -E '^[0-9]+\\.[a-z0-9]+-[0-9]+$' | sed 's/^/thread:/'; "
            + "".join(f"echo open:{shlex.quote(b.name)}:$(dmsetup info -c --noheadings -o open "
                      f"{shlex.quote(b.name)} 2>/dev/null); " for b in backings))


# sh: xen-blkback unloaded (or built in: nothing to do); its refcount on stderr when it refuses
_UNLOAD = ("[ -e /sys/module/xen_blkback/refcnt ] || exit 0; "
           "rmmod xen_blkback || { echo \"refcnt $(cat /sys/module/xen_blkback/refcnt)\" >&2; exit 1; }")


def _refuses_unload(why: str) -> str:
    return f"xen-blkback refuses to unload with no disk left: {' '.join(why.split())[-300:]}"


# sh: a dm-linear device {q} over the device in $lower, then its minor. Without
# udev in the lab's dom0: --noudevsync, and mknodes makes /dev/mapper/{q}.
_DM_LINEAR = ('sz=$(blockdev --getsz "$lower"); '
              'dmsetup create --noudevsync {q} --table "0 $sz linear $lower 0"; '
              "dmsetup mknodes {q}; "
              'echo "minor=$(dmsetup info -c --noheadings -o minor {q})"')


def _backing(name: str, lower: str, out: str) -> Backing:
    """The Backing that a _DM_LINEAR script's output describes."""
    try:
        return Backing(name, f"/dev/mapper/{name}", lower, f"dm-{int(parse_key_values(out)['minor'])}")
    except (KeyError, ValueError):
        raise LabError("guest:disk", f"dom0 made no backing device {name!r}: {out.strip()[-200:]!r}") from None


# One line per fact, key=value; a missing fact prints an empty value.
# Files are read with the shell's `read`, not `cat`: a process costs 30-60 ms
# in a PV dom0 under TCG, and this runs on the way to every run's first I/O.
BACKEND_INFO = r"""
m=xen_blkback
read -r v < /proc/sys/kernel/osrelease; echo "kernel=$v"
echo "srcversion="  # an in-tree module has none; a later line wins (parse_key_values)
modinfo $m 2>/dev/null | sed -n 's/^filename: */module_path=/p; s/^srcversion: */srcversion=/p; s/^vermagic: */vermagic=/p'
echo "build_id=$(od -An -tx1 -v /sys/module/$m/notes/.note.gnu.build-id 2>/dev/null | tr -d ' \n' | cut -c33-)"
v=; { read -r v < /sys/module/$m/taint; } 2>/dev/null; echo "taint=$v"
for p in /sys/module/$m/parameters/*; do v=; { read -r v < $p; } 2>/dev/null; echo "param.${p##*/}=$v"; done
"""




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


def _link(vbd_sysfs: str, b: Backing) -> str:
    """The shell command that points a test disk's link at its backend device."""
    return f"ln -sfn {BACKEND_DEVICES}/{shlex.quote(vbd_sysfs)} {VBD_LINKS}/{shlex.quote(b.name)}"


def parse_leftovers(text: str, domids: list[int]) -> list[str]:
    """`backend_leftovers`' lines (xs:<xenstore-ls line>, thread:<name>,
    open:<dm name>:<count>) into what a person reads."""
    out: list[str] = []
    nodes = set()
    for line in text.splitlines():
        kind, _, rest = line.partition(":")
        if kind == "xs":
            parts = rest.split(" = ", 1)[0].split("/")
            # /local/domain/0/backend/vbd/<domid>/<devid>/...
            if len(parts) > 7 and parts[6].isdigit() and int(parts[6]) in domids:
                nodes.add("/".join(parts[:8]))
        elif kind == "thread" and (m := RING_THREAD.fullmatch(rest.strip())) and int(m.group(1)) in domids:
            out.append(f"blkback ring thread {rest.strip()} still running")
        elif kind == "open":
            name, _, count = rest.rpartition(":")
            if count.strip().isdigit() and int(count) > 0:
                out.append(f"backing device {name} still held open ({count.strip()} opener(s)): "
                           "blkback did not release it")
    return [f"{n} still in xenstore" for n in sorted(nodes)] + out
