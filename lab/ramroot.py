"""A guest root that lives in RAM: the image's root filesystem pruned to what a
throwaway VM runs, then packed whole into its initrd (the kernel unpacks it and
runs /init, the image's own PID 1). Part of the image recipe's hash
(lab/images.py recipe_hash)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

from lab import initramfs
from lab.runner import LocalRunner

# What a throwaway VM whose root lives in RAM never needs: every byte here costs
# guest memory (the root is a tmpfs) and decompression time at each boot under TCG.
# Perl and Python come with fio's and debconf's packaging, nothing runs them.
RAM_ROOT_PRUNE = (
    "boot", "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/i18n",
    "usr/share/lintian", "usr/share/bash-completion", "usr/share/zoneinfo", "usr/share/common-licenses",
    "usr/share/perl", "usr/share/perl5", "usr/lib/x86_64-linux-gnu/perl", "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/perl5", "usr/bin/perl*", "usr/share/python3", "usr/lib/python3*",
    "usr/bin/py3*", "usr/bin/python3*", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/firmware",
    "var/lib/apt/lists/*", "var/cache/*", "var/log/*", "var/lib/dpkg/info", "usr/share/fio",
    # plug-ins of fio's ceph/gluster libraries: loaded only by the rbd/gfapi engines, never used here
    "usr/lib/x86_64-linux-gnu/glusterfs", "usr/lib/x86_64-linux-gnu/ceph/*/",
    "usr/lib/x86_64-linux-gnu/rados-classes",
    # no udev runs (PID 1 loads the few modules itself); its hardware database alone is ~12 MB
    "usr/lib/udev", "etc/udev", "usr/bin/udevadm", "usr/lib/klibc", "usr/share/initramfs-tools",
    "etc/initramfs-tools",
    # nothing is installed into a running guest; sshd runs with UsePAM no
    "usr/bin/apt*", "usr/lib/apt", "var/lib/apt", "etc/apt", "usr/bin/dpkg*", "var/lib/dpkg",
    "usr/sbin/ldconfig", "usr/lib/x86_64-linux-gnu/security",
)
LIBDIR = "usr/lib/x86_64-linux-gnu"
# loaded with dlopen, never named in a DT_NEEDED: glibc needs libgcc_s for
# pthread_cancel and backtraces
DLOPENED = ("libgcc_s.so.1",)


def prune_ram_root(rootfs: Path) -> int:
    """Remove RAM_ROOT_PRUNE (globs) from `rootfs`; returns the bytes freed."""
    freed = 0
    for pattern in RAM_ROOT_PRUNE:
        for p in sorted(rootfs.glob(pattern)):
            if p.is_symlink() or p.is_file():
                freed += p.lstat().st_size
                p.unlink()
            elif p.is_dir():
                freed += sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(p)
    return freed


def elf_needed(data: bytes) -> tuple[list[str], list[str]]:
    """DT_NEEDED and DT_RUNPATH/DT_RPATH of an ELF64 little-endian file; ([], [])
    for anything else (a script, a static binary, another architecture)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return [], []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dyn = [], None
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            return [], []
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, base)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dyn = (p_offset, p_filesz)
    if dyn is None:
        return [], []

    def offset(vaddr: int) -> int | None:
        for v, o, n in loads:
            if v <= vaddr < v + n:
                return o + vaddr - v
        return None

    entries = []
    for pos in range(dyn[0], min(dyn[0] + dyn[1], len(data) - 15), 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        entries.append((tag, val))
    strtab = next((offset(v) for t, v in entries if t == 5), None)  # DT_STRTAB
    if strtab is None:
        return [], []

    def string(at: int) -> str:
        end = data.index(b"\0", strtab + at)
        return data[strtab + at:end].decode(errors="replace")

    needed = [string(v) for t, v in entries if t == 1]  # DT_NEEDED
    paths = [d for t, v in entries if t in (15, 29) for d in string(v).split(":") if d]  # DT_RPATH, DT_RUNPATH
    return needed, paths


def prune_unused_libs(rootfs: Path) -> int:
    """Remove the shared libraries in LIBDIR that no ELF file left in `rootfs`
    needs (directly or through other libraries). Returns the bytes freed.
    Libraries in subdirectories (plug-ins, ceph's private ones) are roots."""
    libdir = rootfs / LIBDIR
    candidates = {p for p in libdir.iterdir()
                  if p.name.startswith("lib") and ".so" in p.name and (p.is_symlink() or p.is_file())}
    keep: set[Path] = set()
    todo = [p for p in rootfs.rglob("*")
            if p not in candidates and p.is_file() and not p.is_symlink() and p.stat().st_size > 64]
    todo += [libdir / n for n in DLOPENED]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        while f.is_symlink() and f in candidates:  # keep the soname link and what it points to
            keep.add(f)
            target = os.readlink(f)
            f = rootfs / target.lstrip("/") if target.startswith("/") else f.parent / target
        if f in candidates:
            keep.add(f)
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            if fh.read(4) != b"\x7fELF":
                continue
        needed, runpath = elf_needed(f.read_bytes())
        origin = "/" + str(f.parent.relative_to(rootfs))
        dirs = [rootfs / d.replace("$ORIGIN", origin).lstrip("/") for d in runpath] + [libdir, rootfs / "usr/lib"]
        for name in needed:
            hit = next((d / name for d in dirs if (d / name).exists() or (d / name).is_symlink()), None)
            if hit is not None:
                todo.append(hit)
    freed = 0
    for p in sorted(candidates - keep):
        freed += 0 if p.is_symlink() else p.stat().st_size
        p.unlink()
    return freed


def root_initrd(compression: str, rootfs: Path, work: Path, run: LocalRunner) -> dict[str, int | str]:
    """initrd.img holds the whole root filesystem: the kernel unpacks it into its
    rootfs (a tmpfs) and runs /init, the image's own PID 1; no switch_root."""
    freed = prune_ram_root(rootfs)
    freed += prune_unused_libs(rootfs)
    (rootfs / "boot").mkdir()
    c = initramfs.Cpio()
    c.tree(rootfs)
    names = c.names()
    if "init" not in names:
        c.symlink("init", "sbin/lab-init")
    # the kernel opens /dev/console for PID 1 before anything can mount devtmpfs
    if "dev/console" not in names:
        c.chardev("dev/console", 5, 1)
    if "dev/null" not in names:
        c.chardev("dev/null", 1, 3, 0o666)
    # last: PID 1 tells a complete unpack from one the kernel gave up on
    c.file("etc/lab-root-complete", b"")
    raw = c.to_bytes()
    out = work / "initrd.img"
    if compression == "gzip":
        out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    else:
        # single-threaded so the bytes do not depend on the builder's cores
        cpio = work / "initrd.cpio"
        cpio.write_bytes(raw)
        run.run(["zstd", "-q", "-19", "-T1", "-f", "--rm", "-o", str(out), str(cpio)], timeout=1800).check("image")
    return {"bytes": out.stat().st_size, "unpacked_bytes": len(raw), "pruned_bytes": freed,
            "compression": compression, "entries": len(c.entries)}
