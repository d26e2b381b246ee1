"""lab/images.py: the host's apt sources, the recipes, the cache key of an image and
the lab's SSH keys. Nothing here runs mmdebstrap."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import paramiko
import pytest
from labdata import DATA

from lab import images, ramroot
from lab.errors import LabError
from lab.images import AptSource

DEBIAN = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


# ------------------------------------------------------------ apt sources
def test_parse_deb822_shall_give_one_source_per_uri_and_suite() -> None:
    """tests/data/apt-debian.sources: two stanzas, the first with two suites; the
    comment lines inside the stanzas are not fields."""
    got = images.parse_apt_sources((DATA / "apt-debian.sources").read_text(), deb822=True)
    assert got == [
        AptSource(DEBIAN, "bookworm", ("main",)),
        AptSource(DEBIAN, "bookworm-updates", ("main",)),
        AptSource(SECURITY, "bookworm-security", ("main",)),
    ]


def test_parse_deb822_shall_skip_deb_src_disabled_and_keep_continuation_lines() -> None:
    text = (
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "types: deb deb-src\nuris: http://a.example/debian/\n  http://b.example/debian\n"
        "suites: bookworm\ncomponents: main contrib\n"
    )
    assert images.parse_apt_sources(text, deb822=True) == [
        AptSource("http://a.example/debian", "bookworm", ("main", "contrib")),
        AptSource("http://b.example/debian", "bookworm", ("main", "contrib")),
    ]


def test_parse_one_line_format_shall_drop_options_comments_and_other_types() -> None:
    text = (
        "# the main mirror\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://ftp.example.org/debian/ bookworm main contrib non-free-firmware # trailing comment\n"
        "deb-src http://ftp.example.org/debian bookworm main\n"
        "#deb http://old.example/debian bullseye main\n"
        "   deb http://ftp.example.org/debian bookworm-updates main\n"
        "deb http://broken.example/debian\n"
        "\n"
    )
    assert images.parse_apt_sources(text, deb822=False) == [
        AptSource("http://ftp.example.org/debian", "bookworm", ("main", "contrib", "non-free-firmware")),
        AptSource("http://ftp.example.org/debian", "bookworm-updates", ("main",)),
    ]


def test_apt_source_line_shall_be_a_one_line_sources_entry() -> None:
    src = AptSource(DEBIAN, "bookworm", ("main",))
    assert src.line() == f"deb {DEBIAN} bookworm main"
    assert images.parse_apt_sources(src.line(), deb822=False) == [src]


def _etc(tmp_path: Path, sources_list: str | None, extra: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (etc / "sources.list").write_text(sources_list)
    for name, text in extra.items():
        (etc / "sources.list.d" / name).write_text(text)
    return etc


def test_host_mirror_shall_pick_the_suite_updates_and_security_main_only(tmp_path: Path) -> None:
    etc = _etc(
        tmp_path,
        "deb http://mirror.example/debian bookworm main contrib\n"
        "deb http://mirror.example/debian bookworm-backports main\n"
        "deb http://mirror.example/debian trixie main\n"
        "deb http://contrib-only.example/debian bookworm contrib\n",
        {
            "debian.sources": (DATA / "apt-debian.sources").read_text(),
            "dup.list": f"deb {DEBIAN} bookworm main\n",  # same as in debian.sources: kept once
            "ignored.list.save": "deb http://save.example/debian bookworm main\n",
            "ignored.disabled": "deb http://disabled.example/debian bookworm main\n",
        },
    )
    assert images.host_mirror("bookworm", etc) == [
        AptSource("http://mirror.example/debian", "bookworm", ("main",)),
        AptSource(DEBIAN, "bookworm", ("main",)),
        AptSource(DEBIAN, "bookworm-updates", ("main",)),
        AptSource(SECURITY, "bookworm-security", ("main",)),
    ]


def test_host_mirror_shall_work_with_only_a_sources_list_d(tmp_path: Path) -> None:
    etc = _etc(tmp_path, None, {"debian.sources": (DATA / "apt-debian.sources").read_text()})
    assert [s.suite for s in images.host_mirror("bookworm", etc)] == ["bookworm", "bookworm-updates",
                                                                       "bookworm-security"]


@pytest.mark.parametrize(
    "sources_list",
    [
        "",
        "deb http://mirror.example/debian trixie main\n",
        # -updates and -security alone cannot build an image
        "deb http://mirror.example/debian bookworm-updates main\n"
        "deb http://mirror.example/debian-security bookworm-security main\n",
        "deb http://mirror.example/debian bookworm contrib non-free\n",
        "deb-src http://mirror.example/debian bookworm main\n",
    ],
)
def test_host_mirror_shall_raise_when_no_source_serves_the_suite(tmp_path: Path, sources_list: str) -> None:
    etc = _etc(tmp_path, sources_list, {})
    with pytest.raises(LabError) as e:
        images.host_mirror("bookworm", etc)
    assert e.value.stage == "image"
    assert "bookworm" in str(e.value) and str(etc) in str(e.value)


# ------------------------------------------------------------ recipes
def test_load_recipe_shall_read_the_dom0_recipe() -> None:
    r = images.load_recipe("linux-dom0")
    assert r.name == "linux-dom0" and r.dir == images.RECIPES / "linux-dom0"
    assert r.suite == "bookworm" and r.xen is True and r.hostkey == "dom0"
    assert "xen-hypervisor-4.17-amd64" in r.packages and "dmsetup" in r.packages
    assert "xen-blkback" in r.modules and "dm-mod" in r.modules
    assert set(r.initramfs_modules) == {"virtio_pci", "virtio_blk", "crc32c_generic", "ext4"}
    assert r.root_size == "1G"


def test_load_recipe_shall_read_the_guest_recipe() -> None:
    r = images.load_recipe("linux-guest")
    assert r.suite == "bookworm" and r.xen is False and r.hostkey == "guest"
    assert "fio" in r.packages
    assert "xen-blkfront" in r.modules and "xen-netfront" in r.modules
    assert isinstance(r.packages, tuple) and isinstance(r.modules, tuple)
    # the guest's root is its initramfs: nothing of it goes through the backend under test
    assert r.root == "initramfs" and r.initramfs_modules == () and r.root_size == ""
    assert images.image_files(r) == ["vmlinuz", "initrd.img", "manifest.json"]


def test_the_dom0_recipe_shall_keep_its_root_disk() -> None:
    r = images.load_recipe("linux-dom0")
    assert r.root == "disk"
    assert images.image_files(r) == ["vmlinuz", "initrd.img", "manifest.json", "root.img", "xen"]


def test_every_recipe_dir_shall_load() -> None:
    names = [p.name for p in images.RECIPES.iterdir() if (p / "recipe.toml").exists()]
    assert sorted(names) == ["linux-dom0", "linux-guest"]
    for n in names:
        assert images.load_recipe(n).name == n


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of images/ that a test may change, in place of the real one."""
    root = tmp_path / "images"
    shutil.copytree(images.RECIPES, root, symlinks=True)
    monkeypatch.setattr(images, "RECIPES", root)
    return root


def test_load_recipe_shall_refuse_unknown_and_missing_keys_and_recipes(recipes: Path) -> None:
    f = recipes / "linux-guest" / "recipe.toml"
    text = f.read_text()
    f.write_text(text + 'extra_packages = ["vim"]\n')
    with pytest.raises(LabError, match="extra_packages"):
        images.load_recipe("linux-guest")
    f.write_text(text.replace('hostkey = "guest"\n', ""))
    with pytest.raises(LabError, match="hostkey"):
        images.load_recipe("linux-guest")
    with pytest.raises(LabError, match="no image recipe"):
        images.load_recipe("linux-nothing")


@pytest.mark.parametrize(("recipe", "edit", "error"), [
    ("linux-guest", ('\nroot = "initramfs"', '\nroot = "nfs"'), "root = 'nfs'"),
    ("linux-guest", ('initrd_compression = "zstd"', 'initrd_compression = "lzma"'), "lzma"),
    ("linux-guest", ('\nroot = "initramfs"', '\nroot = "initramfs"\nroot_size = "1G"'), "no root disk"),
    ("linux-guest", ('\nroot = "initramfs"', '\nroot = "disk"'), "needs root_size"),
    ("linux-dom0", ('root_size = "1G"\n', ""), "needs root_size"),
])
def test_load_recipe_shall_refuse_a_root_it_cannot_build(
    recipes: Path, recipe: str, edit: tuple[str, str], error: str
) -> None:
    f = recipes / recipe / "recipe.toml"
    text = f.read_text()
    assert edit[0] in text
    f.write_text(text.replace(*edit))
    with pytest.raises(LabError, match=re.escape(error)):
        images.load_recipe(recipe)


# ------------------------------------------------------------ recipe hash
MIRROR = [AptSource(DEBIAN, "bookworm", ("main",)), AptSource(SECURITY, "bookworm-security", ("main",))]


def test_recipe_hash_shall_follow_the_recipe_files_and_the_mirror(recipes: Path, tmp_path: Path) -> None:
    keys = images.ensure_keys(tmp_path / "cache")

    def h(mirror: list[AptSource] = MIRROR) -> str:
        return images.recipe_hash(images.load_recipe("linux-guest"), mirror, keys)

    base = h()
    assert len(base) == 16 and int(base, 16) >= 0
    assert h() == base, "same inputs, same hash"

    recipe_file = recipes / "linux-guest" / "recipe.toml"
    original = recipe_file.read_text()
    recipe_file.write_text(original + "# a comment changes the file\n")
    assert h() != base
    recipe_file.write_text(original)
    assert h() == base, "back to the same bytes, back to the same hash"

    init = recipes / "linux-guest" / "rootfs" / "sbin" / "lab-init"
    saved = init.read_bytes()
    init.write_bytes(saved + b"\n")
    assert h() != base, "a file of the recipe's rootfs"
    init.write_bytes(saved)

    sample = recipes / "common" / "lab-sample"
    saved = sample.read_bytes()
    sample.write_bytes(saved + b"\n")
    assert h() != base, "a shared file under images/common"
    sample.write_bytes(saved)

    (recipes / "linux-dom0" / "recipe.toml").write_text("# another recipe's change\n")
    assert h() == base, "another recipe's files are not this image's input"

    assert h(MIRROR[:1]) != base
    assert h([*MIRROR, AptSource(DEBIAN, "bookworm-updates", ("main",))]) != base
    assert h([AptSource("http://other.example/debian", "bookworm", ("main",)), MIRROR[1]]) != base
    assert h(list(MIRROR)) == base


def test_recipe_hash_shall_follow_the_keys(recipes: Path, tmp_path: Path) -> None:
    r = images.load_recipe("linux-guest")
    a = images.recipe_hash(r, MIRROR, images.ensure_keys(tmp_path / "a"))
    b = images.recipe_hash(r, MIRROR, images.ensure_keys(tmp_path / "b"))
    assert a != b, "the keys are baked into the image"


def test_recipes_shall_hash_differently(tmp_path: Path) -> None:
    keys = images.ensure_keys(tmp_path)
    assert images.recipe_hash(images.load_recipe("linux-guest"), MIRROR, keys) != images.recipe_hash(
        images.load_recipe("linux-dom0"), MIRROR, keys)


# ------------------------------------------------------------ keys
def test_ensure_keys_shall_write_paramiko_loadable_private_keys_mode_0600(tmp_path: Path) -> None:
    keys = images.ensure_keys(tmp_path)
    assert keys.dir == tmp_path / "keys"
    for path in (keys.client, keys.host("dom0"), keys.host("guest")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        key = paramiko.Ed25519Key.from_private_key_file(str(path))
        kind, b64 = keys.public(path).split()[:2]
        assert kind == "ssh-ed25519" and b64 == key.get_base64(), "the .pub matches the private key"
    assert not list(keys.dir.glob("*.tmp"))
    names = {keys.client.read_bytes(), keys.host("dom0").read_bytes(), keys.host("guest").read_bytes()}
    assert len(names) == 3, "one key per role"


def test_ensure_keys_shall_not_regenerate_existing_keys(tmp_path: Path) -> None:
    first = images.ensure_keys(tmp_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.dir.iterdir()}
    second = images.ensure_keys(tmp_path)
    assert second == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in second.dir.iterdir()} == before


def test_ensure_keys_shall_add_only_a_missing_key(tmp_path: Path) -> None:
    keys = images.ensure_keys(tmp_path)
    client = keys.client.read_bytes()
    guest = keys.host("guest")
    guest.unlink()
    Path(str(guest) + ".pub").unlink()
    images.ensure_keys(tmp_path)
    assert keys.client.read_bytes() == client
    paramiko.Ed25519Key.from_private_key_file(str(guest))


# ------------------------------------------------------------ cache dir, stale builds, kernel
def test_cache_dir_shall_follow_lab_cache_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "lc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert images.cache_dir() == tmp_path / "lc"
    monkeypatch.delenv("LAB_CACHE")
    assert images.cache_dir() == tmp_path / "xdg" / "xen-blklab"


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """ensure_image with the mmdebstrap build replaced: `files` says what it makes."""
    state: dict = {"calls": 0, "files": ["vmlinuz", "initrd.img", "manifest.json"]}
    final = tmp_path / "images" / "linux-guest-0123456789abcdef"
    recipe = images.load_recipe("linux-guest")
    monkeypatch.setattr(images, "image_path", lambda name, cache=None: (recipe, final, [], None))

    def build(recipe, work, mirror, keys, run) -> None:
        state["calls"] += 1
        work.mkdir()
        for f in state["files"]:
            (work / f).write_text("{}")

    monkeypatch.setattr(images, "_build", build)
    state["final"] = final
    return state


def test_ensure_image_shall_build_once_into_the_cache(fake_build: dict) -> None:
    img = images.ensure_image("linux-guest", runner=object())  # type: ignore[arg-type]
    assert img.dir == fake_build["final"] and img.initrd.exists()
    images.ensure_image("linux-guest", runner=object())  # type: ignore[arg-type]
    assert fake_build["calls"] == 1
    left = sorted(p.name for p in img.dir.parent.iterdir())
    assert left == [f".{img.dir.name}.lock", img.dir.name], "nothing built aside is left"


def test_ensure_image_shall_not_cache_an_image_missing_a_file(fake_build: dict) -> None:
    fake_build["files"] = ["vmlinuz", "manifest.json"]  # no initrd.img
    with pytest.raises(LabError, match="initrd.img"):
        images.ensure_image("linux-guest", runner=object())  # type: ignore[arg-type]
    assert not fake_build["final"].exists()
    assert [p.name for p in fake_build["final"].parent.iterdir() if ".building-" in p.name] == []


def test_prune_ram_root_shall_drop_docs_and_interpreters_but_keep_what_runs(tmp_path: Path) -> None:
    keep = ["usr/bin/fio", "usr/sbin/sshd", "usr/bin/busybox", "usr/sbin/ip", "usr/bin/kmod",
            "usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2", "usr/lib/modules/6.1/kernel/x.ko",
            "var/log", "usr/bin/scp", "usr/share/fio-not-fio"]
    drop = ["boot/vmlinuz-6.1", "usr/share/doc/fio/copyright", "usr/share/man/man1/fio.1.gz",
            "usr/share/locale/de/LC_MESSAGES/x.mo", "usr/lib/python3.11/os.py", "usr/bin/python3.11",
            "usr/bin/perl", "usr/bin/perl5.36.0", "usr/lib/x86_64-linux-gnu/perl-base/strict.pm",
            "usr/lib/x86_64-linux-gnu/gconv/UTF-16.so", "var/lib/apt/lists/x_Packages", "var/cache/apt/pkgcache.bin",
            "var/log/dpkg.log", "usr/lib/x86_64-linux-gnu/ceph/compressor/libceph_zstd.so",
            "usr/lib/x86_64-linux-gnu/glusterfs/11.0/xlator/x.so", "var/lib/dpkg/status", "usr/bin/apt-get",
            "usr/lib/x86_64-linux-gnu/security/pam_unix.so", "usr/lib/udev/hwdb.bin"]
    for rel in keep + drop:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel == "var/log":
            p.mkdir(exist_ok=True)
        else:
            p.write_bytes(b"12345")
    freed = ramroot.prune_ram_root(tmp_path)
    assert freed == 5 * len(drop)
    for rel in keep:
        assert (tmp_path / rel).exists(), rel
    for rel in drop:
        assert not (tmp_path / rel).exists(), rel


def test_kernel_abi_shall_require_exactly_one_kernel(tmp_path: Path) -> None:
    (tmp_path / "lib/modules/6.1.0-56-amd64").mkdir(parents=True)
    assert images._kernel_abi(tmp_path) == "6.1.0-56-amd64"
    (tmp_path / "lib/modules/6.1.0-57-amd64").mkdir()
    with pytest.raises(LabError, match="one kernel"):
        images._kernel_abi(tmp_path)


def test_prune_modules_shall_keep_only_the_wanted_modules_and_their_deps(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1"
    dep = {"kernel/fs/ext4/ext4.ko": ["kernel/lib/crc16.ko"], "kernel/lib/crc16.ko": [],
           "kernel/sound/snd.ko": [], "kernel/drivers/block/xen-blkfront.ko": []}
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("".join(f"{k}: {' '.join(v)}\n" for k, v in dep.items()))
    (moddir / "modules.builtin").write_text("kernel/lib/crc32.ko\n")
    for p in dep:
        (moddir / p).parent.mkdir(parents=True, exist_ok=True)
        (moddir / p).write_bytes(b"x")
    (tmp_path / "usr/lib/firmware").mkdir(parents=True)
    images._prune_modules(tmp_path, "6.1", ["ext4", "crc32", "xen-blkfront"])
    left = sorted(str(p.relative_to(moddir)) for p in moddir.rglob("*.ko"))
    assert left == ["kernel/drivers/block/xen-blkfront.ko", "kernel/fs/ext4/ext4.ko", "kernel/lib/crc16.ko"]
    assert not (tmp_path / "usr/lib/firmware").exists()


# ------------------------------------------------------------ shared libraries nothing needs
HOST_BIN = Path("/usr/bin/ls")


@pytest.mark.skipif(not shutil.which("readelf") or not HOST_BIN.exists(), reason="needs readelf and /usr/bin/ls")
def test_elf_needed_shall_match_readelf_on_a_real_binary() -> None:
    import subprocess

    out = subprocess.run(["readelf", "-d", str(HOST_BIN)], capture_output=True, text=True, check=True).stdout
    want = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert want, "readelf shows the NEEDED entries of a dynamic binary"
    assert ramroot.elf_needed(HOST_BIN.read_bytes())[0] == want


@pytest.mark.parametrize("data", [b"#!/bin/sh\n", b"", b"\x7fELF\x01\x01" + bytes(60), b"\x7fELF\x02\x01" + bytes(10)])
def test_elf_needed_of_a_script_or_a_foreign_or_truncated_file_shall_be_empty(data: bytes) -> None:
    assert ramroot.elf_needed(data) == ([], [])


@pytest.mark.skipif(not HOST_BIN.exists(), reason="needs /usr/bin/ls")
def test_prune_unused_libs_shall_keep_the_closure_of_what_is_left(tmp_path: Path) -> None:
    """A root with one real binary: its libraries (and their soname links) stay,
    a library nothing names goes, and so does its link."""
    needed, _ = ramroot.elf_needed(HOST_BIN.read_bytes())
    libdir = tmp_path / ramroot.LIBDIR
    libdir.mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy(HOST_BIN, tmp_path / "usr/bin/ls")
    for name in needed:
        real = Path("/usr/lib/x86_64-linux-gnu") / name
        if real.exists():
            shutil.copy(real.resolve(), libdir / (name + ".real"))
            (libdir / name).symlink_to(name + ".real")
    (libdir / "libunused.so.1.2").write_bytes(b"\x7fELF" + bytes(100))
    (libdir / "libunused.so.1").symlink_to("libunused.so.1.2")
    (libdir / "libgcc_s.so.1").write_bytes(b"\x7fELF" + bytes(100))  # dlopened by glibc: kept
    freed = ramroot.prune_unused_libs(tmp_path)
    assert freed == 104
    assert not (libdir / "libunused.so.1").is_symlink() and not (libdir / "libunused.so.1.2").exists()
    assert (libdir / "libgcc_s.so.1").exists()
    for name in needed:
        if (Path("/usr/lib/x86_64-linux-gnu") / name).exists():
            assert (libdir / name).is_symlink() and (libdir / (name + ".real")).exists()
