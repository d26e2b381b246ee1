"""The backend under test: build it from a source tree (plus patches), cached by
the hash of what goes into it, and put it into the running dom0 before the first
guest exists, so images and saved L1 states stay unchanged.

One builder per dom0 OS, from a plain table. A builder turns (source tree,
patches, the dom0's kernel identity) into an Artifact; the dom0 class installs it
and proves what is loaded. Linux: xen-blkback as an out-of-tree module built
against Debian's linux-headers-<abi> for exactly the kernel dom0 boots, swapped in
with rmmod/insmod. FreeBSD plugs in the same way: its builder makes a kernel from
a FreeBSD tree (blkback is built into GENERIC) and its dom0 installs it before
boot, which is why `install` takes the run and not only a shell."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab import cache, images
from lab.errors import LabError
from lab.runner import LocalRunner

log = logging.getLogger("lab.backend")
DRIVER_DIR = "drivers/block/xen-blkback"
DRIVER_FILES = ("blkback.c", "xenbus.c", "common.h")
KBUILD = "obj-m := xen-blkback.o\nxen-blkback-y := blkback.o xenbus.o\n"


@dataclass(frozen=True)
class Artifact:
    path: Path  # the built module (Linux) or kernel (FreeBSD)
    identity: dict  # build_id, vermagic, source commit, tree hash, ...


def source_commit(src: Path) -> str | None:
    """The git commit of the tree, '+dirty' when it has uncommitted changes."""
    if not (src / ".git").exists():
        return None
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    if rev.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", DRIVER_DIR],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def elf_build_id(data: bytes) -> str | None:
    """The GNU build-id note of an ELF64 little-endian object (a .ko): what the
    running kernel shows in /sys/module/<m>/notes/.note.gnu.build-id."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        base = shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", data, base + 4)
        if sh_type != 7:  # SHT_NOTE
            continue
        off, size = struct.unpack_from("<QQ", data, base + 0x18)
        pos = off
        while pos + 12 <= off + size:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12: pos + 12 + namesz]
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            if ntype == 3 and name.rstrip(b"\0") == b"GNU":  # NT_GNU_BUILD_ID
                return data[desc_at: desc_at + descsz].hex()
            pos = desc_at + ((descsz + 3) & ~3)
    return None


class LinuxBackendBuilder:
    os = "linux"

    def __init__(self, abi: str, runner: LocalRunner | None = None) -> None:
        self.abi = abi
        self.run = runner or LocalRunner(name="backend")
        self.headers = Path(f"/usr/src/linux-headers-{abi}")

    def ensure_headers(self) -> None:
        """Debian's headers for exactly the dom0's ABI (never the build host's uname -r)."""
        if (self.headers / "Makefile").exists():
            return
        pkg = f"linux-headers-{self.abi}"
        log.info("installing %s for the backend build", pkg)
        res = self.run.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg], timeout=900,
                           env={"DEBIAN_FRONTEND": "noninteractive"})
        if not res.ok or not (self.headers / "Makefile").exists():
            raise LabError("backend", f"cannot install {pkg} (the headers of the dom0 kernel): "
                           f"{(res.stderr or res.stdout).strip()[-800:]}")

    def tree_hash(self, src: Path, patches: list[Path]) -> str:
        h = hashlib.sha256(f"{self.abi}\0{KBUILD}".encode())
        for f in DRIVER_FILES:
            p = src / DRIVER_DIR / f
            if not p.is_file():
                raise LabError("backend", f"{src}: expected a kernel source tree with {DRIVER_DIR}/{f}")
            h.update(f.encode() + b"\0" + p.read_bytes())
        for p in patches:
            h.update(b"patch\0" + p.read_bytes())
        hdr = self.headers / "include/config/kernel.release"
        if hdr.exists():
            h.update(hdr.read_bytes())
        return h.hexdigest()[:16]

    def build(self, src: Path, patches: list[Path], results: Path) -> Artifact:
        """Build (or reuse) the module. A compile failure is an ERROR at stage
        `backend` with the compiler's output in the results."""
        src = src.resolve()
        for p in patches:
            if not p.is_file():
                raise LabError("backend", f"patch {p}: no such file")
        self.ensure_headers()
        key = self.tree_hash(src, patches)
        entry = images.cache_dir() / "backends" / f"linux-{key}"
        commit = source_commit(src)
        cached = entry.exists()
        if not cached:
            cache.put(entry, lambda work: self._build_into(work, src, patches, key, results),
                      verify=_verify_module)
        ident = json.loads((entry / "identity.json").read_text())
        ident.update(source=str(src), commit=commit, cached=cached)
        return Artifact(entry / "xen-blkback.ko", ident)

    def _build_into(self, work: Path, src: Path, patches: list[Path], key: str, results: Path) -> None:
        """Copy the driver's files into `work`, patch, compile, strip; leave only
        the module and its identity."""
        work.mkdir(parents=True)
        for f in DRIVER_FILES:
            shutil.copyfile(src / DRIVER_DIR / f, work / f)
        (work / "Kbuild").write_text(KBUILD)
        for p in patches:
            res = self.run.run(["patch", "-p1", "--no-backup-if-mismatch", "-d", str(work),
                                "-i", str(p.resolve())], timeout=60)
            if not res.ok:
                # patches are written against the tree root: retry relative to the driver dir
                res = self.run.run(["patch", "-p4", "--no-backup-if-mismatch", "-d", str(work),
                                    "-i", str(p.resolve())], timeout=60)
            if not res.ok:
                (results / "backend-build.log").write_text(res.stdout + res.stderr)
                raise LabError("backend", f"patch {p} does not apply: {res.stdout.strip()[-500:]}")
        res = self.run.run(["make", "-C", str(self.headers), f"M={work}", "modules"], timeout=900)
        (results / "backend-build.log").write_text(res.stdout + res.stderr)
        if not res.ok:
            raise LabError("backend", "the backend did not build (backend-build.log has the compiler's "
                           f"output):\n{(res.stderr or res.stdout).strip()[-1500:]}")
        ko = work / "xen-blkback.ko"
        self.run.run(["strip", "--strip-debug", str(ko)], timeout=60).check("backend")
        data = ko.read_bytes()
        ident = {
            "os": "linux", "tree_hash": key, "abi": self.abi,
            "build_id": elf_build_id(data),
            "vermagic": self._modinfo(ko, "vermagic"),
            "srcversion": self._modinfo(ko, "srcversion"),
            "patches": [p.name for p in patches],
        }
        (work / "identity.json").write_text(json.dumps(ident, indent=1))
        for left in work.iterdir():
            if left.name not in ("xen-blkback.ko", "identity.json"):
                left.unlink() if left.is_file() else shutil.rmtree(left)

    def _modinfo(self, ko: Path, field: str) -> str:
        """modinfo's fields from the .modinfo section (no kmod needed on L0)."""
        data = ko.read_bytes()
        needle = field.encode() + b"="
        i = data.find(b"\0" + needle)
        if i < 0:
            return ""
        j = data.find(b"\0", i + 1)
        return data[i + 1 + len(needle): j].decode(errors="replace")


def _verify_module(work: Path) -> None:
    for f in ("xen-blkback.ko", "identity.json"):
        if not (work / f).is_file():
            raise LabError("backend", f"the backend build left no {f}")
    if elf_build_id((work / "xen-blkback.ko").read_bytes()) is None:
        raise LabError("backend", "the built xen-blkback.ko has no GNU build-id (not an ELF64 module?)")


BACKEND_BUILDERS = {"linux": LinuxBackendBuilder}


def pristine_tree(kernel_version: str, runner: LocalRunner | None = None) -> Path:
    """The pristine xen-blkback source of Debian's kernel `kernel_version`
    (e.g. "6.1.192-2"), from the matching linux-source-X.Y package; only the
    driver's directory is kept. Returns a tree root holding drivers/block/xen-blkback/."""
    run = runner or LocalRunner(name="backend")
    series = ".".join(kernel_version.split(".")[:2])
    pkg = f"linux-source-{series}"
    dest = images.cache_dir() / "src" / f"{pkg}_{kernel_version}"
    if (dest / DRIVER_DIR / "blkback.c").exists():
        return dest

    def fetch(work: Path) -> None:
        dl = work / "download"
        dl.mkdir(parents=True)
        run.run(["apt-get", "download", f"{pkg}={kernel_version}"], timeout=900, cwd=dl).check("backend")
        deb = next(dl.glob("*.deb"))
        tarball = f"./usr/src/{pkg}.tar.xz"
        # quoted: the cache path may hold spaces or shell characters ($LAB_CACHE, $HOME)
        pipe = f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -x -C {shlex.quote(str(dl))} {tarball}"
        run.run(["sh", "-c", pipe], timeout=600).check(
            "backend")
        run.run(["tar", "-xJf", str(dl / tarball), "-C", str(dl), "--wildcards", f"{pkg}/{DRIVER_DIR}/*"],
                timeout=600).check("backend")
        (dl / pkg / "drivers").rename(work / "drivers")
        shutil.rmtree(dl)

    def verify(work: Path) -> None:
        if not (work / DRIVER_DIR / "blkback.c").is_file():
            raise LabError("backend", f"{pkg}={kernel_version} holds no {DRIVER_DIR}/blkback.c")

    cache.put(dest, fetch, verify=verify)
    return dest
