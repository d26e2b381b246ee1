"""Base images: built once on L0 with mmdebstrap from the host's Debian mirror,
cached by a hash of the recipe and its inputs, never half-written (built aside,
then renamed), never written by a run (each run gets qcow2 overlays).

Also the lab's keys: one client key and one host key per machine kind, generated
once per lab (cache directory) and baked into the images, so host keys are known
before the first connection and can be pinned."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lab import cache as lab_cache
from lab import initramfs, ramroot
from lab.errors import LabError
from lab.runner import LocalRunner

log = logging.getLogger("lab.images")
RECIPES = Path(__file__).resolve().parent.parent / "images"
BUILDER_VERSION = "1"  # bump when the build steps change in a way the hash cannot see


def cache_dir() -> Path:
    env = os.environ.get("LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xen-blklab"


# ---------------------------------------------------------------- the mirror
@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def parse_apt_sources(text: str, *, deb822: bool) -> list[AptSource]:
    """Parse one sources file, one-line (`deb URI SUITE COMP...`) or deb822 format."""
    out: list[AptSource] = []
    if not deb822:
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            line = re.sub(r"\[[^\]]*\]", "", line)  # drop [options]
            parts = line.split()
            if len(parts) >= 4:
                out.append(AptSource(parts[1].rstrip("/"), parts[2], tuple(parts[3:])))
        return out
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append(AptSource(uri.rstrip("/"), suite, tuple(fields.get("components", "").split())))
    return out


def host_mirror(suite: str, etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """The host's own apt sources for `suite` (and -updates/-security), main only."""
    found: list[AptSource] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]
    for f in files:
        if f.suffix not in (".list", ".sources") and f.name != "sources.list":
            continue
        if f.is_file():
            found += parse_apt_sources(f.read_text(), deb822=f.suffix == ".sources")
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    picked = [
        AptSource(s.uri, s.suite, ("main",))
        for s in found
        if s.suite in wanted and "main" in s.components
    ]
    if not any(s.suite == suite for s in picked):
        raise LabError(
            "image",
            f"the host's apt sources under {etc} name no mirror for Debian '{suite}' main; "
            "add one (e.g. in /etc/apt/sources.list) or build the images elsewhere",
        )
    return list(dict.fromkeys(picked))


# ---------------------------------------------------------------- keys
@dataclass(frozen=True)
class Keys:
    dir: Path

    @property
    def client(self) -> Path:
        return self.dir / "id_ed25519"

    def host(self, kind: str) -> Path:
        return self.dir / f"ssh_host_ed25519_key.{kind}"

    def public(self, path: Path) -> str:
        return Path(str(path) + ".pub").read_text().strip()


def ensure_keys(base: Path | None = None) -> Keys:
    """Per-lab keys: the client key and one host key per machine kind.

    A missing pair is made under a lock (concurrent first runs would otherwise
    each write a pair and leave one run's private key beside another's public
    key, and both get baked into images), each file written aside under a unique
    name and renamed into place: the public key first, so a private key that
    exists always has its own public key beside it. The private key is created
    0600 (O_CREAT|O_EXCL with that mode): it is never readable by others, not
    even between its creation and a chmod."""
    keys = Keys((base or cache_dir()) / "keys")
    wanted = (keys.client, keys.host("dom0"), keys.host("guest"))
    if all(p.exists() for p in wanted):
        return keys
    keys.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with lab_cache.locked(keys.dir):
        lab_cache.sweep(keys.dir)  # halves of pairs left by a process killed mid-write
        for path in wanted:
            if not path.exists():  # or made by the process we waited for
                _new_key_pair(path)
    return keys


def _new_key_pair(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    k = ed25519.Ed25519PrivateKey.generate()
    priv = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    tmp = lab_cache.aside(path)
    tmp_pub = Path(str(tmp) + ".pub")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv)
        fd = os.open(tmp_pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pub + b" xen-blklab\n")
        os.replace(tmp_pub, str(path) + ".pub")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_pub.unlink(missing_ok=True)


# ---------------------------------------------------------------- recipes
ROOTS = ("disk", "initramfs")
COMPRESSIONS = ("gzip", "zstd")


@dataclass(frozen=True)
class Recipe:
    name: str
    dir: Path
    suite: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    hostkey: str
    xen: bool
    # "disk": root.img (ext4) + the lab's small initramfs that mounts it (dom0).
    # "initramfs": the whole pruned root filesystem is initrd.img and no disk is
    # involved (the guest: its root must not depend on the backend under test).
    root: str = "disk"
    initramfs_modules: tuple[str, ...] = ()  # root = "disk": what mounts the root disk
    root_size: str = ""  # root = "disk": the ext4 image's size
    initrd_compression: str = "gzip"  # root = "initramfs"
    # C programs of the lab's own, images/<name>/<name>.c, compiled static on L0
    # into /usr/local/bin (the guest's userspace frontend, blkring)
    programs: tuple[str, ...] = ()


def load_recipe(name: str) -> Recipe:
    d = RECIPES / name
    path = d / "recipe.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise LabError("image", f"no image recipe {path}") from None
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name", "dir"}
    unknown = set(raw) - fields
    if unknown:
        raise LabError("image", f"{path}: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
    try:
        r = Recipe(
            name=name, dir=d, suite=raw["suite"], packages=tuple(raw["packages"]),
            modules=tuple(raw["modules"]), hostkey=raw["hostkey"], xen=bool(raw["xen"]),
            root=raw.get("root", "disk"), initramfs_modules=tuple(raw.get("initramfs_modules", ())),
            root_size=raw.get("root_size", ""), initrd_compression=raw.get("initrd_compression", "gzip"),
            programs=tuple(raw.get("programs", ())),
        )
    except KeyError as e:
        raise LabError("image", f"{path}: missing key {e}") from None
    if r.root not in ROOTS:
        raise LabError("image", f"{path}: root = {r.root!r}; expected one of {list(ROOTS)}")
    if r.initrd_compression not in COMPRESSIONS:
        raise LabError("image", f"{path}: initrd_compression = {r.initrd_compression!r}; "
                       f"expected one of {list(COMPRESSIONS)}")
    if r.root == "disk" and not (r.root_size and r.initramfs_modules):
        raise LabError("image", f"{path}: root = \"disk\" needs root_size and initramfs_modules")
    for prog in r.programs:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", prog):
            raise LabError("image", f"{path}: program {prog!r}: expected a lower-case name (images/NAME/NAME.c)")
        if not program_source(prog).is_file():
            raise LabError("image", f"{path}: program {prog!r}: no source {program_source(prog)}")
    if r.root == "initramfs" and (r.root_size or r.initramfs_modules):
        raise LabError("image", f"{path}: root = \"initramfs\" has no root disk: "
                       "drop root_size and initramfs_modules (PID 1 loads the modules it needs)")
    return r


def recipe_hash(recipe: Recipe, mirror: list[AptSource], keys: Keys) -> str:
    """Everything that changes the image's bytes: the recipe's files, the shared
    files, the mirror, the keys baked in and the builder itself."""
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode())
    for base in (recipe.dir, RECIPES / "common", *(RECIPES / p for p in recipe.programs)):
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(RECIPES)).encode() + b"\0" + f.read_bytes())
    for src in (Path(__file__), Path(initramfs.__file__), Path(ramroot.__file__)):
        h.update(src.read_bytes())
    for s in mirror:
        h.update(s.line().encode())
    h.update(keys.public(keys.client).encode())
    h.update(keys.host(recipe.hostkey).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built base image: read-only files under one cache directory."""

    name: str
    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def xen(self) -> Path:
        return self.dir / "xen"

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())


def image_path(name: str, *, cache: Path | None = None) -> tuple[Recipe, Path, list[AptSource], Keys]:
    cache = cache or cache_dir()
    recipe = load_recipe(name)
    keys = ensure_keys(cache)
    mirror = host_mirror(recipe.suite)
    return recipe, cache / "images" / f"{name}-{recipe_hash(recipe, mirror, keys)}", mirror, keys


def ensure_image(name: str, *, cache: Path | None = None, runner: LocalRunner | None = None) -> Image:
    """The cached image for recipe `name`, building it first if its inputs changed."""
    recipe, final, mirror, keys = image_path(name, cache=cache)
    if not final.exists():
        run = runner or LocalRunner(name="image")
        lab_cache.put(final, lambda work: _build(recipe, work, mirror, keys, run),
                      verify=lambda work: verify_image(recipe, work))
    if not (final / "manifest.json").exists():
        raise LabError("image", f"{final} is not a complete image (no manifest.json); remove it to rebuild")
    restrict_modes(final)
    return Image(name, final)


def image_files(recipe: Recipe) -> list[str]:
    """The files a built image of `recipe` holds."""
    files = ["vmlinuz", "initrd.img", "manifest.json"]
    if recipe.root == "disk":
        files.append("root.img")
    if recipe.xen:
        files.append("xen")
    return files


def verify_image(recipe: Recipe, work: Path) -> None:
    """Refuse to cache an image that lacks a file or holds an empty one."""
    for f in image_files(recipe):
        p = work / f
        if not p.is_file() or p.stat().st_size == 0:
            raise LabError("image", f"{recipe.name}: the build made no {f} (or an empty one) in {work}")


def _build(recipe: Recipe, work: Path, mirror: list[AptSource], keys: Keys, run: LocalRunner) -> None:
    work.mkdir(parents=True)
    rootfs = work / "rootfs"
    log.info("building image %s with mmdebstrap (a few minutes)", recipe.name)
    argv = [
        "mmdebstrap", "--variant=minbase", "--mode=root",
        f"--include={','.join(recipe.packages)}",
        "--aptopt=Acquire::Languages \"none\"",
        # docs, man pages and locales are dead weight in a throwaway VM
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        recipe.suite, str(rootfs), *[s.line() for s in mirror],
    ]
    run.run(argv, timeout=1800).check("image")
    abi = _kernel_abi(rootfs)
    _prune_modules(rootfs, abi, list(recipe.modules))
    run.run(["chroot", str(rootfs), "depmod", "-a", abi], timeout=120).check("image")
    _customize(recipe, rootfs, keys)
    programs = build_programs(recipe, rootfs, run)

    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{abi}", work / "vmlinuz")
    manifest: dict = {"recipe": recipe.name, "kernel_abi": abi, "mirror": [s.line() for s in mirror],
                      "root": recipe.root}
    if programs:
        manifest["programs"] = programs
    if recipe.xen:
        xen_gz = sorted((rootfs / "boot").glob("xen-*.gz"))
        if not xen_gz:
            raise LabError("image", f"{recipe.name}: no /boot/xen-*.gz in the root filesystem")
        # QEMU's -kernel takes Xen's multiboot ELF, not the gzip Debian ships.
        (work / "xen").write_bytes(gzip.decompress(xen_gz[-1].read_bytes()))
        manifest["xen"] = xen_gz[-1].name
    pkgs = run.run(
        ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"], timeout=60
    ).check("image")
    manifest["packages"] = dict(line.split(" ", 1) for line in pkgs.stdout.splitlines() if " " in line)
    if recipe.root == "disk":
        init = (RECIPES / "common" / "initramfs-init").read_bytes()
        (work / "initrd.img").write_bytes(
            initramfs.build(root=rootfs, abi=abi, modules=list(recipe.initramfs_modules),
                            init=init, busybox=rootfs / "bin" / "busybox")
        )
        # initramfs-tools made a large initrd in /boot we never use
        for f in (rootfs / "boot").glob("initrd.img-*"):
            f.unlink()
        run.run(
            ["mkfs.ext4", "-q", "-F", "-L", "labroot", "-E", "root_owner=0:0", "-d", str(rootfs),
             str(work / "root.img"), recipe.root_size],
            timeout=600,
        ).check("image")
    else:
        manifest["initrd"] = ramroot.root_initrd(recipe.initrd_compression, rootfs, work, run)
    shutil.rmtree(rootfs)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    restrict_modes(work)


# The files of an image that hold the lab's private SSH host key: the root disk,
# and the initrd of an image whose root lives in RAM (the guest's: its whole root).
# A disk-root image's initrd holds only modules and init, but one rule per name is
# simpler to check. Whoever reads the key can impersonate the lab's machines: root
# only. QEMU runs as root; under the libvirt driver libvirt hands the disks it runs
# to its QEMU user, and the lab copies dom0's initrd for that user into the run's
# own work directory (lab/l0.py). Nothing else reads them.
KEY_HOLDERS = ("root.img", "initrd.img")


def restrict_modes(image_dir: Path) -> None:
    """Base images are never written by a run: read-only; those that hold the host
    key readable by root only. Also applied to images built before this rule."""
    for f in image_dir.iterdir():
        if f.is_file() and not f.is_symlink():
            want = 0o400 if f.name in KEY_HOLDERS else 0o444
            if f.stat().st_mode & 0o777 != want:
                f.chmod(want)


def _kernel_abi(rootfs: Path) -> str:
    abis = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    if len(abis) != 1:
        raise LabError("image", f"expected one kernel in the image, found {abis}")
    return abis[0]


def _prune_modules(rootfs: Path, abi: str, keep: list[str]) -> None:
    moddir = rootfs / "lib/modules" / abi
    deps = initramfs.parse_modules_dep((moddir / "modules.dep").read_text())
    builtin = {initramfs.module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    wanted = set(initramfs.resolve_modules(keep, deps, builtin))
    for rel in deps:
        if rel not in wanted:
            (moddir / rel).unlink(missing_ok=True)
    shutil.rmtree(rootfs / "usr/lib/firmware", ignore_errors=True)


def program_source(name: str) -> Path:
    return RECIPES / name / f"{name}.c"


def gcc_argv(src: Path, out: Path) -> list[str]:
    """One of the lab's C programs, static (the guest's root has no toolchain,
    and a static binary needs none of the libraries the RAM root prunes), with
    every warning an error. Only libc and the kernel's UAPI headers
    (linux-libc-dev) are used."""
    return ["gcc", "-std=gnu11", "-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)]


def build_programs(recipe: Recipe, rootfs: Path, run: LocalRunner) -> dict[str, str]:
    """Compile the recipe's programs into rootfs/usr/local/bin; refuse one that
    came out dynamically linked. Returns {name: sha256} for the manifest."""
    out: dict[str, str] = {}
    for name in recipe.programs:
        dst = rootfs / "usr/local/bin" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        run.run(gcc_argv(program_source(name), dst), timeout=300).check("image")
        data = dst.read_bytes()
        needed, _ = ramroot.elf_needed(data)
        if needed:
            raise LabError("image", f"{name} was linked against {needed}: expected a static binary")
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _customize(recipe: Recipe, rootfs: Path, keys: Keys) -> None:
    # the recipe's own files, then the shared helpers
    src = recipe.dir / "rootfs"
    if src.exists():
        shutil.copytree(src, rootfs, dirs_exist_ok=True, symlinks=True)
    shutil.copy2(RECIPES / "common" / "lab-sample", rootfs / "usr/local/bin/lab-sample")
    ssh = rootfs / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(keys.public(keys.client) + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    etc_ssh = rootfs / "etc/ssh"
    for old in etc_ssh.glob("ssh_host_*"):
        old.unlink()
    host = keys.host(recipe.hostkey)
    shutil.copyfile(host, etc_ssh / "ssh_host_ed25519_key")
    (etc_ssh / "ssh_host_ed25519_key").chmod(0o600)
    shutil.copyfile(Path(str(host) + ".pub"), etc_ssh / "ssh_host_ed25519_key.pub")
    (etc_ssh / "sshd_config.d").mkdir(exist_ok=True)
    (etc_ssh / "sshd_config.d/lab.conf").write_text(
        "# xen-blklab: keys only, no DNS lookups (nothing to ask), fast logins under TCG\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\nUsePAM no\nPrintMotd no\n"
        "ClientAliveInterval 10\nClientAliveCountMax 6\nMaxSessions 64\nMaxStartups 64\n"
    )
    (rootfs / "etc/fstab").write_text("LABEL=labroot / ext4 rw,noatime 0 1\n")
    (rootfs / "etc/hostname").write_text(recipe.hostkey + "\n")
    if recipe.xen:
        # xenconsoled logs every guest console to /var/log/xen/console/guest-NAME.log
        # (Debian's init script passes XENCONSOLED_ARGS through)
        default = rootfs / "etc/default/xen"
        text = default.read_text() if default.exists() else ""
        default.write_text(text + '\nXENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n')
