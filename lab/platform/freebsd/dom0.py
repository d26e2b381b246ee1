"""Inside a running FreeBSD PVH dom0 (docs/freebsd.md), over its runner: disks
found by their serial with diskinfo(8), a gnop(8) provider over each test disk
(faults reconfigure it), the xbbd sampler, the evidence commands, and the proof
of which kernel (the backend under test: blkback is built in) it booted."""

from __future__ import annotations

import shlex

from lab.errors import LabError
from lab.platform import Backing, Dom0Base, parse_key_values
from lab.platform.freebsd.xbbd import XBBD_SAMPLER, xbbd_stats
from lab.xen import VbdInfo

# One line per fact, key=value; a missing fact prints an empty value.
FREEBSD_KERNEL_INFO = r"""
echo "kernel=$(uname -r)"
echo "uname_v=$(uname -v)"
echo "ident=$(sysctl -n kern.ident)"
echo "bootfile=$(sysctl -n kern.bootfile)"
echo "lab_build_id=$(cat /boot/kernel/xen-blklab.id 2>/dev/null)"
echo "xen=$(sysctl -n hw.hypervisor 2>/dev/null)"
"""




class FreeBsdDom0(Dom0Base):
    """The Dom0Ops of a FreeBSD dom0."""

    os = "freebsd"
    block_script: str | None = None  # FreeBSD's own block script

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

    def backing_by_serial(self, serial: str) -> Backing:
        return self.make_backing(serial, self.disk_by_serial(serial))

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
        raise LabError("fault", f"a FreeBSD dom0 cannot inject {kind!r} (gnop neither holds nor corrupts)")

    def release_scripts(self, kind: str, b: Backing) -> list[str]:
        return [f"gnop configure -q 0 -x 0 -r 0 -w 0 {b.path}"]

    def point_vbd(self, b: Backing, vbd_sysfs: str) -> None:
        """Nothing to move: the loader refuses save-restore with a FreeBSD dom0."""

    def backend_leftovers(self, domids: list[int], backings: list[Backing]) -> list[str]:
        """After the teardown: no vbd node left in xenstore for those domains (xbbd
        has no module to unload and its ring threads are taskqueue threads)."""
        out = self.r.run(["sh", "-c", "xenstore-ls -f /local/domain/0/backend/vbd 2>/dev/null; true"],
                         timeout=self.timeout).stdout
        nodes = set()
        for line in out.splitlines():
            parts = line.split(" = ", 1)[0].split("/")
            if len(parts) > 7 and parts[6].isdigit() and int(parts[6]) in domids:
                nodes.add("/".join(parts[:8]))
        return [f"{n} still in xenstore" for n in sorted(nodes)]

    def leftovers_then_unload(self, domids: list[int], backings: list[Backing]) -> tuple[list[str], str | None]:
        return self.backend_leftovers(domids, backings), None  # blkback is built into FreeBSD's kernel

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
