"""FreeBSD's packages for the dom0 (pkg, xen-kernel, xen-tools and their
dependencies): where the release's frozen package set lives, its catalogue
(meta.conf, packagesite), the dependency closure in `pkg add` order, and the
verified .pkg files, downloaded or from the user's directory."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError, ScenarioError
from lab.platform.freebsd.fetch import Fetcher, is_url
from lab.platform.freebsd.fetch import media_error as _media

PKG_BASE = "https://pkg.freebsd.org/"
# `pkg` itself first: a fresh image has only the bootstrap stub, which installs
# the real pkg from a local file (`pkg add ./pkg-X.pkg`) and nothing else.
DOM0_PACKAGES = ("pkg", "xen-kernel", "xen-tools")


def pkg_repo_base(version: str, arch: str = "amd64") -> str:
    """The package set frozen at the release: FreeBSD:<major>:<arch>/release_<minor>/.
    `quarterly` and `latest` move under us (a package, its sha256 and its
    dependencies change from one week to the next, so a cached plan goes stale and a
    bisect compares different userlands); release_N was built once against the
    releng branch of that release and does not change. Its xen-tools is the one
    the Handbook's instructions for that release were written against."""
    major, minor = split_version(version)
    return f"{PKG_BASE}FreeBSD:{major}:{arch}/release_{minor}/"


def split_version(version: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", version)
    if not m:
        raise ScenarioError(f"FreeBSD version {version!r}: expected MAJOR.MINOR, e.g. '14.3'")
    return int(m[1]), int(m[2])


# ------------------------------------------------------------- the catalogue
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


def repo_cache_sub(repo_url: str) -> str:
    """The cache directory of a package repository: freebsd/pkg/FreeBSD_14_amd64/release_3."""
    return "freebsd/pkg/" + urllib.parse.urlsplit(repo_url).path.strip("/").replace(":", "_")


def get_packages(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
                 wanted: Sequence[str] = DOM0_PACKAGES) -> list[tuple[Pkg, Path]]:
    """The verified .pkg files of `wanted` and their dependencies, deps first.
    `source`: a local directory with the catalogue (packagesite.yaml, or
    packagesite.pkg) and the .pkg files (at their repository path, e.g. All/..., or
    flat), or a repository URL; None = the release's repository."""
    base = source or pkg_repo_base(version, arch)
    base += "" if base.endswith("/") or not is_url(base) else "/"
    if not is_url(base):
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


def package_order(pkgs: Sequence[Pkg]) -> str:
    """The ORDER file of the config disk: pkg first, then dependencies before dependents."""
    names = [p.filename for p in pkgs if p.name == "pkg"] + [p.filename for p in pkgs if p.name != "pkg"]
    return "\n".join(names) + "\n"


# ------------------------------------------------------------- what is there
def cached_packages(d: Path) -> bool:
    return (d / "packagesite.pkg").is_file() and not missing_pkg_files(d)


def missing_pkg_files(d: Path) -> list[str]:
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
