"""FreeBSD as the dom0: media, provisioning, kernel builds and blkback's counters.

FreeBSD runs as a Xen host in PVH mode only; its own loader boots Xen
(`xen_kernel` in /boot/loader.conf) and the backend under test, blkback (`xbbd`),
is built into GENERIC (facts/freebsd-dom0.md). The building blocks here:

- media: the official VM image, chosen from the release's CHECKSUM.SHA512 (names
  drift between releases, so nothing is hard-coded), and the packages xen-kernel
  and xen-tools with their dependencies, resolved from the package repository's
  catalogue and verified by the catalogue's sha256;
- `Fetcher`: resumable, verified, atomic downloads into the cache; a local file
  or directory given by the user is verified the same way and used in place;
- rendering: loader.conf and the nuageinit #cloud-config that provisions the
  image offline (packages from the config disk, never from the network);
- blkback's sysctl tree `dev.xbbd.<unit>.*` and the verdict rules over it, which
  work on kernels with and without the two counters the 2014 fix added;
- `plan_steps` / `missing_media`: every step with its exact command or URL, and
  what the user must supply when the media cannot be fetched from here.

Nothing here has run against real FreeBSD media yet (the development machines
cannot reach download.freebsd.org): the parts marked "unverified" are derived
from FreeBSD's sources and documentation and must be confirmed on a first real run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import console, qemu
from lab.errors import LabError, ScenarioError

log = logging.getLogger("lab.freebsd")

DOWNLOAD_BASE = "https://download.freebsd.org/releases/VM-IMAGES/"
PKG_BASE = "https://pkg.freebsd.org/"
# `pkg` itself first: a fresh image has only the bootstrap stub, which installs
# the real pkg from a local file (`pkg add ./pkg-X.pkg`) and nothing else.
DOM0_PACKAGES = ("pkg", "xen-kernel", "xen-tools")
CIDATA_PACKAGES = "packages"  # directory on the config disk holding the .pkg files
CIDATA_MOUNT = "/media/lab-cidata"
SRC_SERIAL, TARGET_SERIAL = "lab-src", "lab-dom0"  # disks of the kernel-build VM


def _media(msg: str) -> LabError:
    return LabError("media", msg)


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


def digest_kw(hexdigest: str) -> dict[str, str]:
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
    flavours: Sequence[str] = ("BASIC-CLOUDINIT", ""),
) -> str:
    """The image to download, chosen from the names CHECKSUM lists: the first
    flavour in `flavours` that exists (BASIC-CLOUDINIT carries nuageinit, which the
    provisioning needs), `fmt` before raw, compressed before uncompressed."""
    fmts = [fmt] + (["raw"] if fmt != "raw" else [])
    best: tuple[tuple[int, int, int], str] | None = None
    for name in checksums:
        img = _image_name(name, version, arch)
        if not img or img.fs != fs or img.flavour not in flavours or img.fmt not in fmts:
            continue
        rank = (list(flavours).index(img.flavour), fmts.index(img.fmt), 0 if img.compressed else 1)
        if best is None or rank < best[0]:
            best = (rank, name)
    if best is None:
        listed = "\n  ".join(sorted(checksums)) or "(none)"
        want = " or ".join(f or "plain" for f in flavours)
        raise _media(
            f"no FreeBSD {version} {arch} VM image ({want}, {fs}, {' or '.join(fmts)}) among the "
            f"files CHECKSUM lists:\n  {listed}")
    return best[1]


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


def pkg_repo_base(version: str, arch: str = "amd64") -> str:
    """The package set frozen at the release: FreeBSD:<major>:<arch>/release_<minor>/.
    `quarterly` and `latest` move under us (a package, its sha256 and its
    dependencies change from one week to the next, so a cached plan goes stale and a
    bisect compares different userlands); release_N was built once against the
    releng branch of that release and does not change. Its xen-tools is the one
    the Handbook's instructions for that release were written against."""
    major, minor = _split_version(version)
    return f"{PKG_BASE}FreeBSD:{major}:{arch}/release_{minor}/"


def _split_version(version: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", version)
    if not m:
        raise ScenarioError(f"FreeBSD version {version!r}: expected MAJOR.MINOR, e.g. '14.3'")
    return int(m[1]), int(m[2])


# ------------------------------------------------------------- the packages
@dataclass(frozen=True)
class Pkg:
    name: str
    version: str
    origin: str
    path: str  # relative to the repository root (repopath), e.g. All/xen-tools-4.18.0_1.pkg
    sha256: str
    size: int
    deps: tuple[str, ...]

    @property
    def filename(self) -> str:
        """The name on the config disk: `pkg add` finds a dependency of a local
        package as <dir>/<name>-<version>.pkg, whatever the repository called it."""
        return f"{self.name}-{self.version}.pkg"


def parse_packagesite(text: str) -> dict[str, Pkg]:
    """packagesite.yaml: one compact JSON manifest per line (pkg-repository(5))."""
    out: dict[str, Pkg] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            pkg = Pkg(
                name=m["name"], version=m["version"], origin=m.get("origin", ""),
                path=m.get("repopath") or m["path"], sha256=m["sum"].lower(), size=int(m.get("pkgsize", 0)),
                deps=tuple(sorted((m.get("deps") or {}).keys())),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _media(f"packagesite line {n}: not a package manifest ({type(e).__name__}: {e})") from None
        if not re.fullmatch(r"[0-9a-f]{64}", pkg.sha256):
            raise _media(f"packagesite line {n}: {pkg.name}: 'sum' is not a sha256")
        if pkg.name in out:
            raise _media(f"packagesite line {n}: {pkg.name} listed twice")
        out[pkg.name] = pkg
    if not out:
        raise _media("packagesite lists no package")
    return out


def resolve(catalogue: Mapping[str, Pkg], wanted: Iterable[str] = ("xen-kernel", "xen-tools")) -> list[Pkg]:
    """The dependency closure of `wanted`, dependencies before their dependents,
    each package once: the order `pkg add` needs them in."""
    order: list[Pkg] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in done or name in active:  # active: a dependency cycle, already on its way
            return
        pkg = catalogue.get(name)
        if pkg is None:
            why = f" (a dependency of {needed_by})" if needed_by else ""
            raise _media(f"package {name}{why} is not in the package catalogue")
        active.add(name)
        for dep in pkg.deps:
            visit(dep, name)
        active.discard(name)
        done.add(name)
        order.append(pkg)

    for name in wanted:
        visit(name, None)
    return order


def parse_meta_conf(text: str) -> dict[str, str | int]:
    """meta.conf (UCL, `key = value;`, or its JSON form): where the catalogue is.
    Defaults from pkg-repository(5) fill what the file leaves out."""
    meta: dict[str, str | int] = {"packing_format": "tzst", "manifests": "packagesite.yaml",
                                  "manifests_archive": "packagesite"}
    for m in re.finditer(r'"?([A-Za-z_]+)"?\s*[=:]\s*(?:"([^"]*)"|(\d+))', text):
        meta[m[1]] = m[2] if m[2] is not None else int(m[3])
    return meta


def packagesite_text(archive: bytes, member: str = "packagesite.yaml", *, timeout: float = 120) -> str:
    """The manifests out of packagesite.pkg: a tar, zstd-compressed on current
    repositories (`packing_format = "tzst"`), xz on older ones. Python's tarfile
    reads xz/gz/bz2 itself; zstd goes through the zstd tool (Debian's zstd)."""
    if archive[:4] == b"\x28\xb5\x2f\xfd":
        try:
            res = subprocess.run(["zstd", "-dc"], input=archive, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            raise _media("packagesite.pkg is zstd-compressed and the zstd tool is missing "
                         "(apt-get install zstd)") from None
        if res.returncode != 0:
            raise _media(f"packagesite.pkg: zstd failed: {res.stderr.decode(errors='replace').strip()}")
        archive = res.stdout
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read().decode()
    except (tarfile.TarError, KeyError) as e:
        raise _media(f"packagesite.pkg: no {member} in it ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------ fetching
class _Interrupted(Exception):
    """The transfer stopped before the end; the .part keeps what arrived."""


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host: the lab downloads only
    from the URLs it was given."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise _media(f"{req.full_url} redirects to {newurl}: not followed (another origin)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of `Content-Range: bytes FIRST-LAST/TOTAL` (or `*/TOTAL`)."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


class Fetcher:
    """Downloads into a cache directory, only from the URLs it is given.

    A download goes to `<dest>.part`; an existing .part is resumed with an HTTP
    Range request (a server that answers 200 instead of 206 ignored the Range: the
    .part is rewritten from the first byte). The file is verified (sha256/sha512)
    before an atomic rename into place, so a final file in the cache is always a
    whole, verified one. An interrupted transfer resumes up to `attempts` times,
    then fails with the .part kept for the next run; a checksum mismatch deletes
    the .part. Every network operation has `timeout` seconds (connect and each read).
    """

    def __init__(self, cache: Path, *, timeout: float = 30.0, attempts: int = 3,
                 progress: Callable[[int, int | None], None] | None = None) -> None:
        self.cache = cache
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.progress = progress
        self.opener = urllib.request.build_opener(_SameOrigin())

    def fetch(self, source: str, *, name: str | None = None, dest: str | None = None,
              sha256: str | None = None, sha512: str | None = None, refresh: bool = False,
              progress: Callable[[int, int | None], None] | None = None) -> Path:
        """The verified file for `source`.

        `source`: an http(s) URL of the file, or of a directory (ending in '/') with
        `name` the file's path below it; or a local file, or a local directory with
        `name` below it. Downloads land in `cache/dest` (default: `name`, else the
        URL's last component); local files are verified and used where they are.
        Without a digest a cached file is reused unless `refresh` (the catalogues of
        a release do not change)."""
        algo, expected = ("sha512", sha512) if sha512 else ("sha256", sha256) if sha256 else (None, None)
        expected = expected.lower() if expected else None
        for rel in (name, dest):
            if rel is not None and (not rel or rel.startswith("/") or ".." in Path(rel).parts):
                raise _media(f"{source}: {rel!r} is not a relative path below it")
        if not _is_url(source):
            return self._local(source, name, algo, expected)
        url = urllib.parse.urljoin(source, name) if name else source
        rel = dest or name or Path(urllib.parse.urlsplit(url).path).name
        if not rel:
            raise _media(f"{url}: cannot name a cache file after it")
        target = self.cache / rel
        if target.exists() and self._cached_ok(target, algo, expected, refresh):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        self._download(url, target, algo, expected, progress or self.progress)
        return target

    # -- local files: verified, used in place, never modified
    def _local(self, source: str, name: str | None, algo: str | None, expected: str | None) -> Path:
        path = Path(urllib.parse.urlsplit(source).path if source.startswith("file:") else source).expanduser()
        if path.is_dir():
            if not name:
                raise _media(f"{path} is a directory: which file in it?")
            # at its repository path (All/x.pkg, as `pkg fetch -o` stores it) or flat
            candidates = [path / name, path / Path(name).name]
            path = next((p for p in candidates if p.is_file()), candidates[0])
        if not path.is_file():
            raise _media(f"{path}: no such file")
        if algo and expected:
            got = file_digest(path, algo)
            if got != expected:
                raise _media(f"{path}: {algo} mismatch: expected {expected}, got {got} "
                             "(a different or damaged file; it was left as it is)")
        return path

    def _cached_ok(self, target: Path, algo: str | None, expected: str | None, refresh: bool) -> bool:
        if not algo:
            return not refresh
        stamp = target.with_name(target.name + ".verified")
        st = target.stat()
        key = f"{algo}:{expected}:{st.st_size}:{st.st_mtime_ns}"
        if stamp.exists() and stamp.read_text() == key:
            return True  # hashed before and unchanged since: a 700 MB image is not re-read every run
        if file_digest(target, algo) == expected:
            stamp.write_text(key)
            return True
        log.warning("%s in the cache does not match its %s: downloading it again", target, algo)
        target.unlink()
        stamp.unlink(missing_ok=True)
        return False

    def _download(self, url: str, target: Path, algo: str | None, expected: str | None,
                  progress: Callable[[int, int | None], None] | None) -> None:
        part = target.with_name(target.name + ".part")
        last: _Interrupted | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                self._transfer(url, part, progress)
                break
            except _Interrupted as e:
                last = e
                log.warning("%s: transfer interrupted (%s), attempt %d of %d", url, e, attempt, self.attempts)
        else:
            have = part.stat().st_size if part.exists() else 0
            raise _media(f"{url}: the transfer was interrupted {self.attempts} times (last: {last}); "
                         f"{part} keeps the {have} bytes received and the next run resumes from there")
        if algo and expected:
            got = file_digest(part, algo)
            if got != expected:
                part.unlink()
                raise _media(f"{target.name}: {algo} mismatch: expected {expected}, got {got} "
                             f"(downloaded from {url}; the partial file was deleted)")
        os.replace(part, target)  # atomic: the final name only ever holds a whole, verified file
        if algo and expected:
            st = target.stat()
            target.with_name(target.name + ".verified").write_text(
                f"{algo}:{expected}:{st.st_size}:{st.st_mtime_ns}")

    def _transfer(self, url: str, part: Path, progress: Callable[[int, int | None], None] | None) -> None:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "xen-blklab"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            total = _content_range(e.headers.get("Content-Range"))[1] if e.headers else None
            e.close()
            if e.code == 416 and offset:
                if total == offset:
                    return  # the .part already holds the whole file: verification decides
                part.unlink()  # longer than the file, or the file changed: start over
                raise _Interrupted(f"HTTP 416 for a .part of {offset} bytes; restarting from 0") from None
            raise _media(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _media(f"{url}: cannot connect ({reason}) within {self.timeout:.0f}s") from None
        with resp:
            if offset and resp.status == 206:
                first, total = _content_range(resp.headers.get("Content-Range"))
                if first != offset:
                    part.unlink()
                    raise _Interrupted(f"asked for byte {offset}, got a range starting at {first}")
                mode = "ab"
            else:
                if offset:
                    log.info("%s: the server ignored the Range request; downloading from the start", url)
                offset, mode = 0, "wb"
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            done = offset
            with open(part, mode) as f:
                try:
                    while chunk := resp.read(1 << 16):
                        f.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                except (OSError, ValueError) as e:  # IncompleteRead, reset, timeout mid-body
                    raise _Interrupted(f"{type(e).__name__} after {done} bytes") from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        if total is not None and done != total:
            raise _Interrupted(f"the connection closed after {done} of {total} bytes")


def get_image(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
              base_url: str | None = None) -> Path:
    """The verified, still compressed VM image. `source`: the user's image file (its
    CHECKSUM.SHA512 must sit beside it) or a directory holding both; None downloads
    CHECKSUM.SHA512 and the image it names from `base_url` (the release's)."""
    if source and not _is_url(source):
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
        return fetcher.fetch(str(folder), name=name, **digest_kw(sums[name]))
    base = source or base_url or vm_image_base(version, arch)
    base += "" if base.endswith("/") else "/"
    sub = image_cache_sub(version, arch)
    sums = parse_checksum(fetcher.fetch(base, name="CHECKSUM.SHA512", dest=f"{sub}/CHECKSUM.SHA512").read_text())
    name = pick_vm_image(sums, version=version, arch=arch)
    return fetcher.fetch(base, name=name, dest=f"{sub}/{name}", **digest_kw(sums[name]))


def image_cache_sub(version: str, arch: str) -> str:
    return f"freebsd/{version}-{arch}"


def repo_cache_sub(repo_url: str) -> str:
    """The cache directory of a package repository: freebsd/pkg/FreeBSD_14_amd64/release_3."""
    return "freebsd/pkg/" + urllib.parse.urlsplit(repo_url).path.strip("/").replace(":", "_")


def decompress_image(xz_path: Path, *, out_dir: Path | None = None, timeout: float = 1800) -> Path:
    """`xz -dc` into <out_dir>/<name without .xz>.part, renamed when xz succeeded
    and made read-only: the base of every overlay, never written by a run. The
    user's own files are only read (out_dir: the cache, not their directory).
    `<out>.from` names the .xz it came from (name, size, mtime): a different file
    of the same name is unpacked again, never mistaken for the cached one."""
    if xz_path.suffix != ".xz":
        return xz_path
    out = (out_dir or xz_path.parent) / xz_path.with_suffix("").name
    out.parent.mkdir(parents=True, exist_ok=True)
    st = xz_path.stat()
    origin = f"{xz_path.resolve()} {st.st_size} {st.st_mtime_ns}\n"
    stamp = out.with_name(out.name + ".from")
    if out.exists() and stamp.is_file() and stamp.read_text() == origin:
        return out
    part = out.with_name(out.name + ".part")
    with open(part, "wb") as f:
        res = subprocess.run(["xz", "--decompress", "--stdout", "--threads=0", str(xz_path)], stdout=f,
                             stderr=subprocess.PIPE, timeout=timeout)
    if res.returncode != 0:
        part.unlink(missing_ok=True)
        raise _media(f"xz could not decompress {xz_path}: {res.stderr.decode(errors='replace').strip()}")
    part.chmod(0o444)
    stamp.unlink(missing_ok=True)
    os.replace(part, out)
    stamp.write_text(origin)
    return out


def get_packages(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
                 wanted: Sequence[str] = DOM0_PACKAGES) -> list[tuple[Pkg, Path]]:
    """The verified .pkg files of `wanted` and their dependencies, deps first.
    `source`: a local directory with the catalogue (packagesite.yaml, or
    packagesite.pkg) and the .pkg files (at their repository path, e.g. All/..., or
    flat), or a repository URL; None = the release's repository."""
    base = source or pkg_repo_base(version, arch)
    base += "" if base.endswith("/") or not _is_url(base) else "/"
    if not _is_url(base):
        folder = Path(base).expanduser()
        if (folder / "packagesite.yaml").is_file():
            text = (folder / "packagesite.yaml").read_text()
        elif (folder / "packagesite.pkg").is_file():
            text = packagesite_text((folder / "packagesite.pkg").read_bytes())
        else:
            raise _media(f"{folder}: no packagesite.yaml or packagesite.pkg (the package catalogue) in it")
        cache_sub = None
    else:
        cache_sub = repo_cache_sub(base)
        meta = parse_meta_conf(fetcher.fetch(base, name="meta.conf", dest=f"{cache_sub}/meta.conf").read_text())
        archive = f"{meta['manifests_archive']}.pkg"
        text = packagesite_text(fetcher.fetch(base, name=archive, dest=f"{cache_sub}/{archive}").read_bytes(),
                                str(meta["manifests"]))
    out = []
    for pkg in resolve(parse_packagesite(text), wanted):
        dest = f"{cache_sub}/{pkg.path}" if cache_sub else None
        out.append((pkg, fetcher.fetch(base, name=pkg.path, dest=dest, sha256=pkg.sha256)))
    return out


# ---------------------------------------------------------------- rendering
def render_loader_conf(*, dom0_mem_mb: int, dom0_vcpus: int, iommu: bool, extra: str = "") -> str:
    """/boot/loader.conf lines: FreeBSD's loader boots Xen (`xen_kernel`), FreeBSD
    is its PVH dom0. `extra`: more words for Xen's command line."""
    if dom0_mem_mb < 256 or dom0_vcpus < 1:
        raise ScenarioError(f"FreeBSD dom0: memory {dom0_mem_mb}M / vcpus {dom0_vcpus}: need >= 256M and >= 1")
    if '"' in extra or "\n" in extra:
        raise ScenarioError(f"Xen command line {extra!r}: no double quotes or newlines (loader.conf quoting)")
    xen = [f"dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M", f"dom0_max_vcpus={dom0_vcpus}", "dom0=pvh"]
    if not iommu:
        # QEMU gives the Xen VM no IOMMU; without this Xen refuses to build a PVH dom0
        # (Xen's own CI runs `dom0-iommu=none dom0=pvh` under QEMU). Development only.
        xen.append("dom0-iommu=none")
    xen += ["console=com1", "com1=115200,8n1", "loglvl=all", "guest_loglvl=all", "noreboot"]
    xen += extra.split()
    return "\n".join([
        "# xen-blklab: FreeBSD's loader boots Xen; FreeBSD is Xen's PVH dom0",
        'xen_kernel="/boot/xen"',
        f'xen_cmdline="{" ".join(xen)}"',
        # the loader's and the kernel's own console on the serial line QEMU logs
        'boot_serial="YES"',
        'console="comconsole"',
        'comconsole_speed="115200"',
        'autoboot_delay="1"',  # the default 10 s menu would be paid on every boot
        'beastie_disable="YES"',
        'if_tap_load="YES"',
        "",
    ])


TTYS_XC0 = 'xc0 "/usr/libexec/getty Pc" xterm onifconsole secure'
SSHD_LINES = "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
# Printed on the console once sshd and xencommons are up: the dom0-ready milestone
# (the same words the Linux dom0's init prints, console.DOM0_INIT).
RC_READY = """#!/bin/sh
# PROVIDE: lab_ready
# REQUIRE: LOGIN sshd xencommons
# KEYWORD: nojail

. /etc/rc.subr

name=lab_ready
rcvar=lab_ready_enable
start_cmd="echo 'lab-dom0: ready'"
stop_cmd=":"

load_rc_config $name
run_rc_command "$1"
"""


def _safe_rel(path: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", path) or ".." in path.split("/"):
        raise ScenarioError(f"{what} {path!r}: letters, digits, '._-/' only")
    return path.strip("/")


def provision_script(*, packages_dir: str) -> list[str]:
    """The runcmd lines (nuageinit writes them to one /bin/sh script and runs it at
    the end of the first boot). The config disk is unmounted by then, so it is
    mounted again; `ORDER` on it lists the .pkg files dependencies first, pkg
    itself on the first line. Every step is checked: a nuageinit that skipped a
    write_files entry, or a package that did not install, ends the provisioning
    with `lab-provision: FATAL: ...` (console.LAB_FATAL) instead of a dom0 that
    fails later for no visible reason. The VM powers off in every case."""
    pkgdir = f"{CIDATA_MOUNT}/{_safe_rel(packages_dir, 'packages directory')}"
    check = "grep -qxF {line} {file} || fail '{file} lacks {what}'"
    return [
        "set -u",
        "said=",
        "fail() { said=1; echo \"lab-provision: FATAL: $*\"; exit 1; }",
        "trap 'rc=$?; [ $rc -eq 0 ] || [ -n \"$said\" ] || echo \"lab-provision: FATAL: exit $rc\"; poweroff' EXIT",
        f"mkdir -p {CIDATA_MOUNT}",
        f"mount -t cd9660 /dev/iso9660/cidata {CIDATA_MOUNT} || fail 'cannot mount the config disk'",
        f"cd {pkgdir} || fail 'no {packages_dir} on the config disk'",
        "export ASSUME_ALWAYS_YES=yes IGNORE_OSVERSION=yes",
        # The image's /usr/sbin/pkg is the bootstrap stub: it installs the real pkg from a
        # local file. With the default repository's fingerprints it would also want a
        # pkg.pkg.sig beside it; every file here was verified on L0 against the
        # catalogue's sha256, so the stub's own signature check is switched off (unverified).
        "SIGNATURE_TYPE=none pkg add -f \"./$(head -n 1 ORDER)\" || fail 'pkg bootstrap from the config disk'",
        "tail -n +2 ORDER | while read -r f; do pkg add \"./$f\" || exit 1; done || fail 'pkg add'",
        "test -f /boot/xen || fail 'xen-kernel installed no /boot/xen'",
        "cd / && umount " + CIDATA_MOUNT,
        check.format(line=shlex.quote('xen_kernel="/boot/xen"'), file="/boot/loader.conf", what="xen_kernel"),
        check.format(line="vm.max_wired=-1", file="/etc/sysctl.conf", what="vm.max_wired"),
        check.format(line=shlex.quote(TTYS_XC0), file="/etc/ttys", what="the xc0 line"),
        check.format(line="'PermitRootLogin prohibit-password'", file="/etc/ssh/sshd_config",
                     what="PermitRootLogin"),
        "test -x /etc/rc.d/lab_ready || fail 'no /etc/rc.d/lab_ready'",
        # memorylocked: the toolstack locks hypercall buffers (Handbook, Xen chapter)
        "sed -i '' -E 's/:memorylocked=[^:]*:/:memorylocked=unlimited:/' /etc/login.conf",
        "grep -q ':memorylocked=unlimited:' /etc/login.conf || fail 'login.conf memorylocked'",
        "cap_mkdb /etc/login.conf || fail 'cap_mkdb'",
        # write_files does not create directories: /root/.ssh is made here
        "install -d -m 700 /root/.ssh && install -m 600 /etc/ssh/lab_root_keys /root/.ssh/authorized_keys"
        " && rm /etc/ssh/lab_root_keys || fail 'root authorized_keys'",
        # the lab's commands arrive as `sh -c` strings over SSH, through root's login
        # shell: make it sh on every release (13.x gave root csh, which has other quoting)
        "pw usermod root -s /bin/sh || fail 'root shell'",
        "sysrc xencommons_enable=yes sshd_enable=yes lab_ready_enable=yes || fail sysrc",
        # guests' bridge (dom0 only, as on the Linux dom0) and QEMU's user network, static
        # renamed xenbr0: the xl template's vif names that bridge on both dom0 OSes
        "sysrc cloned_interfaces=bridge0 ifconfig_bridge0_name=xenbr0 ifconfig_xenbr0='inet 10.99.0.1/24 up' "
        "ifconfig_vtnet0='inet 10.0.2.15/24' defaultrouter=10.0.2.2 || fail sysrc",
        "echo 'lab-provision: done'",
    ]


def render_user_data(*, authorized_key: str, host_key_private: str, host_key_public: str,
                     packages_dir: str, loader_conf: str) -> str:
    """nuageinit's user-data for the provisioning boot (no Xen yet).

    Rendered as JSON under the #cloud-config line: JSON is valid YAML, so nuageinit
    reads it, and no value (keys, multi-line files) can break the YAML quoting.
    write_files only writes into directories the image already has; /root/.ssh
    is made by the script. `users: []` keeps nuageinit from creating its default
    user (`freebsd`, password `freebsd`): root with the lab's key is the only login."""
    for what, value in (("authorized_key", authorized_key), ("host_key_public", host_key_public)):
        if not re.fullmatch(r"ssh-[a-z0-9-]+ [A-Za-z0-9+/=]+( [^\n]*)?", value.strip()):
            raise LabError("image", f"{what} is not an OpenSSH public key line")
    if "PRIVATE KEY-----" not in host_key_private:
        raise LabError("image", "host_key_private is not an OpenSSH private key")
    # nuageinit names the files after the key: ed25519_private -> /etc/ssh/ssh_host_ed25519_key
    algo = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(host_key_public.split()[0])
    if algo is None:
        raise LabError("image", "host_key_public: only ssh-ed25519 or ssh-rsa host keys (nuageinit's key names)")
    files = [
        {"path": "/boot/loader.conf", "content": loader_conf, "append": True},
        {"path": "/etc/sysctl.conf", "content": "vm.max_wired=-1\n", "append": True},
        {"path": "/etc/ttys", "content": TTYS_XC0 + "\n", "append": True},
        # sshd takes the first value it reads; FreeBSD's sshd_config has these commented out
        {"path": "/etc/ssh/sshd_config", "content": SSHD_LINES, "append": True},
        {"path": "/etc/ssh/lab_root_keys", "content": authorized_key.strip() + "\n", "permissions": "0600"},
        {"path": "/etc/rc.d/lab_ready", "content": RC_READY, "permissions": "0755"},
    ]
    doc = {
        "hostname": "lab-dom0",
        "users": [],
        "ssh_keys": {f"{algo}_private": host_key_private.strip(), f"{algo}_public": host_key_public.strip()},
        "write_files": files,
        "runcmd": provision_script(packages_dir=packages_dir),
    }
    return "#cloud-config\n" + json.dumps(doc, indent=2) + "\n"


def render_meta_data(*, instance_id: str, hostname: str = "lab-dom0") -> str:
    """nocloud's meta-data file beside user-data on the config disk."""
    return f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"


def package_order(pkgs: Sequence[Pkg]) -> str:
    """The ORDER file of the config disk: pkg first, then dependencies before dependents."""
    names = [p.filename for p in pkgs if p.name == "pkg"] + [p.filename for p in pkgs if p.name != "pkg"]
    return "\n".join(names) + "\n"


def cidata_argv(staging: Path, iso: Path) -> list[str]:
    """The config disk. genisoimage (Debian package genisoimage): nuageinit looks for
    /dev/iso9660/cidata or /dev/msdosfs/cidata, and FreeBSD's label names are
    case-sensitive: an ISO volume id keeps `cidata` lower-case, while FAT labels are
    upper-case by convention (mkfs.msdos -n CIDATA would give /dev/msdosfs/CIDATA,
    which nuageinit does not look for). An ISO also needs no size chosen up front
    for ~100 MB of packages, and Rock Ridge (-r) keeps their long file names."""
    return ["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(staging)]


def build_script(*, patches: Sequence[str], kernconf: str = "GENERIC", ident: str,
                 src_root: str = "/usr/src") -> list[str]:
    """The kernel-build VM's runcmd: unpack the source tree from the raw disk with
    serial lab-src (a plain tar stream), apply the patches from the config disk,
    build, and install into the dom0 image (disk serial lab-dom0), then power off.
    `ident` (the tree hash) is written beside the kernel so the dom0 can prove
    which build it booted. `src_root`: where the tar stream unpacks (/usr/src for
    a tree; / for the release's src.txz, whose members are usr/src/...)."""
    if src_root not in ("/", "/usr/src"):
        raise LabError("backend", f"src_root {src_root!r}: '/' or '/usr/src'")
    kc = _safe_rel(kernconf, "KERNCONF")
    if not re.fullmatch(r"[\w.{}-]+", ident):
        raise LabError("backend", f"kernel ident {ident!r}: letters, digits, '._-' only")
    lines = [
        "set -u",
        "fail() { echo \"lab-build: FATAL: $*\"; exit 1; }",
        "trap 'rc=$?; [ $rc -eq 0 ] || echo \"lab-build: FATAL: exit $rc\"; poweroff' EXIT",
        # disks by serial (diskinfo -s prints a disk's ident), not by probe order
        "disk() { for d in /dev/vtbd[0-9] /dev/vtbd[0-9][0-9]; do [ -e \"$d\" ] || continue; "
        "[ \"$(diskinfo -s \"$d\" 2>/dev/null)\" = \"$1\" ] && { echo \"$d\"; return 0; }; done; return 1; }",
        # the builder and the dom0 image carry the same GPT labels (gpt/rootfs): make
        # sure / came from the builder's own disk, never write the other way round
        "rootfs=$(mount -p | awk '$2 == \"/\" { print $1 }')",  # /dev/gpt/rootfs, or a partition
        "prov=$(glabel status -s | awk -v l=\"${rootfs#/dev/}\" '$1 == l { print $3 }')",
        "prov=${prov:-${rootfs#/dev/}}",
        "[ \"$(diskinfo -s \"/dev/${prov%p[0-9]*}\" 2>/dev/null)\" = lab-root ] "
        "|| fail \"/ is mounted from $prov, not the builder's disk (duplicate gpt/rootfs label)\"",
        f"src=$(disk {SRC_SERIAL}) || fail 'no source disk'",
        f"target=$(disk {TARGET_SERIAL}) || fail 'no dom0 disk'",
        f"mkdir -p /usr/src && tar -xf \"$src\" -C {src_root} || fail 'unpacking the source tree'",
        f"mkdir -p {CIDATA_MOUNT} && mount -t cd9660 /dev/iso9660/cidata {CIDATA_MOUNT} || fail 'config disk'",
    ]
    for i, p in enumerate(patches):
        name = f"{i:04d}-{Path(p).name}"
        lines.append(f"patch -p1 -s -d /usr/src -i {CIDATA_MOUNT}/patches/{shlex.quote(name)} "
                     f"|| fail {shlex.quote('patch ' + Path(p).name + ' does not apply')}")
    lines += [
        "cd /usr/src",
        # kernel-toolchain: the bootstrap tools buildkernel needs without a buildworld
        # (it reuses the host compiler when the tree wants the same version)
        "make -j\"$(sysctl -n hw.ncpu)\" kernel-toolchain > /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail kernel-toolchain; }",
        f"make -j\"$(sysctl -n hw.ncpu)\" buildkernel KERNCONF={kc} >> /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail buildkernel; }",
        "part=$(gpart show -p \"${target#/dev/}\" | awk '$4 == \"freebsd-ufs\" { print $3; exit }')",
        "[ -n \"$part\" ] || fail 'no freebsd-ufs partition on the dom0 disk'",
        "fsck -y -t ufs \"/dev/$part\" > /dev/null 2>&1; mount \"/dev/$part\" /mnt || fail 'mounting the dom0 disk'",
        f"make installkernel KERNCONF={kc} DESTDIR=/mnt >> /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail installkernel; }",
        f"echo {shlex.quote(ident)} > /mnt/boot/kernel/xen-blklab.id",
        "umount /mnt",
        f"echo 'lab-build: done {ident}'",
    ]
    return lines


# -------------------------------------------------------- console milestones
# FreeBSD's side of the boot, next to console.XEN_BANNER and console.DOM0_INIT.
# Patterns are from FreeBSD's loader and kernel messages: unverified on this lab.
FREEBSD_LOADER = console.Milestone("boot:loader", "FreeBSD's loader", re.compile(rb"Consoles: |FreeBSD/x86 "))
FREEBSD_KERNEL = console.Milestone("boot:dom0", "the FreeBSD kernel's banner",
                                   re.compile(rb"FreeBSD \d+\.\d+-[A-Z0-9]+(?:-p\d+)? "))
XEN_PVH_DOM0 = console.Milestone("boot:xen", "Xen building the PVH dom0", re.compile(rb"Building a PVH Dom0"))
PROVISIONED = console.Milestone("image", "the provisioning script to finish", re.compile(rb"lab-provision: done"))
KERNEL_BUILT = console.Milestone("backend", "the kernel build to finish", re.compile(rb"lab-build: done"))


# ------------------------------------------------------------ blkback counters
# Every numeric node blkback.c's xbb_setup_sysctl() adds under dev.xbbd.<unit>.
XBBD_COUNTERS = (
    "disable_flush", "flush_interval", "no_coalesce_reqs",
    "reqs_received", "reqs_completed", "reqs_queued_for_completion", "reqs_completed_with_error",
    "forced_dispatch", "normal_dispatch", "total_dispatch",
    "kva_shortages", "request_shortages",
    "max_requests", "max_request_segments", "max_request_size", "ring_pages",
)
# Added by the 2014 fix (59adbba20f, "fix blkback pushing responses before
# releasing internal resources"): a kernel without them predates it or reverts it.
FIX_2014_COUNTERS = ("reqs_queued_for_completion", "reqs_completed_with_error")
_CORE = ("reqs_received", "reqs_completed", "request_shortages", "kva_shortages", "max_requests")
_SYSCTL_LINE = re.compile(r"^dev\.xbbd\.(\d+)\.([%\w]+): ?(.*)$")


def parse_xbbd(sysctl_output: str) -> dict[int, dict[str, int | str]]:
    """`sysctl dev.xbbd` output -> {unit: {node: value}}: integers as int, the
    string nodes (%desc, %location, xenstore_path, xenbus_connection_state, ...)
    as str. Lines of other trees and the devclass's own nodes are ignored."""
    out: dict[int, dict[str, int | str]] = {}
    for raw in sysctl_output.splitlines():
        m = _SYSCTL_LINE.match(raw.rstrip("\r"))
        if not m:
            continue
        value = m[3].strip()
        out.setdefault(int(m[1]), {})[m[2]] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


@dataclass(frozen=True)
class FreeBsdPoint:
    """One sample of one xbbd unit. queued_for_completion and completed_with_error
    are None on kernels without the 2014 fix."""

    t: float
    received: int
    completed: int
    queued_for_completion: int | None
    completed_with_error: int | None
    request_shortages: int
    kva_shortages: int
    max_requests: int

    @property
    def inflight(self) -> int:
        """Requests taken off the ring whose responses are not yet queued or pushed."""
        return self.received - self.completed - (self.queued_for_completion or 0)

    @classmethod
    def from_counters(cls, t: float, c: Mapping[str, int | str]) -> FreeBsdPoint:
        absent = [k for k in _CORE if not isinstance(c.get(k), int)]
        if absent:
            # the nodes appear only once the vbd is connected (xbb_attach_disk)
            raise LabError("sample", f"dev.xbbd unit lacks {', '.join(absent)}: not connected yet?")

        def opt(k: str) -> int | None:
            v = c.get(k)
            return v if isinstance(v, int) else None

        return cls(t, int(c["reqs_received"]), int(c["reqs_completed"]), opt("reqs_queued_for_completion"),
                   opt("reqs_completed_with_error"), int(c["request_shortages"]), int(c["kva_shortages"]),
                   int(c["max_requests"]))


def _trailing_since(pts: Sequence[FreeBsdPoint], same: Callable[[FreeBsdPoint], bool]) -> float | None:
    """The time of the first sample of the run of trailing samples for which `same` holds."""
    since = None
    for p in reversed(pts):
        if not same(p):
            break
        since = p.t
    return since


def xbbd_check(samples: Sequence[tuple[float, Mapping[str, int | str]]], *, stall_window: float) -> dict:
    """The FreeBSD verdict rules over one unit's samples (t ascending):

    - hang: `reqs_completed` has not advanced for `stall_window` while requests were
      in flight; or `reqs_queued_for_completion` stayed at the same non-zero value,
      with nothing completed, for `stall_window` (responses queued, never pushed);
    - errors: how much `reqs_completed_with_error` grew (None if the kernel lacks it);
    - invariant_violations: samples where in flight > max_requests (the pools hold
      max_requests requests: more means the counters or the backend are wrong);
    - shortages: growth of request_shortages / kva_shortages (the 2014 bug's oracle);
    - missing: the counters this kernel lacks (the rules run without them).
    """
    pts = [FreeBsdPoint.from_counters(t, c) for t, c in samples]
    result: dict = {
        "samples": len(pts), "hang": None, "errors": None, "invariant_violations": [],
        "shortages": {"request_shortages": 0, "kva_shortages": 0},
        "missing": [k for k in XBBD_COUNTERS if samples and k not in samples[0][1]],
    }
    if not pts:
        return result
    first, last = pts[0], pts[-1]
    result["shortages"] = {"request_shortages": last.request_shortages - first.request_shortages,
                           "kva_shortages": last.kva_shortages - first.kva_shortages}
    if first.completed_with_error is not None and last.completed_with_error is not None:
        result["errors"] = last.completed_with_error - first.completed_with_error
    result["invariant_violations"] = [
        {"t": p.t, "inflight": p.inflight, "max_requests": p.max_requests}
        for p in pts if p.max_requests > 0 and p.inflight > p.max_requests
    ]
    # responses queued but never pushed: the same non-zero queue, nothing completing
    if last.queued_for_completion:
        since = _trailing_since(pts, lambda p: (p.queued_for_completion, p.completed)
                                == (last.queued_for_completion, last.completed))
        if since is not None and last.t - since >= stall_window:
            result["hang"] = _hang(pts, since, f"reqs_queued_for_completion stuck at {last.queued_for_completion} "
                                   f"with reqs_completed at {last.completed} for {last.t - since:.0f}s: "
                                   "responses queued but never pushed to the ring")
            return result
    # completions stopped while requests were in flight: the stall clock starts at the
    # first in-flight sample since reqs_completed last moved (idle time is no stall)
    if last.inflight > 0:
        moved = _trailing_since(pts, lambda p: p.completed == last.completed)
        assert moved is not None  # `last` itself always qualifies
        since = next(p.t for p in pts if p.t >= moved and p.inflight > 0)
        if last.t - since >= stall_window:
            cause = (f"reqs_completed stuck at {last.completed} for {last.t - since:.0f}s with "
                     f"{last.inflight} request(s) in flight")
            grew = [p for p in pts if p.t >= moved]
            if grew[-1].request_shortages > grew[0].request_shortages or \
                    grew[-1].kva_shortages > grew[0].kva_shortages:
                cause += "; the backend ran short of requests/KVA while stalling"
            result["hang"] = _hang(pts, since, cause)
    return result


def _hang(pts: Sequence[FreeBsdPoint], since: float, cause: str) -> dict:
    last = pts[-1]
    return {
        "cause": cause, "since_t": since, "detected_t": last.t, "stalled_s": round(last.t - since, 2),
        "completed": last.completed, "inflight": last.inflight,
        "queued_for_completion": last.queued_for_completion,
        "request_shortages": last.request_shortages, "kva_shortages": last.kva_shortages,
    }


# ------------------------------------------------------------------- the plan
def plan_steps(*, version: str, arch: str, image_file: str | None, packages_dir: str | None,
               src: str | None, patches: list[str]) -> list[dict]:
    """Every download, build and boot step of a FreeBSD-dom0 lab, with its exact
    URL or command, in order: what a dry run prints and what a run follows.
    Paths are under the cache (`$CACHE` = images.cache_dir()); `{name}` is the
    image CHECKSUM.SHA512 names at run time (pick_vm_image), never a fixed name."""
    _split_version(version)
    work = f"$CACHE/{image_cache_sub(version, arch)}"
    dom0dir = "$CACHE/freebsd/dom0"
    tmp = f"{dom0dir}/.{{key}}.{{pid}}"  # the provisioning's work directory
    repo = pkg_repo_base(version, arch)
    steps: list[dict] = []

    def add(step: str, what: str, **kw: object) -> None:
        steps.append({"step": step, "what": what, **kw})

    if image_file:
        folder = str(Path(image_file).parent) if not Path(image_file).is_dir() else image_file
        add("image", "use the given image in place, verified against the CHECKSUM.SHA512 beside it",
            path=image_file, verify=f"sha512 from {folder}/CHECKSUM.SHA512")
    else:
        base = vm_image_base(version, arch)
        add("checksum", "download the release's checksums", url=base + "CHECKSUM.SHA512",
            dest=f"{work}/CHECKSUM.SHA512")
        add("image", "download the image CHECKSUM.SHA512 names (BASIC-CLOUDINIT, ufs, qcow2.xz preferred), "
            "resumable", url=base + "{name}", dest=f"{work}/{{name}}", chosen_by="pick_vm_image")
    add("verify", "sha512 of the image against CHECKSUM.SHA512 before it is renamed into the cache",
        algo="sha512")
    add("decompress", "unpack the image (read-only base from here on)",
        command=["xz", "--decompress", "--stdout", "--threads=0", f"{work}/{{name}}"],
        output=f"{work}/{{name}} without .xz")
    if packages_dir:
        add("packages", "use the given packages in place: catalogue (packagesite.yaml or .pkg) and .pkg files, "
            "each verified by the catalogue's sha256", path=packages_dir)
    else:
        add("packagesite", "download the catalogue of the release's package set", url=repo + "meta.conf",
            then=repo + "packagesite.pkg", extract=["zstd", "-dc", "packagesite.pkg", "|", "tar", "-x",
                                                    "packagesite.yaml"])
        add("packages", f"resolve {', '.join(DOM0_PACKAGES)} with their dependencies (deps first) and download "
            "each, verified by sha256", url=repo + "{repopath}", wanted=list(DOM0_PACKAGES))
    add("cidata", "make the config disk: user-data, meta-data, packages/ with ORDER",
        command=cidata_argv(Path(f"{tmp}/cidata"), Path(f"{tmp}/cidata.iso")),
        why="nuageinit finds /dev/iso9660/cidata; label case kept; no size to guess (see cidata_argv)")
    add("overlay", "a writable overlay on the read-only base for provisioning, grown (growfs runs on first boot)",
        command=["qemu-img", "create", "-q", "-f", "qcow2", "-F", "{qcow2 or raw}", "-b",
                 f"{work}/{{name without .xz}}", f"{tmp}/provision.qcow2"],
        then=["qemu-img", "resize", "-q", f"{tmp}/provision.qcow2", "16G"])
    add("provision", "boot the image under QEMU without Xen and without a NIC; nuageinit installs the packages "
        "offline from the config disk, writes loader.conf and the rest, then powers off",
        command=_qemu_argv(f"{tmp}/provision.qcow2", f"{tmp}/cidata.iso", xen=False),
        milestones=[FREEBSD_LOADER.what, FREEBSD_KERNEL.what, PROVISIONED.what, "QEMU to exit (poweroff)"],
        fails_on="lab-provision: FATAL: ...")
    add("flatten", "the provisioned dom0 image, read-only, cached by the hash of its inputs (image, packages, "
        "rendered user-data); the work directory is renamed into place only when complete",
        command=["qemu-img", "convert", "-O", "qcow2", f"{tmp}/provision.qcow2", f"{tmp}/dom0.qcow2"],
        then=["mv", tmp, f"{dom0dir}/{{key}}"])
    if src:
        # Built natively in a plain FreeBSD VM from the same image, not cross-built on
        # Linux with tools/build/make.py: the native build uses the release's own
        # toolchain (the kernel FreeBSD itself would produce, no second LLVM to keep in
        # step), and installing into the dom0's UFS needs a FreeBSD kernel anyway
        # (Linux has no dependable UFS2 write support), so the VM is needed either way.
        ktmp = f"{dom0dir}/.{{key}}-k{{tree hash}}.{{pid}}"
        txz = Path(src).is_file()
        add("source", "the source tree as a raw disk holding one tar stream (no network, no UFS tools on L0); "
            "hashed (sys/ + patches + KERNCONF) first: an unchanged tree is not rebuilt",
            command=["cp", src, f"{ktmp}/src.txz", "(then zero-padded to whole 512-byte sectors)"] if txz else
            ["tar", "-C", src, "--exclude=.git", "-cf", f"{ktmp}/src.tar", "."])
        add("build", "boot a plain FreeBSD VM from the release image (overlay grown to 40G, no NIC): unpack, "
            "patch, make kernel-toolchain + buildkernel, installkernel DESTDIR= into an overlay of the dom0 "
            "image, write the tree hash to /boot/kernel/xen-blklab.id, power off; then flatten as above",
            command=_qemu_argv(f"{ktmp}/builder.qcow2", f"{ktmp}/cidata.iso", xen=False, memory_mib=4096,
                               extra=[(src if txz else f"{ktmp}/src.tar", SRC_SERIAL, "raw", True),
                                      (f"{ktmp}/target.qcow2", TARGET_SERIAL, "qcow2", False)]),
            script=build_script(patches=patches, ident="{hash}", src_root="/" if txz else "/usr/src"),
            patches=list(patches),
            milestones=[FREEBSD_LOADER.what, FREEBSD_KERNEL.what, KERNEL_BUILT.what, "QEMU to exit (poweroff)"],
            fails_on="lab-build: FATAL: ...")
    else:
        add("kernel", "the release's GENERIC kernel (blkback is built in): no build")
    add("boot", "boot the dom0 image under QEMU: FreeBSD's loader loads Xen (xen_kernel) and FreeBSD as PVH "
        "dom0 (plus, as on a Linux dom0, each guest's disks and the read-only disk with the guests' kernels)",
        command=_qemu_argv("$RUN/dom0-root.qcow2", None, xen=True, memory_mib=2048),
        unverified="TCG with -cpu qemu64,+svm,+npt for a PVH dom0 (SVM+NPT emulation) has not been run here",
        milestones=[FREEBSD_LOADER.what, console.XEN_BANNER.what, XEN_PVH_DOM0.what, FREEBSD_KERNEL.what,
                    console.DOM0_INIT.what, "dom0 SSH"],
        then="the booted kernel's /boot/kernel/xen-blklab.id must equal the tree hash (or be absent for the "
             "release's kernel), else ERROR at stage backend")
    add("sample", "one long-lived sampler in dom0 over SSH: `sysctl dev.xbbd` every interval, the units "
        "serving the test disks picked by xenstore_path; verdict rules in xbbd_check",
        command=["sh", "-c", "<dom0.XBBD_SAMPLER>", "lab-xbbd-sample", "1", "vbd/{domid}/{devid}"])
    return steps


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
            out += _missing_pkg_files(d)
    elif not _cached_packages(cache_dir / repo_cache_sub(repo)) and not reachable(repo + "meta.conf"):
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


def _cached_packages(d: Path) -> bool:
    return (d / "packagesite.pkg").is_file() and not _missing_pkg_files(d)


def _missing_pkg_files(d: Path) -> list[str]:
    try:
        if (d / "packagesite.yaml").is_file():
            text = (d / "packagesite.yaml").read_text()
        else:
            text = packagesite_text((d / "packagesite.pkg").read_bytes())
        pkgs = resolve(parse_packagesite(text), DOM0_PACKAGES)
    except LabError as e:
        return [f"FreeBSD packages in {d}: {e.message}"]
    absent = [p.path for p in pkgs if not (d / p.path).is_file() and not (d / Path(p.path).name).is_file()]
    if not absent:
        return []
    return [f"FreeBSD packages in {d}: {len(absent)} file(s) the catalogue requires are absent: "
            + ", ".join(absent)]



# ------------------------------------------------------------ running it
# What `lab run` does with the pieces above (run.py calls these): the dom0 base
# image, provisioned once and cached by the hash of everything that went into it;
# optionally a kernel built from the user's tree and installed into a copy of it.
PROVISION_FORMAT = 1  # bump when the provisioning changes in a way the inputs do not show


@dataclass(frozen=True)
class Dom0Image:
    path: Path  # read-only qcow2: the dom0's disk, booted through FreeBSD's loader
    key: str
    version: str
    kernel_id: str | None  # the source tree's hash when the kernel was built from it
    manifest: dict


def vm_spec(drives: Sequence[qemu.Drive], *, console_log: Path, qmp_sock: Path | None, accel: str, cpus: int,
            memory_mib: int, ssh_port: int | None, cpu_model: str = "") -> qemu.VmSpec:
    """A FreeBSD VM from the lab's own argv builders. No -kernel: the firmware
    boots the first drive, whose loader (with Xen, via xen_kernel) takes over. The
    provisioning and build VMs get no network at all (ssh_port None)."""
    first = qemu.Drive(drives[0].path, drives[0].serial, drives[0].fmt, drives[0].readonly, boot=True)
    return qemu.VmSpec(accel=accel, cpus=cpus, memory_mib=memory_mib, xen=None, xen_cmdline="", modules=[],
                       drives=[first, *drives[1:]], ssh_port=ssh_port or 0, console_log=console_log,
                       qmp_sock=qmp_sock, cpu_model=cpu_model, network=ssh_port is not None)


def _qemu_argv(disk: str, cidata: str | None, *, xen: bool, memory_mib: int = 3072,
               extra: Sequence[tuple[str, str, str, bool]] = ()) -> list[str]:
    """The plan's QEMU command (placeholders for per-run paths and the port)."""
    drives = [qemu.Drive(Path(disk), "lab-dom0-root" if xen else "lab-root")]
    drives += [qemu.Drive(Path(p), serial, fmt, ro) for p, serial, fmt, ro in extra]
    if cidata:  # the ISO as a read-only virtio disk: geom_label finds its cidata label on any provider
        drives.append(qemu.Drive(Path(cidata), "lab-cidata", "raw", True))
    spec = vm_spec(drives, console_log=Path("$RUN/console.log"), qmp_sock=Path("$RUN/qmp.sock") if xen else None,
                   accel="tcg", cpus=2, memory_mib=memory_mib, ssh_port=1 if xen else None)
    return [a.replace("127.0.0.1:1-", "127.0.0.1:$PORT-") for a in qemu.build_argv(spec)]


def nested_kvm_problem(read: Callable[[str], str | None] | None = None) -> str | None:
    """Under KVM a PVH dom0 needs the host to pass VMX/SVM through (nested): say
    so before booting instead of letting Xen fail to start its dom0."""
    def _read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    read = read or _read
    seen = False
    for mod in ("kvm_intel", "kvm_amd"):
        v = read(f"/sys/module/{mod}/parameters/nested")
        if v is None:
            continue
        seen = True
        if v in ("Y", "y", "1"):
            return None
    if not seen:
        return "KVM is not loaded (no /sys/module/kvm_intel or kvm_amd): use --accel tcg"
    return ("nested virtualisation is disabled on this host (/sys/module/kvm_*/parameters/nested is N), and a "
            "FreeBSD dom0 is PVH: it needs VMX/SVM inside the Xen VM. Enable it (modprobe -r kvm_intel; "
            "modprobe kvm_intel nested=1, or kvm_amd) or run with --accel tcg")


def image_format(path: Path) -> str:
    return "raw" if path.suffix == ".raw" else "qcow2"


def run_vm(name: str, spec: qemu.VmSpec, results: Path, steps: Sequence[tuple[console.Milestone, float]],
           *, stage: str, exit_timeout: float = 180) -> dict[str, float]:
    """Boot a VM without Xen that does one job and powers off: wait for each
    milestone in turn (each with its own deadline), then for QEMU to exit. The VM
    is killed whatever happens. Returns when each milestone came (s since start)."""
    from lab.timing import Deadline

    t0 = __import__("time").monotonic()
    con = console.Console(spec.console_log, f"FreeBSD {name}")
    (results / f"qemu-{name}-argv.json").write_text(json.dumps(qemu.build_argv(spec), indent=1) + "\n")
    vm = qemu.start(spec, results / f"qemu-{name}-stderr.log")
    reached: dict[str, float] = {}
    try:
        for m, seconds in steps:
            try:
                con.wait_for(m, Deadline(seconds), alive=vm.alive)
            except LabError as e:
                got = ", ".join(reached) or "none"
                empty = ("; the console stayed empty: the firmware found nothing to boot (is the image a "
                         "FreeBSD VM image?)" if con.size() == 0 else "")
                raise LabError(stage, f"FreeBSD {name} VM: {e.message} (milestones reached: {got}; console "
                               f"{spec.console_log}{empty})", tail=e.tail or vm.stderr_tail()) from None
            reached[m.what] = round(__import__("time").monotonic() - t0, 1)
        try:
            vm.proc.wait(timeout=exit_timeout)
        except __import__("subprocess").TimeoutExpired:
            raise LabError(stage, f"FreeBSD {name} VM: did not power off within {exit_timeout:.0f}s "
                           "of finishing", tail=con.tail()) from None
        reached["poweroff"] = round(__import__("time").monotonic() - t0, 1)
        return reached
    finally:
        vm.stop()


def _stage_cidata(staging: Path, *, user_data: str, instance_id: str,
                  files: Sequence[tuple[Path, str]] = (), texts: Mapping[str, str] | None = None) -> None:
    staging.mkdir(parents=True)
    (staging / "user-data").write_text(user_data)
    (staging / "meta-data").write_text(render_meta_data(instance_id=instance_id))
    for src, rel in files:
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)  # no copy of ~100 MB of packages when on the same filesystem
        except OSError:
            import shutil

            shutil.copyfile(src, dst)
    for rel, text in (texts or {}).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(text)


def make_cidata(staging: Path, iso: Path, runner: object) -> None:
    res = runner.run(cidata_argv(staging, iso), timeout=300)  # type: ignore[attr-defined]
    if not res.ok:
        raise LabError("image", f"genisoimage could not make the config disk: {res.stderr.strip()[-400:]}")


def ensure_dom0_image(cfg: object, *, version: str, arch: str = "amd64", accel: str, cpus: int,
                      dom0_mem_mb: int, keys: object, runner: object, results: Path, cache: Path,
                      fetcher: Fetcher | None = None, loader_timeout: float = 120) -> Dom0Image:
    """The provisioned dom0 base image (and, with [freebsd] src, the one with the
    kernel built from it), from the cache or made now. Media come from the
    scenario's [freebsd] paths or the publisher's URLs (L0 only: the VMs are offline)."""
    import shutil
    import time

    fetcher = fetcher or Fetcher(cache.parent, progress=_progress_logger("download"))
    xz = get_image(fetcher, version=version, arch=arch, source=getattr(cfg, "image", "") or None)
    base = decompress_image(xz, out_dir=cache.parent / image_cache_sub(version, arch))
    pkgs = get_packages(fetcher, version=version, arch=arch, source=getattr(cfg, "packages", "") or None)
    user_data = render_user_data(
        authorized_key=keys.public(keys.client),  # type: ignore[attr-defined]
        host_key_private=keys.host("dom0").read_text(),  # type: ignore[attr-defined]
        host_key_public=keys.public(keys.host("dom0")),  # type: ignore[attr-defined]
        packages_dir=CIDATA_PACKAGES,
        loader_conf=render_loader_conf(dom0_mem_mb=dom0_mem_mb, dom0_vcpus=cpus, iommu=False))
    inputs = {"format": PROVISION_FORMAT, "version": version, "image": xz.name, "image_size": xz.stat().st_size,
              "packages": sorted(f"{p.name}-{p.version}:{p.sha256}" for p, _ in pkgs),
              "user_data": hashlib.sha256(user_data.encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = cache / "dom0" / key
    if not (out_dir / "dom0.qcow2").is_file():
        tmp = cache / "dom0" / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            t = time.monotonic()
            _stage_cidata(tmp / "cidata", user_data=user_data, instance_id=f"lab-provision-{key}",
                          files=[(path, f"{CIDATA_PACKAGES}/{p.filename}") for p, path in pkgs],
                          texts={f"{CIDATA_PACKAGES}/ORDER": package_order([p for p, _ in pkgs])})
            make_cidata(tmp / "cidata", tmp / "cidata.iso", runner)
            shutil.rmtree(tmp / "cidata")
            disk = tmp / "provision.qcow2"
            qemu.create_overlay(base, disk, base_fmt=image_format(base))
            _check(runner, ["qemu-img", "resize", "-q", str(disk), "16G"], "image")
            spec = vm_spec([qemu.Drive(disk, "lab-root"), qemu.Drive(tmp / "cidata.iso", "lab-cidata", "raw", True)],
                           console_log=results / "console-freebsd-provision.log", qmp_sock=None,
                           accel=accel, cpus=cpus, memory_mib=3072, ssh_port=None)
            reached = run_vm("provision", spec, results, stage="image", steps=[
                (FREEBSD_LOADER, loader_timeout), (FREEBSD_KERNEL, 300),
                (PROVISIONED, float(getattr(cfg, "provision_timeout", 3600)))])
            _check(runner, ["qemu-img", "convert", "-O", "qcow2", str(disk), str(tmp / "dom0.qcow2")], "image",
                   timeout=1800)
            (tmp / "dom0.qcow2").chmod(0o444)
            (tmp / "manifest.json").write_text(json.dumps(
                {**inputs, "base": str(base), "provisioned_in_s": round(time.monotonic() - t, 1),
                 "milestones": reached}, indent=1) + "\n")
            for f in ("provision.qcow2", "cidata.iso"):
                (tmp / f).unlink()
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    img = Dom0Image(out_dir / "dom0.qcow2", key, version, None, manifest)
    src = getattr(cfg, "src", "")
    if src:
        img = ensure_kernel(img, Path(src).expanduser(), [Path(p).expanduser() for p in getattr(cfg, "patches", ())],
                            base=base, kernconf=getattr(cfg, "kernconf", "GENERIC"), accel=accel, cpus=cpus,
                            runner=runner, results=results, cache=cache, loader_timeout=loader_timeout,
                            timeout=float(getattr(cfg, "build_timeout", 8 * 3600)))
    return img


def source_hash(src: Path, patches: Sequence[Path], kernconf: str) -> str:
    """What the kernel is built from: sys/ of the tree (every file's path and
    bytes; for a git tree, HEAD's sys/ tree object plus uncommitted changes there),
    or the src.txz itself, plus the patches and KERNCONF."""
    import subprocess as sp

    h = hashlib.sha256(f"kernconf={kernconf}\0".encode())
    if src.is_file():
        h.update(b"txz\0" + file_digest(src, "sha256").encode())
    elif (src / ".git").exists():
        tree = sp.run(["git", "-C", str(src), "rev-parse", "HEAD:sys"], capture_output=True, text=True, timeout=60)
        if tree.returncode != 0:
            raise LabError("backend", f"{src}: not a FreeBSD source tree (git has no sys/ at HEAD)")
        diff = sp.run(["git", "-C", str(src), "diff", "HEAD", "--", "sys"], capture_output=True, timeout=300).stdout
        extra = sp.run(["git", "-C", str(src), "ls-files", "--others", "--exclude-standard", "--", "sys"],
                       capture_output=True, timeout=300).stdout
        h.update(tree.stdout.strip().encode() + b"\0" + diff + b"\0" + extra)
    else:
        if not (src / "sys" / "dev" / "xen" / "blkback" / "blkback.c").is_file():
            raise LabError("backend", f"{src}: expected a FreeBSD source tree with sys/dev/xen/blkback/blkback.c, "
                           "or the release's src.txz")
        for p in sorted((src / "sys").rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    for p in patches:
        if not p.is_file():
            raise LabError("backend", f"[freebsd] patches: {p} is not a file")
        h.update(b"patch\0" + p.read_bytes())
    return h.hexdigest()[:16]


def ensure_kernel(img: Dom0Image, src: Path, patches: list[Path], *, base: Path, kernconf: str, accel: str,
                  cpus: int, runner: object, results: Path, cache: Path, timeout: float,
                  loader_timeout: float = 120) -> Dom0Image:
    """The dom0 image with a kernel built from `src` + `patches`, cached by
    source_hash. Built natively in a plain FreeBSD VM booted from the release's
    image (plan_steps says why not cross-built), installed into a copy of the dom0
    image attached to that VM; the id written beside the kernel is what the dom0
    must show after boot (dom0.FreeBsdDom0.check_kernel)."""
    import shutil
    import time

    if not src.exists():
        raise LabError("backend", f"[freebsd] src: {src} does not exist (a FreeBSD source tree or src.txz)")
    kid = source_hash(src, patches, kernconf)
    out_dir = cache / "dom0" / f"{img.key}-k{kid}"
    if not (out_dir / "dom0.qcow2").is_file():
        tmp = cache / "dom0" / f".{img.key}-k{kid}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            t = time.monotonic()
            tmp.mkdir(parents=True)
            if src.is_file():
                # src.txz as a raw disk: padded with zeros to whole sectors (QEMU
                # drops a partial last sector; xz reads zeros as stream padding)
                tarball = tmp / "src.txz"
                shutil.copyfile(src, tarball)
                with open(tarball, "ab") as f:
                    f.write(b"\0" * (-tarball.stat().st_size % 512))
            else:
                tarball = tmp / "src.tar"
                _check(runner, ["tar", "-C", str(src), "--exclude=.git", "-cf", str(tarball), "."], "backend",
                       timeout=1800)
            names = [f"{i:04d}-{p.name}" for i, p in enumerate(patches)]
            script = build_script(patches=[str(p) for p in patches], kernconf=kernconf, ident=kid,
                                  src_root="/" if src.is_file() else "/usr/src")
            user_data = "#cloud-config\n" + json.dumps({"users": [], "runcmd": script}, indent=2) + "\n"
            _stage_cidata(tmp / "cidata", user_data=user_data, instance_id=f"lab-build-{kid}",
                          files=[(p, f"patches/{n}") for p, n in zip(patches, names, strict=True)])
            make_cidata(tmp / "cidata", tmp / "cidata.iso", runner)
            builder, target = tmp / "builder.qcow2", tmp / "target.qcow2"
            qemu.create_overlay(base, builder, base_fmt=image_format(base))
            _check(runner, ["qemu-img", "resize", "-q", str(builder), "40G"], "backend")
            qemu.create_overlay(img.path, target, base_fmt="qcow2")
            spec = vm_spec([qemu.Drive(builder, "lab-root"), qemu.Drive(tarball, SRC_SERIAL, "raw", True),
                            qemu.Drive(target, TARGET_SERIAL), qemu.Drive(tmp / "cidata.iso", "lab-cidata", "raw", True)],
                           console_log=results / "console-freebsd-build.log", qmp_sock=None,
                           accel=accel, cpus=cpus, memory_mib=4096, ssh_port=None)
            reached = run_vm("kernel-build", spec, results, stage="backend", steps=[
                (FREEBSD_LOADER, loader_timeout), (FREEBSD_KERNEL, 300), (KERNEL_BUILT, timeout)])
            _check(runner, ["qemu-img", "convert", "-O", "qcow2", str(target), str(tmp / "dom0.qcow2")], "backend",
                   timeout=1800)
            (tmp / "dom0.qcow2").chmod(0o444)
            from lab.backend import source_commit

            (tmp / "manifest.json").write_text(json.dumps(
                {**img.manifest, "kernel_id": kid, "src": str(src), "commit": source_commit(src) if src.is_dir() else None,
                 "patches": [str(p) for p in patches], "kernconf": kernconf,
                 "built_in_s": round(time.monotonic() - t, 1), "build_milestones": reached}, indent=1) + "\n")
            for f in ("builder.qcow2", "target.qcow2", "cidata.iso", "src.tar", "src.txz"):
                (tmp / f).unlink(missing_ok=True)
            shutil.rmtree(tmp / "cidata", ignore_errors=True)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return Dom0Image(out_dir / "dom0.qcow2", f"{img.key}-k{kid}", img.version, kid, manifest)


def _check(runner: object, argv: list[str], stage: str, *, timeout: float = 300) -> None:
    res = runner.run(argv, timeout=timeout)  # type: ignore[attr-defined]
    if not res.ok:
        raise LabError(stage, f"{argv[0]} failed (rc {res.rc}): {(res.stderr or res.stdout).strip()[-400:]}")


def _progress_logger(what: str) -> Callable[[int, int | None], None]:
    """Download progress on the log, at most every 5% (or every 50 MB unsized)."""
    state = {"last": -1}

    def report(done: int, total: int | None) -> None:
        step = (done * 20 // total) if total else done >> 26
        if step != state["last"]:
            state["last"] = step
            log.info("%s: %d MB%s", what, done >> 20, f" of {total >> 20} MB" if total else "")

    return report


# The dom0's boot under Xen, in order: each missed one names how far it got.
DOM0_BOOT = (FREEBSD_LOADER, console.XEN_BANNER, XEN_PVH_DOM0, FREEBSD_KERNEL, console.DOM0_INIT)
