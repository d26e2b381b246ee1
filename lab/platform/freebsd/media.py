"""The FreeBSD VM image and everything media: the release (given, or the latest
14.x), the publisher's CHECKSUM files, the image named there, its verified
download and unpacking into the cache, what the plan says about them, and what a
machine lacks before a run can start (`missing_media`, `media_or_error`)."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import cache
from lab.errors import LabError, ScenarioError
from lab.platform.freebsd.fetch import Fetcher, is_url
from lab.platform.freebsd.fetch import media_error as _media
from lab.platform.freebsd.packages import (
    DOM0_PACKAGES,
    cached_packages,
    missing_pkg_files,
    pkg_repo_base,
    repo_cache_sub,
    split_version,
)

if TYPE_CHECKING:
    from lab import scenario

DOWNLOAD_BASE = "https://download.freebsd.org/releases/VM-IMAGES/"
FALLBACK_VERSION = "14.3"  # the plan's version when the latest cannot be looked up
# The provisioning is a plain #!/bin/sh user-data, which nuageinit runs in 14.3 and
# 14.4 alike (14.3's nuageinit predates write_files, so #cloud-config files would be
# skipped there). nuageinit first shipped in 14.1 (nuageinit(7) HISTORY); 14.1's and
# 14.2's were not checked, 13.x has none. Later 14.x and 15.x: on paper.
MIN_VERSION = (14, 3)
# The only image flavour whose first boot runs nuageinit and whose loader.conf puts
# the console on the serial line (release/tools/basic-cloudinit.conf: VM_RC_LIST
# enables nuageinit, loader.conf gets console="comconsole,vidconsole"). The plain
# image runs nothing from a config disk and prints nothing on serial.
CLOUDINIT = "BASIC-CLOUDINIT"


# ------------------------------------------------------------------ the image
_CHECKSUM_LINE = re.compile(r"^(SHA512|SHA256) \((?P<name>[^()/]+)\) = (?P<hex>[0-9a-fA-F]+)$")
_HEX_LEN = {"SHA512": 128, "SHA256": 64}


def parse_checksum(text: str) -> dict[str, str]:
    """{file name: lower-case hex} from a BSD-style CHECKSUM file, the output of
    FreeBSD's sha512(1)/sha256(1): `SHA512 (NAME) = HEX`. Other lines (blank,
    PGP armour) are ignored; a file with no valid entry is an error."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        m = _CHECKSUM_LINE.match(raw.strip())
        if m and len(m["hex"]) == _HEX_LEN[m[1]]:
            out[m["name"]] = m["hex"].lower()
    if not out:
        first = next((line for line in text.splitlines() if line.strip()), "")
        raise _media(f"not a CHECKSUM file (no 'SHA512 (NAME) = HEX' line); it starts with {first[:80]!r}")
    return out


def digest_kw(hexdigest: str) -> dict[str, Any]:
    """{'sha512': hex} or {'sha256': hex}, from the digest's length: Fetcher.fetch's keywords."""
    return {"sha512": hexdigest} if len(hexdigest) == 128 else {"sha256": hexdigest}


@dataclass(frozen=True)
class ImageName:
    """What a VM image's file name says. The release tooling (release/Makefile.mirrors)
    writes FreeBSD-<rev>-<branch>-<arch>[-<flavour>][-<snapshot>][-<fs>].<fmt>.xz;
    13.x had no -<fs> (UFS only) and snapshots put a date-hash stamp before the fs."""

    name: str
    flavour: str  # "" (plain), "BASIC-CLOUDINIT", "BASIC-CI", ...
    fs: str
    fmt: str
    compressed: bool


def _image_name(name: str, version: str, arch: str) -> ImageName | None:
    m = re.fullmatch(
        rf"FreeBSD-{re.escape(version)}-[A-Z0-9]+-{re.escape(arch)}"
        r"(?:-(?P<flavour>[A-Z][A-Z0-9]*(?:-[A-Z][A-Z0-9]*)*))?"
        r"(?:-\d{8}-[0-9a-f]+-\d+)?"
        r"(?:-(?P<fs>ufs|zfs))?"
        r"\.(?P<fmt>qcow2|raw|vhd|vmdk)(?P<xz>\.xz)?",
        name,
    )
    if not m:
        return None
    return ImageName(name, m["flavour"] or "", m["fs"] or "ufs", m["fmt"], bool(m["xz"]))


def pick_vm_image(
    checksums: Mapping[str, str],
    *,
    version: str,
    arch: str = "amd64",
    fs: str = "ufs",
    fmt: str = "qcow2",
    flavours: Sequence[str] = (CLOUDINIT,),
) -> str:
    """The image to download, chosen from the names CHECKSUM lists: the first
    flavour in `flavours` that exists (only BASIC-CLOUDINIT runs nuageinit, which
    the provisioning needs: a release without it is refused, naming the flavour),
    `fmt` before raw, compressed before uncompressed."""
    fmts = [fmt] + (["raw"] if fmt != "raw" else [])
    best: tuple[tuple[int, int, int], str] | None = None
    for name in checksums:
        img = _image_name(name, version, arch)
        if not img or img.fs != fs or img.flavour not in flavours or img.fmt not in fmts:
            continue
        rank = (list(flavours).index(img.flavour), fmts.index(img.fmt), 0 if img.compressed else 1)
        if best is None or rank < best[0]:
            best = (rank, name)
    if best is None and CLOUDINIT in flavours:
        others = sorted(n for n in checksums if (i := _image_name(n, version, arch)) and i.flavour != CLOUDINIT)
        if others:
            raise _media(f"FreeBSD {version} {arch}: no {CLOUDINIT} VM image ({fs}) among the files CHECKSUM lists, "
                         f"only {', '.join(others)}. " + flavour_advice(version, arch))
    if best is None:
        listed = "\n  ".join(sorted(checksums)) or "(none)"
        want = " or ".join(f or "plain" for f in flavours)
        raise _media(
            f"no FreeBSD {version} {arch} VM image ({want}, {fs}, {' or '.join(fmts)}) among the "
            f"files CHECKSUM lists:\n  {listed}")
    return best[1]


def flavour_advice(version: str, arch: str = "amd64") -> str:
    return (f"The lab needs the {CLOUDINIT} flavour: only its first boot runs nuageinit (the provisioning) and "
            "prints on the serial console; the plain image would wait silently until the provisioning deadline. "
            f"Download FreeBSD-{version}-RELEASE-{arch}-{CLOUDINIT}-ufs.qcow2.xz and CHECKSUM.SHA512 from "
            f"{vm_image_base(version, arch)}")


def flavour_problem(name: str, version: str, arch: str = "amd64") -> str | None:
    """Why the image file `name` cannot be provisioned (not BASIC-CLOUDINIT), or None."""
    img = _image_name(name, version, arch)
    if img is None:
        return (f"{name} is not named like a FreeBSD {version} {arch} VM image, so its flavour is unknown. "
                + flavour_advice(version, arch))
    if img.flavour != CLOUDINIT:
        what = f"the {img.flavour} flavour" if img.flavour else "the plain VM image"
        return f"{name} is {what}. " + flavour_advice(version, arch)
    return None


def check_version(version: str) -> None:
    """Refuse a release the provisioning does not support, saying which ones it does."""
    major, minor = split_version(version)
    if (major, minor) < MIN_VERSION:
        why = ("13.x has no nuageinit" if major < 14 else
               "its nuageinit was never checked" if (major, minor) >= (14, 1) else "it has no nuageinit")
        raise ScenarioError(
            f"FreeBSD {version} as the dom0: not supported ({why}). The dom0 image is provisioned by nuageinit "
            f"from a {CLOUDINIT} VM image; supported: {MIN_VERSION[0]}.{MIN_VERSION[1]} and later "
            "(set [freebsd] version, or leave it empty for the latest 14.x)")


def latest_release(listing_html: str, major: int = 14) -> str:
    """The highest `<major>.<minor>` with a `-RELEASE/` entry in an HTML directory
    index of .../releases/VM-IMAGES/ (minor compared as a number: 14.10 > 14.9)."""
    minors = {
        int(m[1])
        for m in re.finditer(rf"""href=["']?(?:\./)?{major}\.(\d+)-RELEASE/?["'>\s]""", listing_html)
    }
    if not minors:
        raise _media(f"no {major}.x-RELEASE in the VM-IMAGES directory listing")
    return f"{major}.{max(minors)}"


def vm_image_base(version: str, arch: str = "amd64") -> str:
    return f"{DOWNLOAD_BASE}{version}-RELEASE/{arch}/Latest/"


def get_image(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
              base_url: str | None = None) -> Path:
    """The verified, still compressed VM image. `source`: the user's image file (its
    CHECKSUM.SHA512 must sit beside it) or a directory holding both; None downloads
    CHECKSUM.SHA512 and the image it names from `base_url` (the release's)."""
    if source and not is_url(source):
        src = Path(source).expanduser()
        folder = src if src.is_dir() else src.parent
        sums_file = next((folder / n for n in ("CHECKSUM.SHA512", "CHECKSUM.SHA256") if (folder / n).is_file()), None)
        if sums_file is None:
            raise _media(f"{folder}: no CHECKSUM.SHA512 beside the image; download it from "
                         f"{vm_image_base(version, arch)} and put it there")
        sums = parse_checksum(sums_file.read_text())
        name = src.name if src.is_file() else pick_vm_image(sums, version=version, arch=arch)
        if name not in sums:
            raise _media(f"{sums_file} does not list {name}")
        problem = flavour_problem(name, version, arch)
        if problem:
            raise _media(problem)
        return fetcher.fetch(str(folder), name=name, **digest_kw(sums[name]))
    base = source or base_url or vm_image_base(version, arch)
    base += "" if base.endswith("/") else "/"
    sub = image_cache_sub(version, arch)
    sums = parse_checksum(fetcher.fetch(base, name="CHECKSUM.SHA512", dest=f"{sub}/CHECKSUM.SHA512").read_text())
    name = pick_vm_image(sums, version=version, arch=arch)
    return fetcher.fetch(base, name=name, dest=f"{sub}/{name}", **digest_kw(sums[name]))


def image_cache_sub(version: str, arch: str) -> str:
    return f"freebsd/{version}-{arch}"


def decompress_image(xz_path: Path, *, out_dir: Path | None = None, timeout: float = 1800) -> Path:
    """`xz -dc` into <out_dir>/<name without .xz>, read-only: the base of every
    overlay, never written by a run. Put into the cache the one way (lab.cache:
    unpacked aside, renamed when xz succeeded, under a lock). The user's own files
    are only read (out_dir: the cache, not their directory). `<out>.from` names the
    .xz it came from (name, size, mtime): a different file of the same name is
    unpacked again, never mistaken for the cached one."""
    if xz_path.suffix != ".xz":
        return xz_path
    out = (out_dir or xz_path.parent) / xz_path.with_suffix("").name
    st = xz_path.stat()
    origin = f"{xz_path.resolve()} {st.st_size} {st.st_mtime_ns}\n"
    stamp = out.with_name(out.name + ".from")

    def fresh() -> bool:
        return out.exists() and stamp.is_file() and stamp.read_text() == origin

    if fresh():
        return out
    with cache.locked(out):  # the check, the unpacking and the stamp: one at a time
        if fresh():
            return out
        # another .xz of that name was unpacked here: that entry is stale (the stamp
        # goes first, so a crash in between leaves an entry that is unpacked again)
        stamp.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        cache.sweep(out.parent)
        tmp = cache.aside(out)
        try:
            with open(tmp, "wb") as f:
                res = subprocess.run(["xz", "--decompress", "--stdout", "--threads=0", str(xz_path)], stdout=f,
                                     stderr=subprocess.PIPE, timeout=timeout)
            if res.returncode != 0:
                raise _media(f"xz could not decompress {xz_path}: {res.stderr.decode(errors='replace').strip()}")
            tmp.chmod(0o444)
            cache.promote(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)  # gone after promote; left only by a failure
        stamp.write_text(origin)
    return out


# ---------------------------------------------------------- missing media
def https_reachable(url: str, timeout: float = 5.0) -> bool:
    """A HEAD request answered with a non-error status within `timeout` seconds."""
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "xen-blklab"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def missing_media(*, image_file: str | None, packages_dir: str | None, cache_dir: Path, version: str,
                  arch: str = "amd64", reachable: Callable[[str], bool] = https_reachable) -> list[str]:
    """What a FreeBSD-dom0 lab lacks before it can start, each with how to supply
    it (a `[freebsd]` key of the scenario). Empty: everything is here or can be
    downloaded."""
    out: list[str] = []
    base = vm_image_base(version, arch)
    work = cache_dir / image_cache_sub(version, arch)
    if image_file:
        problem = _local_image_problem(Path(image_file).expanduser(), version, arch)
        if problem:
            out.append(f"FreeBSD {version} VM image: {problem}")
    elif not _cached_image(work, version, arch) and not reachable(base + "CHECKSUM.SHA512"):
        host = urllib.parse.urlsplit(base).netloc
        out.append(
            f"FreeBSD {version} VM image: not in the cache and {host} is unreachable from here; download "
            f"FreeBSD-{version}-RELEASE-{arch}-BASIC-CLOUDINIT-ufs.qcow2.xz (or the name CHECKSUM.SHA512 lists "
            f"today) and its CHECKSUM.SHA512 from {base} and pass it with [freebsd] image = PATH")
    repo = pkg_repo_base(version, arch)
    if packages_dir:
        d = Path(packages_dir).expanduser()
        if not d.is_dir():
            out.append(f"FreeBSD packages: {d} is not a directory ([freebsd] packages = DIR)")
        elif not any((d / n).is_file() for n in ("packagesite.yaml", "packagesite.pkg")):
            out.append(f"FreeBSD packages: {d} has no packagesite.pkg; download {repo}packagesite.pkg into it "
                       "(the catalogue that names and checksums every package)")
        else:
            out += missing_pkg_files(d)
    elif not cached_packages(cache_dir / repo_cache_sub(repo)) and not reachable(repo + "meta.conf"):
        host = urllib.parse.urlsplit(repo).netloc
        out.append(
            f"FreeBSD packages {', '.join(DOM0_PACKAGES)} and their dependencies: not in the cache and {host} "
            f"is unreachable from here; download {repo}packagesite.pkg and the .pkg files it lists for them "
            f"(on FreeBSD: `pkg fetch -d -o DIR {' '.join(DOM0_PACKAGES)}`, then copy packagesite.pkg into DIR) "
            "and pass the directory with [freebsd] packages = DIR")
    return out


def _local_image_problem(p: Path, version: str, arch: str) -> str | None:
    base = vm_image_base(version, arch)
    if not p.exists():
        return (f"{p} does not exist; [freebsd] image = PATH must name the .qcow2.xz (or a directory "
                "holding it and CHECKSUM.SHA512)")
    folder = p if p.is_dir() else p.parent
    if not (folder / "CHECKSUM.SHA512").is_file():
        return (f"no CHECKSUM.SHA512 beside {p}; download it from {base}CHECKSUM.SHA512 and put it in "
                f"{folder}")
    try:
        sums = parse_checksum((folder / "CHECKSUM.SHA512").read_text())
        name = p.name if p.is_file() else pick_vm_image(sums, version=version, arch=arch)
    except LabError as e:
        return f"{folder / 'CHECKSUM.SHA512'}: {e.message}"
    if name not in sums:
        return f"{folder / 'CHECKSUM.SHA512'} does not list {name} (a different release's checksums?)"
    problem = flavour_problem(name, version, arch)
    if problem:
        return problem
    if not (folder / name).is_file():
        return f"{folder} has CHECKSUM.SHA512 but not {name}; download it from {base}{name}"
    return None


def _cached_image(work: Path, version: str, arch: str) -> bool:
    sums = work / "CHECKSUM.SHA512"
    if not sums.is_file():
        return False
    try:
        name = pick_vm_image(parse_checksum(sums.read_text()), version=version, arch=arch)
    except LabError:
        return False
    return (work / name).is_file()  # only a verified download is ever renamed to its final name


# ---------------------------------------------------------- the run's media
def freebsd_version(sc: scenario.Scenario, *, online: bool = True,
                    index_url: str = DOWNLOAD_BASE) -> tuple[str, str]:
    """(version, how it was chosen): the scenario's, else the latest 14.x RELEASE
    from the publisher's index, else a known release for a plan made offline."""
    if sc.freebsd.version:
        return sc.freebsd.version, "from the scenario"
    if online:
        try:
            with urllib.request.urlopen(index_url, timeout=5) as r:
                return latest_release(r.read().decode(errors="replace"), 14), "latest 14.x RELEASE"
        except (OSError, ValueError, LabError):
            pass
    return FALLBACK_VERSION, "download.freebsd.org unreachable: assumed the latest known 14.x"


def media_or_error(sc: scenario.Scenario, *, cache_dir: Path,
                   reachable: Callable[[str], bool] = https_reachable) -> tuple[str, str]:
    """A FreeBSD dom0 needs media that only the user's machine or the internet has.
    Say at once, in seconds and before anything starts, what is missing and how to
    supply it (LabError at stage `image`). Returns (version, how it was chosen)."""
    version, how = freebsd_version(sc)
    check_version(version)
    missing = missing_media(image_file=sc.freebsd.image or None, packages_dir=sc.freebsd.packages or None,
                            cache_dir=cache_dir, version=version, reachable=reachable)
    if missing:
        raise LabError("image", f"FreeBSD {version} dom0 ({how}): media missing on this machine:\n  - "
                       + "\n  - ".join(missing)
                       + f"\nSupply them in the scenario's [freebsd] table ({sc.source}), or run on a machine "
                       "that reaches download.freebsd.org and pkg.freebsd.org. `lab run ... --plan` lists every step.")
    return version, how


def media_plan(*, version: str, arch: str, image_file: str | None, packages_dir: str | None) -> list[dict[str, Any]]:
    """The plan's media steps: what get_image, decompress_image and get_packages
    above do, with their URLs (`{name}`: the image CHECKSUM.SHA512 names at run
    time). Paths are under the cache (`$CACHE` = images.cache_dir())."""
    split_version(version)
    work = f"$CACHE/{image_cache_sub(version, arch)}"
    repo = pkg_repo_base(version, arch)
    steps: list[dict[str, Any]] = []
    if image_file:
        folder = str(Path(image_file).parent) if not Path(image_file).is_dir() else image_file
        steps.append({"step": "image", "what": "use the given image in place, verified against the CHECKSUM.SHA512 "
                      "beside it", "path": image_file, "verify": f"sha512 from {folder}/CHECKSUM.SHA512"})
    else:
        base = vm_image_base(version, arch)
        steps.append({"step": "checksum", "what": "download the release's checksums", "url": base + "CHECKSUM.SHA512",
                      "dest": f"{work}/CHECKSUM.SHA512"})
        steps.append({"step": "image", "what": "download the image CHECKSUM.SHA512 names (BASIC-CLOUDINIT only: "
                      "the plain image is refused; ufs, qcow2.xz preferred), resumable", "url": base + "{name}", "dest": f"{work}/{{name}}",
                      "chosen_by": "pick_vm_image"})
    steps.append({"step": "verify", "what": "sha512 of the image against CHECKSUM.SHA512 before it is renamed into "
                  "the cache", "algo": "sha512"})
    steps.append({"step": "decompress", "what": "unpack the image (read-only base from here on), aside and renamed "
                  "into the cache under a lock (lab.cache)",
                  "command": ["xz", "--decompress", "--stdout", "--threads=0", f"{work}/{{name}}"],
                  "output": f"{work}/{{name}} without .xz"})
    if packages_dir:
        steps.append({"step": "packages", "what": "use the given packages in place: catalogue (packagesite.yaml or "
                      ".pkg; a signed .pkg is checked as a download is, an unsigned one is recorded as such) and .pkg "
                      "files, each verified by the catalogue's sha256", "path": packages_dir})
    else:
        steps.append({"step": "packagesite", "what": "download the catalogue of the release's package set and "
                      "check its signature: a .sig/.pub pair in packagesite.pkg whose key has the fingerprint FreeBSD "
                      "trusts (share/keys/pkg/trusted/pkg.freebsd.org.2013102301), RSA over the catalogue's sha256",
                      "url": repo + "meta.conf", "then": repo + "packagesite.pkg",
                      "extract": ["zstd", "-dc", "packagesite.pkg", "|", "tar", "-x", "packagesite.yaml"]})
        steps.append({"step": "packages", "what": f"resolve {', '.join(DOM0_PACKAGES)} with their dependencies "
                      "(deps first) and download each, verified by sha256", "url": repo + "{repopath}",
                      "wanted": list(DOM0_PACKAGES)})
    return steps
