"""FreeBSD's packages for the dom0 (pkg, xen-kernel, xen-tools and their
dependencies): where the release's frozen package set lives, its catalogue
(meta.conf, packagesite), the dependency closure in `pkg add` order, and the
verified .pkg files, downloaded or from the user's directory."""

from __future__ import annotations

import hashlib
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


# The keys FreeBSD's base system trusts for pkg.freebsd.org's catalogues:
# /etc/pkg/FreeBSD.conf says `signature_type: "fingerprints"` and `fingerprints:
# "/usr/share/keys/pkg"`, and share/keys/pkg/trusted/ holds one file (name: sha256 of
# the signer's PEM public key, as `function: "sha256"` / `fingerprint: "..."`).
TRUSTED_FINGERPRINTS = {
    "pkg.freebsd.org.2013102301": "b0170035af3acc5f3f3ae1859dc717101b4e6c1d0a794ad554928ca0cbb2f438",
}


def catalogue_members(archive: bytes, *, timeout: float = 120) -> dict[str, bytes]:
    """Every regular member of packagesite.pkg: a tar, zstd-compressed on current
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
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    out[m.name] = f.read()
    except tarfile.TarError as e:
        raise _media(f"packagesite.pkg: not a package catalogue ({type(e).__name__}: {e})") from None
    return out


def packagesite_text(archive: bytes, member: str = "packagesite.yaml", *, timeout: float = 120) -> str:
    """The manifests out of packagesite.pkg (no signature check: verify_catalogue)."""
    members = catalogue_members(archive, timeout=timeout)
    if member not in members:
        raise _media(f"packagesite.pkg: no {member} in it (KeyError: {member!r})")
    return members[member].decode()


def _pkgsign(blob: bytes) -> tuple[str, bytes]:
    """pkg 1.21+ may prefix a signature or key with `$PKGSIGN:<type>$` (libpkg's
    pkgsign); without one it is RSA, the type pkg.freebsd.org signs with."""
    if blob.startswith(b"$PKGSIGN:"):
        end = blob.find(b"$", 9)
        if end > 9:
            return blob[9:end].decode(errors="replace"), blob[end + 1:]
    return "rsa", blob


def verify_catalogue(members: Mapping[str, bytes], member: str = "packagesite.yaml", *,
                     trusted: Mapping[str, str] = TRUSTED_FINGERPRINTS) -> dict[str, str]:
    """Check the catalogue the way `pkg update` does with signature_type
    "fingerprints" (libpkg pkg_repo.c: pkg_repo_meta_extract_signature_fingerprints,
    pkg_repo_check_fingerprint, rsa_verify_cert): the archive holds `<name>.sig`
    (the signature) and `<name>.pub` (the signer's PEM key) beside the catalogue;
    the sha256 of the key must be a trusted fingerprint, and the signature is RSA
    PKCS#1 v1.5 with SHA-256 over the *hex* sha256 of the catalogue (pkg signs the
    hex digest it hands its signing command). One valid, trusted signer is enough.
    Returns what the record shows; raises LabError("media") otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if member not in members:
        raise _media(f"packagesite.pkg: no {member} in it")
    sigs = {n[:-4]: b for n, b in members.items() if n.endswith(".sig")}
    certs = {n[:-4]: b for n, b in members.items() if n.endswith(".pub")}
    if not sigs:
        raise _media(f"packagesite.pkg carries no signature (no <name>.sig beside {member}): refusing a catalogue "
                     "whose package checksums only TLS vouches for")
    digest_hex = hashlib.sha256(members[member]).hexdigest().encode()
    problems = []
    for name, raw_sig in sorted(sigs.items()):
        if name not in certs:
            problems.append(f"{name}.sig has no {name}.pub beside it")
            continue
        fingerprint = hashlib.sha256(certs[name]).hexdigest()
        key_name = next((k for k, v in trusted.items() if v == fingerprint), None)
        if key_name is None:
            problems.append(f"{name}: key sha256 {fingerprint} is not a trusted fingerprint")
            continue
        (sig_type, sig), (key_type, pem) = _pkgsign(raw_sig), _pkgsign(certs[name])
        if sig_type != "rsa" or key_type != "rsa":
            problems.append(f"{name}: signature type {sig_type}/{key_type}; the lab checks rsa only")
            continue
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as e:
            problems.append(f"{name}.pub is not a PEM public key ({e})")
            continue
        if not isinstance(key, rsa.RSAPublicKey):
            problems.append(f"{name}.pub is not an RSA key")
            continue
        try:
            key.verify(sig, digest_hex, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            problems.append(f"{name}: the signature does not match {member}")
            continue
        return {"signature": "verified", "signer": name, "key": key_name, "fingerprint": fingerprint}
    raise _media(f"packagesite.pkg: no trusted, valid signature over {member}: " + "; ".join(problems))


def repo_cache_sub(repo_url: str) -> str:
    """The cache directory of a package repository: freebsd/pkg/FreeBSD_14_amd64/release_3."""
    return "freebsd/pkg/" + urllib.parse.urlsplit(repo_url).path.strip("/").replace(":", "_")


@dataclass(frozen=True)
class Catalogue:
    """A repository's catalogue, read and checked: where its packages are, the
    manifests, and what vouches for them (record.json's images.package_catalogue)."""

    base: str  # the repository's URL (ending in /) or the user's directory
    cache_sub: str | None  # where downloads go under the cache; None: the user's files, used in place
    text: str  # packagesite.yaml
    trust: dict[str, str]


def get_catalogue(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
                  trusted: Mapping[str, str] = TRUSTED_FINGERPRINTS) -> Catalogue:
    """The catalogue of `source`: a repository URL (None = the release's), whose
    packagesite.pkg must carry a trusted signature (verify_catalogue); or the
    user's directory, whose packagesite.pkg is checked if signed, and whose
    packagesite.yaml (or unsigned .pkg) is taken as the user's own files."""
    base = source or pkg_repo_base(version, arch)
    base += "" if base.endswith("/") or not is_url(base) else "/"
    if not is_url(base):
        folder = Path(base).expanduser()
        if (folder / "packagesite.yaml").is_file():
            return Catalogue(base, None, (folder / "packagesite.yaml").read_text(), {
                "signature": "none", "why": f"{folder}/packagesite.yaml given as is: the package sha256 sums "
                "rest on the user's files"})
        if not (folder / "packagesite.pkg").is_file():
            raise _media(f"{folder}: no packagesite.yaml or packagesite.pkg (the package catalogue) in it")
        members = catalogue_members((folder / "packagesite.pkg").read_bytes())
        if not any(n.endswith(".sig") for n in members):
            trust = {"signature": "none", "why": f"{folder}/packagesite.pkg is unsigned: the package sha256 sums "
                     "rest on the user's files"}
        else:
            trust = verify_catalogue(members, trusted=trusted)
        if "packagesite.yaml" not in members:
            raise _media(f"{folder}/packagesite.pkg: no packagesite.yaml in it")
        return Catalogue(base, None, members["packagesite.yaml"].decode(), trust)
    cache_sub = repo_cache_sub(base)
    meta = parse_meta_conf(fetcher.fetch(base, name="meta.conf", dest=f"{cache_sub}/meta.conf").read_text())
    archive = f"{meta['manifests_archive']}.pkg"
    members = catalogue_members(fetcher.fetch(base, name=archive, dest=f"{cache_sub}/{archive}").read_bytes())
    trust = verify_catalogue(members, str(meta["manifests"]), trusted=trusted)
    return Catalogue(base, cache_sub, members[str(meta["manifests"])].decode(), trust)


def fetch_packages(fetcher: Fetcher, cat: Catalogue, wanted: Sequence[str] = DOM0_PACKAGES
                   ) -> list[tuple[Pkg, Path]]:
    """The verified .pkg files of `wanted` and their dependencies, deps first."""
    out = []
    for pkg in resolve(parse_packagesite(cat.text), wanted):
        dest = f"{cat.cache_sub}/{pkg.path}" if cat.cache_sub else None
        out.append((pkg, fetcher.fetch(cat.base, name=pkg.path, dest=dest, sha256=pkg.sha256)))
    return out


def get_packages(fetcher: Fetcher, *, version: str, arch: str = "amd64", source: str | None = None,
                 wanted: Sequence[str] = DOM0_PACKAGES) -> list[tuple[Pkg, Path]]:
    """The verified .pkg files of `wanted` and their dependencies, deps first.
    `source`: a local directory with the catalogue (packagesite.yaml, or
    packagesite.pkg) and the .pkg files (at their repository path, e.g. All/..., or
    flat), or a repository URL; None = the release's repository."""
    return fetch_packages(fetcher, get_catalogue(fetcher, version=version, arch=arch, source=source), wanted)


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
