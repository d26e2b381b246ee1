"""Initramfs archives, built in pure Python. `build`: a small one (busybox, a
handful of kernel modules in dependency order and an /init script; Debian's
MODULES=most initramfs costs many seconds under TCG) that only mounts the root
disk. `Cpio.tree`: a whole root filesystem, for a machine whose root lives in RAM."""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: 'kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko ...' -> {path: deps}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def resolve_modules(
    wanted: list[str], deps: dict[str, list[str]], builtin: set[str] = frozenset()  # type: ignore[assignment]
) -> list[str]:
    """Module paths to load, dependencies first, each once. Built-in modules are
    skipped; an unknown module is an error (a typo in a recipe must not pass)."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise KeyError(f"kernel module '{name}' is neither in modules.dep nor built in")
        visit(by_name[key])
    return order


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._dirs: set[str] = set()

    def names(self) -> set[str]:
        return {e.name for e in self.entries}

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name: str) -> None:
        if name and name not in self._dirs:
            self._dirs.add(name)
            self._parents(name)
            self.entries.append(_Entry(name, stat.S_IFDIR | 0o755))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self.entries.append(_Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self.entries.append(_Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self.entries.append(_Entry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under `root` (as `prefix/...`) in a stable order, with
        the files' modes and owners: directories, regular files, symlinks and
        device nodes. Hard links become copies; sockets and FIFOs are skipped.
        Times are not kept (mtime 0): the same tree gives the same bytes."""
        top = prefix.strip("/")
        if top:
            self.dir(top)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            base = "/".join(p for p in (top, "" if rel_dir == "." else rel_dir) if p)
            for n in sorted(dirnames + filenames):
                full = os.path.join(dirpath, n)
                name = f"{base}/{n}" if base else n
                st = os.lstat(full)
                kind = stat.S_IFMT(st.st_mode)
                if kind == stat.S_IFDIR:
                    if name in self._dirs:
                        continue
                    self._dirs.add(name)
                    e = _Entry(name, st.st_mode)
                elif kind == stat.S_IFREG:
                    e = _Entry(name, st.st_mode, Path(full).read_bytes())
                elif kind == stat.S_IFLNK:
                    e = _Entry(name, st.st_mode, os.readlink(full).encode())
                elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                    e = _Entry(name, st.st_mode, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
                else:
                    continue
                e.uid, e.gid = st.st_uid, st.st_gid
                self.entries.append(e)
            # a symlink to a directory is listed in dirnames but not walked (followlinks=False)

    def to_bytes(self) -> bytes:
        out = io.BytesIO()

        def pad(n: int) -> None:
            out.write(b"\0" * ((4 - n % 4) % 4))

        for ino, e in enumerate([*self.entries, _Entry("TRAILER!!!", 0)], start=1):
            name = e.name.encode() + b"\0"
            fields = [ino, e.mode, e.uid, e.gid, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0]
            header = b"070701" + b"".join(b"%08X" % f for f in fields)
            out.write(header + name)
            pad(len(header) + len(name))
            out.write(e.data)
            pad(len(e.data))
        return out.getvalue()


def build(
    *, root: Path, abi: str, modules: list[str], init: bytes, busybox: Path
) -> bytes:
    """A gzip'ed initramfs holding busybox, `modules` (with dependencies, from the
    root filesystem `root`) and `init`. /modules.order lists them in load order."""
    moddir = root / "lib/modules" / abi
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    order = resolve_modules(modules, deps, builtin)
    c = Cpio()
    for d in ("dev", "proc", "sys", "newroot", "run", "tmp"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "mkdir", "sleep", "cat", "echo", "ls"):
        c.symlink(f"bin/{applet}", "busybox")
    for rel in order:
        c.file(f"lib/modules/{abi}/{rel}", (moddir / rel).read_bytes())
    c.file("modules.order", "".join(f"/lib/modules/{abi}/{p}\n" for p in order).encode())
    c.file("init", init, 0o755)
    return gzip.compress(c.to_bytes(), compresslevel=6, mtime=0)
