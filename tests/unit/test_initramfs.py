"""lab/initramfs.py: module dependency order from a real modules.dep and the newc
archive writer, read back by an independent reader (and by cpio(1) if present)."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from labdata import DATA

from lab import initramfs
from lab.initramfs import Cpio

DEP = DATA / "modules.dep-6.1.0-56-amd64.gz"
BUILTIN = DATA / "modules.builtin-6.1.0-56-amd64"


@pytest.fixture(scope="module")
def deps() -> dict[str, list[str]]:
    return initramfs.parse_modules_dep(gzip.decompress(DEP.read_bytes()).decode())


@pytest.fixture(scope="module")
def builtin() -> set[str]:
    return {initramfs.module_name(p) for p in BUILTIN.read_text().split()}


# ------------------------------------------------------------ modules.dep
def test_parse_modules_dep_shall_map_each_module_to_its_dependencies(deps: dict[str, list[str]]) -> None:
    raw_lines = [ln for ln in gzip.decompress(DEP.read_bytes()).decode().splitlines() if ln.strip()]
    assert len(deps) == len(raw_lines)
    assert deps["kernel/fs/ext4/ext4.ko"] == ["kernel/lib/crc16.ko", "kernel/fs/mbcache.ko", "kernel/fs/jbd2/jbd2.ko"]
    assert deps["kernel/fs/jbd2/jbd2.ko"] == []
    assert deps["kernel/drivers/block/xen-blkfront.ko"] == []


def test_parse_modules_dep_shall_skip_lines_without_a_colon() -> None:
    assert initramfs.parse_modules_dep("a.ko: b.ko c.ko\n\ngarbage\nb.ko:\n") == {"a.ko": ["b.ko", "c.ko"], "b.ko": []}


@pytest.mark.parametrize(
    ("path", "name"),
    [("kernel/fs/ext4/ext4.ko", "ext4"), ("kernel/drivers/block/xen-blkfront.ko", "xen_blkfront"),
     ("kernel/drivers/md/dm-mod.ko.xz", "dm_mod"), ("x/virtio_blk.ko.zst", "virtio_blk"), ("y/z-a.ko.gz", "z_a"),
     ("crc16", "crc16")],
)
def test_module_name_shall_strip_dir_and_suffix_and_use_underscores(path: str, name: str) -> None:
    assert initramfs.module_name(path) == name


def test_ext4_shall_come_after_its_dependencies(deps: dict[str, list[str]], builtin: set[str]) -> None:
    order = initramfs.resolve_modules(["ext4"], deps, builtin)
    names = [initramfs.module_name(p) for p in order]
    assert names[-1] == "ext4"
    assert set(names) == {"ext4", "jbd2", "mbcache", "crc16"}
    for dep in ("jbd2", "mbcache", "crc16"):
        assert names.index(dep) < names.index("ext4")


@pytest.mark.parametrize("recipe", ["linux-dom0", "linux-guest"])
@pytest.mark.parametrize("field", ["modules", "initramfs_modules"])
def test_every_recipe_module_list_shall_resolve_in_dependency_order(
    recipe: str, field: str, deps: dict[str, list[str]], builtin: set[str]
) -> None:
    """On the captured Debian kernel: each module once, every dependency before the
    module that needs it, and every module the recipe asked for present."""
    from lab import images

    wanted = list(getattr(images.load_recipe(recipe), field))
    order = initramfs.resolve_modules(wanted, deps, builtin)
    assert len(order) == len(set(order)), "each module once"
    pos = {p: i for i, p in enumerate(order)}
    for p in order:
        for d in deps[p]:
            assert pos[d] < pos[p], f"{d} must load before {p}"
    names = {initramfs.module_name(p) for p in order}
    for w in wanted:
        assert w.replace("-", "_") in names | builtin


def test_shared_dependencies_shall_appear_once(deps: dict[str, list[str]], builtin: set[str]) -> None:
    # virtio_pci and virtio_blk both need virtio and virtio_ring
    order = initramfs.resolve_modules(["virtio_pci", "virtio_blk", "virtio_pci", "virtio-blk"], deps, builtin)
    names = [initramfs.module_name(p) for p in order]
    assert names.count("virtio") == 1 and names.count("virtio_ring") == 1
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_blk")
    assert len(names) == len(set(names))


def test_an_unknown_module_shall_raise_key_error(deps: dict[str, list[str]], builtin: set[str]) -> None:
    with pytest.raises(KeyError, match="ext5"):
        initramfs.resolve_modules(["ext4", "ext5"], deps, builtin)


def test_builtin_modules_shall_be_skipped(deps: dict[str, list[str]], builtin: set[str]) -> None:
    assert "xenbus" in builtin and "crc32" in builtin  # the captured list says so
    assert initramfs.resolve_modules(["xenbus", "crc32"], deps, builtin) == []
    order = initramfs.resolve_modules(["crc32", "xen-blkfront"], deps, builtin)
    assert order == ["kernel/drivers/block/xen-blkfront.ko"]


def test_a_builtin_name_shall_win_over_a_module_file() -> None:
    deps = {"kernel/a.ko": ["kernel/b.ko"], "kernel/b.ko": []}
    assert initramfs.resolve_modules(["a"], deps, {"a"}) == []
    assert initramfs.resolve_modules(["a"], deps, set()) == ["kernel/b.ko", "kernel/a.ko"]


# ------------------------------------------------------------ newc reader (independent of the writer)
@dataclass
class Member:
    name: str
    mode: int
    data: bytes
    rdevmajor: int
    rdevminor: int
    offset: int
    nlink: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def read_newc(blob: bytes) -> list[Member]:
    """Parse a newc archive: 110-byte header of '070701' + 13 hex fields, the name
    (NUL-terminated, padded to 4), the data (padded to 4). Stops at TRAILER!!!."""
    out: list[Member] = []
    off = 0
    while True:
        assert off % 4 == 0, f"entry at {off} not 4-byte aligned"
        hdr = blob[off:off + 110]
        assert hdr[:6] == b"070701", f"bad magic at {off}: {hdr[:6]!r}"
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        (_ino, mode, uid, gid, nlink, mtime, filesize, _maj, _min, rmaj, rmin, namesize, check) = f
        assert check == 0
        name_end = off + 110 + namesize
        raw_name = blob[off + 110:name_end]
        assert raw_name.endswith(b"\0")
        name = raw_name[:-1].decode()
        data_at = (name_end + 3) & ~3
        assert blob[name_end:data_at] == b"\0" * (data_at - name_end)
        data = blob[data_at:data_at + filesize]
        assert len(data) == filesize
        next_off = (data_at + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert next_off == len(blob), "nothing after the trailer"
            return out
        out.append(Member(name, mode, data, rmaj, rmin, off, nlink, uid, gid, mtime))
        off = next_off


def _sample() -> Cpio:
    c = Cpio()
    c.dir("dev")
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3 + b"odd", 0o755)  # size not a multiple of 4
    c.symlink("bin/sh", "busybox")
    c.file("lib/modules/6.1/kernel/fs/ext4/ext4.ko", b"ko")
    c.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    c.file("empty", b"")
    return c


def test_cpio_shall_parse_back_with_names_modes_links_and_devices() -> None:
    members = {m.name: m for m in read_newc(_sample().to_bytes())}
    bb = members["bin/busybox"]
    assert stat.S_ISREG(bb.mode) and stat.S_IMODE(bb.mode) == 0o755
    assert bb.data == b"\x7fELF" + bytes(range(256)) * 3 + b"odd"
    sh = members["bin/sh"]
    assert stat.S_ISLNK(sh.mode) and sh.data == b"busybox"
    con = members["dev/console"]
    assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1) and stat.S_IMODE(con.mode) == 0o600
    null = members["dev/null"]
    assert stat.S_ISCHR(null.mode) and (null.rdevmajor, null.rdevminor) == (1, 3)
    assert stat.S_IMODE(null.mode) == 0o666
    assert members["init"].data == b"#!/bin/sh\necho hi\n" and stat.S_IMODE(members["init"].mode) == 0o755
    assert stat.S_IMODE(members["lib/modules/6.1/kernel/fs/ext4/ext4.ko"].mode) == 0o644
    assert members["empty"].data == b""
    for m in members.values():
        assert m.nlink >= 1


def test_cpio_shall_create_each_parent_directory_once_before_its_children() -> None:
    members = read_newc(_sample().to_bytes())
    names = [m.name for m in members]
    assert len(names) == len(set(names))
    for i, m in enumerate(members):
        parts = m.name.split("/")
        for j in range(1, len(parts)):
            parent = "/".join(parts[:j])
            assert parent in names[:i], f"{parent} must precede {m.name}"
            assert stat.S_ISDIR(members[names.index(parent)].mode)


def test_cpio_headers_shall_start_with_070701_at_4_byte_offsets() -> None:
    blob = _sample().to_bytes()
    members = read_newc(blob)  # asserts the alignment and magic of every entry itself
    assert blob.startswith(b"070701")
    assert len(blob) % 4 == 0
    assert all(m.offset % 4 == 0 and blob[m.offset:m.offset + 6] == b"070701" for m in members)
    assert b"TRAILER!!!\0" in blob


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_tool_shall_list_and_extract_the_archive(tmp_path: Path) -> None:
    blob = _sample().to_bytes()
    listed = subprocess.run(["cpio", "-t", "--quiet"], input=blob, capture_output=True, check=True, timeout=30)
    assert listed.stdout.decode().split() == [m.name for m in read_newc(blob)]
    out = tmp_path / "x"
    out.mkdir()
    # extract without device nodes (they need root and a real /dev); files and links only
    subprocess.run(["cpio", "-i", "--quiet", "-d", "--no-absolute-filenames", "bin/*", "init"],
                   input=blob, cwd=out, check=True, timeout=30, capture_output=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/sh").is_symlink() and (out / "bin/sh").readlink() == Path("busybox")


# ------------------------------------------------------------ build()
def test_build_shall_pack_busybox_modules_in_order_and_init(tmp_path: Path) -> None:
    abi = "6.1.0-test"
    moddir = tmp_path / "lib/modules" / abi
    dep_text = (
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n"
        "kernel/drivers/block/xen-blkfront.ko:\nkernel/unused.ko:\n"
    )
    (moddir).mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep_text)
    (moddir / "modules.builtin").write_text("kernel/lib/crc32c_generic.ko\n")
    for p in initramfs.parse_modules_dep(dep_text):
        (moddir / p).parent.mkdir(parents=True, exist_ok=True)
        (moddir / p).write_bytes(f"module {p}".encode())
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BUSYBOX")
    init = b"#!/bin/sh\nexec switch_root /newroot /sbin/init\n"

    gz = initramfs.build(root=tmp_path, abi=abi, modules=["xen-blkfront", "crc32c_generic", "ext4"],
                         init=init, busybox=busybox)
    members = {m.name: m for m in read_newc(gzip.decompress(gz))}
    order = members["modules.order"].data.decode().splitlines()
    assert order == [f"/lib/modules/{abi}/kernel/{p}" for p in (
        "drivers/block/xen-blkfront.ko", "lib/crc16.ko", "fs/mbcache.ko", "fs/jbd2/jbd2.ko", "fs/ext4/ext4.ko")]
    for line in order:
        rel = line.lstrip("/")
        assert members[rel].data == f"module {rel.split(abi + '/', 1)[1]}".encode()
    assert f"lib/modules/{abi}/kernel/unused.ko" not in members
    assert members["init"].data == init and stat.S_IMODE(members["init"].mode) == 0o755
    assert members["bin/busybox"].data == b"BUSYBOX"
    assert stat.S_ISLNK(members["bin/sh"].mode) and members["bin/sh"].data == b"busybox"
    assert stat.S_ISLNK(members["bin/switch_root"].mode)
    assert (members["dev/console"].rdevmajor, members["dev/console"].rdevminor) == (5, 1)
    for d in ("proc", "sys", "newroot", "run", "tmp"):
        assert stat.S_ISDIR(members[d].mode)
    # reproducible: the same inputs give the same bytes (gzip with mtime 0)
    assert initramfs.build(root=tmp_path, abi=abi, modules=["xen-blkfront", "crc32c_generic", "ext4"],
                           init=init, busybox=busybox) == gz


# ------------------------------------------------------------ a whole tree (the guest's root in RAM)
def _tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/fio").write_bytes(b"\x7fELF fio")
    (root / "usr/bin/fio").chmod(0o755)
    (root / "usr/bin/su").write_bytes(b"su")
    (root / "usr/bin/su").chmod(0o4755)
    (root / "bin").symlink_to("usr/bin")  # merged /usr: a symlink to a directory, not walked
    (root / "root").mkdir(mode=0o700)
    (root / "root").chmod(0o700)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "etc").mkdir()
    (root / "etc/shadow").write_text("root:*:")
    (root / "etc/shadow").chmod(0o640)
    os.link(root / "usr/bin/fio", root / "usr/bin/fio-hardlink")
    os.mkfifo(root / "tmp/fifo")
    if os.geteuid() == 0:
        os.chown(root / "etc/shadow", 0, 42)
        os.mknod(root / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))


def test_cpio_tree_shall_keep_modes_owners_links_and_devices(tmp_path: Path) -> None:
    _tree(tmp_path / "r")
    c = Cpio()
    c.tree(tmp_path / "r")
    members = {m.name: m for m in read_newc(c.to_bytes())}
    assert stat.S_IMODE(members["usr/bin/fio"].mode) == 0o755 and members["usr/bin/fio"].data == b"\x7fELF fio"
    assert stat.S_IMODE(members["usr/bin/su"].mode) == 0o4755
    assert members["usr/bin/fio-hardlink"].data == b"\x7fELF fio", "a hard link is stored as a copy"
    assert stat.S_ISLNK(members["bin"].mode) and members["bin"].data == b"usr/bin"
    assert not any(n.startswith("bin/") for n in members), "a symlinked directory is not walked"
    assert stat.S_ISDIR(members["root"].mode) and stat.S_IMODE(members["root"].mode) == 0o700
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert stat.S_IMODE(members["etc/shadow"].mode) == 0o640
    assert "tmp/fifo" not in members
    assert all(m.mtime == 0 for m in members.values())
    if os.geteuid() == 0:
        assert members["etc/shadow"].gid == 42
        con = members["console"]
        assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1)
    names = list(members)
    for i, n in enumerate(names):
        if "/" in n:
            assert n.rsplit("/", 1)[0] in names[:i], f"the parent of {n} comes first"


def test_cpio_tree_shall_give_the_same_bytes_for_the_same_tree(tmp_path: Path) -> None:
    _tree(tmp_path / "a")
    a = Cpio()
    a.tree(tmp_path / "a")
    os.utime(tmp_path / "a/usr/bin/fio", (1, 1))  # times are not part of the archive
    b = Cpio()
    b.tree(tmp_path / "a")
    assert a.to_bytes() == b.to_bytes()


def test_cpio_tree_under_a_prefix_shall_not_repeat_directories(tmp_path: Path) -> None:
    (tmp_path / "r/lib").mkdir(parents=True)
    (tmp_path / "r/lib/x").write_text("x")
    c = Cpio()
    c.dir("opt/root/lib")
    c.tree(tmp_path / "r", prefix="opt/root")
    names = [m.name for m in read_newc(c.to_bytes())]
    assert names == ["opt", "opt/root", "opt/root/lib", "opt/root/lib/x"]
