"""lab/platform/freebsd: FreeBSD-dom0 media, provisioning, plan and blkback verdict rules.

No FreeBSD media can be fetched from the development machines, so the inputs in
tests/data/freebsd are constructed (README.md there says from what). Downloads are
tested for real: a local HTTP server on 127.0.0.1 serves real bytes with real
checksums, with Range support, a variant that ignores Range, one that cuts the
connection mid-transfer, one that never answers, and redirects."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from labdata import DATA, xbbd_samples

from lab import console
from lab.errors import LabError, ScenarioError
from lab.platform import freebsd
from lab.platform.freebsd import fetch, media, packages, render, vm, xbbd
from lab.timing import Deadline

FB = DATA / "freebsd"
REPO = FB / "repo"
V = "FreeBSD-14.3-RELEASE-amd64"


def sums(name: str) -> dict[str, str]:
    return media.parse_checksum((FB / name).read_text())


# ================================================================ CHECKSUM
def test_parse_checksum_shall_read_every_entry_of_the_publishers_sha512_format() -> None:
    got = sums("CHECKSUM.SHA512-14.3")
    assert len(got) == 12
    assert f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz" in got
    assert all(re.fullmatch(r"[0-9a-f]{128}", v) for v in got.values())


def test_parse_checksum_shall_accept_sha256_and_ignore_other_lines() -> None:
    text = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"
            + (FB / "CHECKSUM.SHA256-14.3").read_text()
            + "SHA256 (short.img) = abcd\n"  # wrong length: not an entry
            + "garbage line\n-----BEGIN PGP SIGNATURE-----\n")
    got = media.parse_checksum(text)
    assert len(got) == 12 and "short.img" not in got
    assert all(len(v) == 64 for v in got.values())


def test_parse_checksum_shall_fail_at_stage_media_on_a_file_with_no_entry() -> None:
    with pytest.raises(LabError) as e:
        media.parse_checksum("<html><body><h1>404 Not Found</h1></body></html>\n")
    assert e.value.stage == "media" and "404 Not Found" in e.value.message


def test_parse_checksum_shall_lowercase_digests() -> None:
    assert media.parse_checksum(f"SHA256 (a.img) = {'AB' * 32}\n") == {"a.img": "ab" * 32}


# ================================================================ picking the image
def test_pick_shall_prefer_basic_cloudinit_ufs_qcow2_xz() -> None:
    assert media.pick_vm_image(sums("CHECKSUM.SHA512-14.3"), version="14.3") == f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"


def test_pick_shall_honour_fs_and_flavour_order() -> None:
    s = sums("CHECKSUM.SHA512-14.3")
    assert media.pick_vm_image(s, version="14.3", fs="zfs") == f"{V}-BASIC-CLOUDINIT-zfs.qcow2.xz"
    assert media.pick_vm_image(s, version="14.3", flavours=("",)) == f"{V}-ufs.qcow2.xz"
    assert media.pick_vm_image(s, version="14.3", fmt="raw") == f"{V}-BASIC-CLOUDINIT-ufs.raw.xz"


def test_pick_shall_refuse_a_release_with_only_the_plain_flavour_and_name_the_one_to_download() -> None:
    """13.x drift: no BASIC-CLOUDINIT images. The plain image runs no nuageinit and
    prints nothing on serial: taking it would wait silently for the provisioning
    deadline (issue 16, defect 4)."""
    with pytest.raises(LabError) as e:
        media.pick_vm_image(sums("CHECKSUM.SHA512-13.5"), version="13.5")
    assert e.value.stage == "media"
    assert "FreeBSD-13.5-RELEASE-amd64.qcow2.xz" in e.value.message
    assert "FreeBSD-13.5-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2.xz" in e.value.message
    assert media.vm_image_base("13.5") in e.value.message


def test_a_plain_image_given_by_the_user_shall_be_refused_before_anything_starts(tmp_path: Path) -> None:
    plain = tmp_path / f"{V}-ufs.qcow2.xz"
    plain.write_bytes(b"plain")
    (tmp_path / "CHECKSUM.SHA512").write_text(f"SHA512 ({plain.name}) = {hashlib.sha512(b'plain').hexdigest()}\n")
    out = media.missing_media(image_file=str(plain), packages_dir=str(REPO), cache_dir=tmp_path, version="14.3",
                              reachable=lambda url: True)
    assert len(out) == 1 and "plain VM image" in out[0] and f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz" in out[0]
    with pytest.raises(LabError) as e:
        media.get_image(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(plain))
    assert "BASIC-CLOUDINIT" in e.value.message
    ci = tmp_path / f"{V}-BASIC-CI-ufs.raw.xz"
    assert "the BASIC-CI flavour" in (media.flavour_problem(ci.name, "14.3") or "")
    assert media.flavour_problem(f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz", "14.3") is None


@pytest.mark.parametrize("version, ok", [("13.5", False), ("14.1", False), ("14.2", False), ("14.3", True),
                                         ("14.4", True), ("15.0", True)])
def test_versions_shall_be_refused_below_14_3_saying_which_are_supported(version: str, ok: bool) -> None:
    if ok:
        media.check_version(version)
        return
    with pytest.raises(ScenarioError) as e:
        media.check_version(version)
    assert f"FreeBSD {version}" in e.value.message and "supported: 14.3 and later" in e.value.message


def test_pick_shall_see_through_snapshot_stamps_and_accept_raw_for_the_preferred_flavour() -> None:
    got = media.pick_vm_image(sums("CHECKSUM.SHA512-15.0-snapshot"), version="15.0")
    assert got == "FreeBSD-15.0-CURRENT-amd64-BASIC-CLOUDINIT-20250605-a1b2c3d4e5f6-277845-ufs.raw.xz"


def test_pick_shall_prefer_compressed_and_qcow2_over_raw() -> None:
    s = {f"{V}-BASIC-CLOUDINIT-ufs.qcow2": "0" * 128, f"{V}-BASIC-CLOUDINIT-ufs.raw.xz": "1" * 128,
         f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz": "2" * 128}
    assert media.pick_vm_image(s, version="14.3") == f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"
    del s[f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"]
    assert media.pick_vm_image(s, version="14.3") == f"{V}-BASIC-CLOUDINIT-ufs.qcow2"


def test_pick_shall_list_the_candidates_when_none_fits() -> None:
    s = sums("CHECKSUM.SHA512-13.5")
    with pytest.raises(LabError) as e:
        media.pick_vm_image(s, version="14.3")
    assert e.value.stage == "media"
    assert all(name in e.value.message for name in s)
    with pytest.raises(LabError):
        media.pick_vm_image(sums("CHECKSUM.SHA512-14.3"), version="14.3", arch="arm64")


# ================================================================ releases and URLs
def test_latest_release_shall_pick_the_highest_minor_of_the_major() -> None:
    html = (FB / "vm-images-index.html").read_text()
    assert media.latest_release(html) == "14.3"
    assert media.latest_release(html, 13) == "13.5"
    assert media.latest_release(html, 15) == "15.0"


def test_latest_release_shall_compare_minors_as_numbers() -> None:
    html = '<a href="14.9-RELEASE/">14.9-RELEASE/</a>\n<a href="14.10-RELEASE/">14.10-RELEASE/</a>\n' \
           '<a href="4.11-RELEASE/">4.11-RELEASE/</a>\n<a href="114.12-RELEASE/">x</a>'
    assert media.latest_release(html) == "14.10"


def test_latest_release_shall_fail_when_the_major_is_absent() -> None:
    with pytest.raises(LabError) as e:
        media.latest_release((FB / "vm-images-index.html").read_text(), 12)
    assert e.value.stage == "media" and "12.x" in e.value.message


def test_urls_shall_follow_the_release_layouts() -> None:
    assert media.vm_image_base("14.3", "amd64") == \
        "https://download.freebsd.org/releases/VM-IMAGES/14.3-RELEASE/amd64/Latest/"
    assert packages.pkg_repo_base("14.3", "amd64") == "https://pkg.freebsd.org/FreeBSD:14:amd64/release_3/"
    assert packages.pkg_repo_base("13.5") == "https://pkg.freebsd.org/FreeBSD:13:amd64/release_5/"
    with pytest.raises(ScenarioError):
        packages.pkg_repo_base("14", "amd64")


# ================================================================ package catalogue
def catalogue() -> dict[str, packages.Pkg]:
    return packages.parse_packagesite((REPO / "packagesite.yaml").read_text())


def test_parse_packagesite_shall_read_each_manifest_line() -> None:
    cat = catalogue()
    assert len(cat) == 16
    xt = cat["xen-tools"]
    assert (xt.version, xt.origin, xt.path) == ("4.19.2_1", "sysutils/xen-tools", "All/xen-tools-4.19.2_1.pkg")
    assert xt.deps == ("gettext-runtime", "glib", "libiconv", "lzo2", "pixman", "python311", "yajl")
    data = (REPO / xt.path).read_bytes()
    assert xt.sha256 == hashlib.sha256(data).hexdigest() and xt.size == len(data)
    assert cat["xen-kernel"].deps == ()


def test_parse_packagesite_shall_prefer_repopath_and_name_bad_lines() -> None:
    line = {"name": "a", "version": "1", "sum": "0" * 64, "path": "All/a-1.pkg", "repopath": "All/Hashed/a-1~0.pkg"}
    assert packages.parse_packagesite(json.dumps(line))["a"].path == "All/Hashed/a-1~0.pkg"
    for bad, why in [("{not json", "line 2"), (json.dumps({"name": "b", "version": "1", "path": "x"}), "line 2"),
                     (json.dumps({**line, "sum": "xyz"}), "sha256"), (json.dumps(line), "twice")]:
        with pytest.raises(LabError) as e:
            packages.parse_packagesite(json.dumps(line) + "\n" + bad + "\n")
        assert e.value.stage == "media" and why in e.value.message, bad


def test_resolve_shall_give_the_closure_deps_first_each_once() -> None:
    cat = catalogue()
    order = packages.resolve(cat, packages.DOM0_PACKAGES)
    names = [p.name for p in order]
    assert len(names) == len(set(names))
    assert set(names) == set(cat) - {"zsh"}  # zsh is in the repository, nothing needs it
    for i, p in enumerate(order):
        for d in p.deps:
            assert names.index(d) < i, f"{d} must come before {p.name}"
    assert packages.resolve(cat) == packages.resolve(cat, ["xen-kernel", "xen-tools"])
    assert [p.name for p in packages.resolve(cat, ["xen-kernel"])] == ["xen-kernel"]


def test_resolve_shall_name_a_missing_dependency_and_who_needs_it() -> None:
    cat = catalogue()
    del cat["pixman"]
    with pytest.raises(LabError) as e:
        packages.resolve(cat)
    assert e.value.stage == "media" and "pixman" in e.value.message and "xen-tools" in e.value.message
    with pytest.raises(LabError) as e:
        packages.resolve(catalogue(), ["xen-toolz"])
    assert "xen-toolz" in e.value.message


def test_resolve_shall_survive_a_dependency_cycle() -> None:
    mk = lambda n, d: packages.Pkg(n, "1", "", f"All/{n}-1.pkg", "0" * 64, 1, d)  # noqa: E731
    cat = {"a": mk("a", ("b",)), "b": mk("b", ("a",))}
    assert sorted(p.name for p in packages.resolve(cat, ["a"])) == ["a", "b"]


def test_package_order_shall_put_pkg_first_then_deps_first() -> None:
    order = packages.resolve(catalogue(), ["xen-tools", "pkg"])
    lines = packages.package_order(order).splitlines()
    assert lines[0] == "pkg-2.1.2.pkg" and lines.count("pkg-2.1.2.pkg") == 1
    assert lines.index("yajl-2.1.0_4.pkg") < lines.index("xen-tools-4.19.2_1.pkg")


def test_meta_conf_shall_parse_ucl_and_json_forms_with_defaults() -> None:
    ucl = packages.parse_meta_conf((REPO / "meta.conf").read_text())
    assert ucl["version"] == 2 and ucl["packing_format"] == "txz" and ucl["manifests_archive"] == "packagesite"
    js = packages.parse_meta_conf('{ "version": 2, "packing_format": "tzst", "manifests": "packagesite.yaml" }')
    assert js["packing_format"] == "tzst" and js["manifests_archive"] == "packagesite"


@dataclass(frozen=True)
class Signer:
    """A repository signing key as `pkg repo` uses one (signature_type fingerprints)."""

    key: Any
    pem: bytes

    @property
    def fingerprint(self) -> str:  # what share/keys/pkg/trusted/* holds
        return hashlib.sha256(self.pem).hexdigest()

    def sign(self, data: bytes) -> bytes:
        """pkg hands its signing command the hex sha256 of the catalogue, which signs
        that text (`openssl dgst -sign key -sha256`): RSA PKCS#1 v1.5, SHA-256."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        return self.key.sign(hashlib.sha256(data).hexdigest().encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.fixture(scope="module")
def signer() -> Signer:
    return make_signer()


def make_signer() -> Signer:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Signer(key, pem)


def packagesite_pkg(fmt: str, signer: Signer | None = None, *, yaml: bytes | None = None,
                    signed: bytes | None = None) -> bytes:
    """packagesite.pkg as pkg-repo writes it: a tar holding packagesite.yaml and,
    when signed, <name>.sig and <name>.pub ahead of it (libpkg reads any member
    ending in .sig/.pub as a signature/key pair named by the rest). `signed`: the
    bytes the signature covers, when they should differ from the catalogue."""
    yaml = (REPO / "packagesite.yaml").read_bytes() if yaml is None else yaml
    members = []
    if signer is not None:
        members += [("signature.sig", signer.sign(yaml if signed is None else signed)), ("signature.pub", signer.pem)]
    members.append(("packagesite.yaml", yaml))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz" if fmt == "txz" else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if fmt == "tzst":
        return subprocess.run(["zstd", "-q", "-c"], input=buf.getvalue(), capture_output=True, check=True).stdout
    return buf.getvalue()


def test_the_trusted_fingerprint_shall_be_the_one_freebsd_ships() -> None:
    """share/keys/pkg/trusted/pkg.freebsd.org.2013102301 (FreeBSD's base system)."""
    assert packages.TRUSTED_FINGERPRINTS == {
        "pkg.freebsd.org.2013102301": "b0170035af3acc5f3f3ae1859dc717101b4e6c1d0a794ad554928ca0cbb2f438"}


def test_a_catalogue_signed_by_a_trusted_key_shall_verify(signer: Signer) -> None:
    members = packages.catalogue_members(packagesite_pkg("txz", signer))
    got = packages.verify_catalogue(members, trusted={"test-key": signer.fingerprint})
    assert got == {"signature": "verified", "signer": "signature", "key": "test-key",
                   "fingerprint": signer.fingerprint}


def test_a_catalogue_changed_after_signing_shall_be_refused(signer: Signer) -> None:
    yaml = (REPO / "packagesite.yaml").read_bytes()
    forged = yaml.replace(b'"sum":"', b'"sum":"0', 1)[:len(yaml)]
    members = packages.catalogue_members(packagesite_pkg("txz", signer, yaml=forged, signed=yaml))
    with pytest.raises(LabError) as e:
        packages.verify_catalogue(members, trusted={"test-key": signer.fingerprint})
    assert e.value.stage == "media" and "does not match packagesite.yaml" in e.value.message


def test_a_catalogue_signed_by_an_untrusted_key_shall_be_refused(signer: Signer) -> None:
    members = packages.catalogue_members(packagesite_pkg("txz", signer))
    with pytest.raises(LabError) as e:
        packages.verify_catalogue(members)  # FreeBSD's own fingerprint: not the test key
    assert f"key sha256 {signer.fingerprint} is not a trusted fingerprint" in e.value.message
    other = make_signer()
    members["signature.pub"] = other.pem  # a trusted key that did not make the signature
    with pytest.raises(LabError) as e:
        packages.verify_catalogue(members, trusted={"other": other.fingerprint})
    assert "does not match" in e.value.message


def test_an_unsigned_catalogue_shall_be_refused_from_a_repository(signer: Signer) -> None:
    with pytest.raises(LabError) as e:
        packages.verify_catalogue(packages.catalogue_members(packagesite_pkg("txz")))
    assert "carries no signature" in e.value.message
    members = packages.catalogue_members(packagesite_pkg("txz", signer))
    del members["signature.pub"]
    with pytest.raises(LabError) as e:
        packages.verify_catalogue(members, trusted={"test-key": signer.fingerprint})
    assert "signature.sig has no signature.pub" in e.value.message


def test_a_users_unsigned_catalogue_shall_be_used_and_recorded_as_unsigned(tmp_path: Path, signer: Signer) -> None:
    d = tmp_path / "pkgs"
    shutil.copytree(REPO / "All", d / "All")
    (d / "packagesite.pkg").write_bytes(packagesite_pkg("txz"))
    cat = packages.get_catalogue(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(d))
    assert cat.trust["signature"] == "none" and "unsigned" in cat.trust["why"]
    (d / "packagesite.pkg").write_bytes(packagesite_pkg("txz", signer))  # signed: checked like a download
    with pytest.raises(LabError):
        packages.get_catalogue(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(d))
    cat = packages.get_catalogue(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(d),
                                 trusted={"test-key": signer.fingerprint})
    assert cat.trust["signature"] == "verified" and cat.cache_sub is None


@pytest.mark.parametrize("fmt", ["txz", "tzst"])
def test_packagesite_text_shall_unpack_xz_and_zstd_catalogues(fmt: str) -> None:
    if fmt == "tzst" and not shutil.which("zstd"):
        pytest.skip("no zstd tool here")
    assert packages.packagesite_text(packagesite_pkg(fmt)) == (REPO / "packagesite.yaml").read_text()


def test_packagesite_text_shall_fail_on_an_archive_without_the_manifests() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    with pytest.raises(LabError) as e:
        packages.packagesite_text(buf.getvalue())
    assert e.value.stage == "media" and "packagesite.yaml" in e.value.message


# ================================================================ a real HTTP server
@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    cut: dict[str, int] = field(default_factory=dict)  # path -> how many responses to cut halfway
    stall: set[str] = field(default_factory=set)  # paths that never answer in time
    redirects: dict[str, str] = field(default_factory=dict)
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, status)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def handler_for(s: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            s.log.append((urlsplit(self.path).path, self.headers.get("Range"), status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            path = urlsplit(self.path).path
            self.send(200 if path in s.files else 404, {"Content-Length": "0"})

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path in s.stall:
                time.sleep(3)
                return
            if path in s.redirects:
                self.send(302, {"Location": s.redirects[path], "Content-Length": "0"})
                return
            body = s.files.get(path)
            if body is None:
                self.send(404, {"Content-Length": "0"})
                return
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            start = int(m[1]) if (m and s.honour_range) else 0
            if m and s.honour_range and start >= len(body):
                self.send(416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"})
                return
            payload = body[start:]
            headers = {"Content-Length": str(len(payload))}
            if m and s.honour_range:
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            if s.cut.get(path, 0) > 0:
                s.cut[path] -= 1
                self.send(206 if (m and s.honour_range) else 200, headers, payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
                return
            self.send(206 if (m and s.honour_range) else 200, headers, payload)

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(s))
    s.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield s
    httpd.shutdown()
    httpd.server_close()


BIG = bytes(range(256)) * 1200  # 300 KiB: several reads of 64 KiB
BIG_SHA512 = hashlib.sha512(BIG).hexdigest()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.is_file())


def test_fetch_shall_download_verify_and_report_progress(server: Served, tmp_path: Path) -> None:
    server.files["/img.xz"] = BIG
    seen: list[tuple[int, int | None]] = []
    path = fetch.Fetcher(tmp_path, progress=lambda d, t: seen.append((d, t))).fetch(
        server.base + "img.xz", sha512=BIG_SHA512)
    assert path == tmp_path / "img.xz" and path.read_bytes() == BIG
    assert not (tmp_path / "img.xz.part").exists()
    assert seen[-1] == (len(BIG), len(BIG))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 2


def test_fetch_shall_reject_a_corrupted_file_and_leave_nothing_behind(server: Served, tmp_path: Path) -> None:
    bad = bytearray(BIG)
    bad[1000] ^= 0xFF
    server.files["/img.xz"] = bytes(bad)
    with pytest.raises(LabError) as e:
        fetch.Fetcher(tmp_path).fetch(server.base + "img.xz", sha512=BIG_SHA512)
    msg = e.value.message
    assert e.value.stage == "media" and "img.xz" in msg and BIG_SHA512 in msg
    assert hashlib.sha512(bytes(bad)).hexdigest() in msg
    assert leftovers(tmp_path) == []  # no final file, no .part


def test_fetch_shall_keep_the_part_of_an_interrupted_transfer_and_resume_it(server: Served, tmp_path: Path) -> None:
    server.files["/img.xz"] = BIG
    server.cut["/img.xz"] = 1
    f = fetch.Fetcher(tmp_path, attempts=1)
    with pytest.raises(LabError) as e:
        f.fetch(server.base + "img.xz", sha512=BIG_SHA512)
    assert "interrupted" in e.value.message and "resumes" in e.value.message
    part = tmp_path / "img.xz.part"
    assert not (tmp_path / "img.xz").exists()
    have = part.stat().st_size
    assert 0 < have < len(BIG) and part.read_bytes() == BIG[:have]
    path = f.fetch(server.base + "img.xz", sha512=BIG_SHA512)  # the next run
    assert path.read_bytes() == BIG and not part.exists()
    assert server.log[-1] == ("/img.xz", f"bytes={have}-", 206)


def test_fetch_shall_resume_within_one_call_when_attempts_remain(server: Served, tmp_path: Path) -> None:
    server.files["/img.xz"] = BIG
    server.cut["/img.xz"] = 2
    path = fetch.Fetcher(tmp_path, attempts=3).fetch(server.base + "img.xz", sha512=BIG_SHA512)
    assert path.read_bytes() == BIG
    assert [r[1] is not None for r in server.log] == [False, True, True]


def test_fetch_shall_restart_cleanly_when_the_server_ignores_range(server: Served, tmp_path: Path) -> None:
    """A .part whose bytes do not match the file (so appending would corrupt it):
    the server answers 200 to the Range request and the .part is rewritten."""
    server.files["/img.xz"] = BIG
    server.honour_range = False
    (tmp_path / "img.xz.part").write_bytes(b"\x00" * 5000)
    path = fetch.Fetcher(tmp_path).fetch(server.base + "img.xz", sha512=BIG_SHA512)
    assert path.read_bytes() == BIG
    assert server.log == [("/img.xz", "bytes=5000-", 200)]


def test_fetch_shall_finish_a_part_that_is_already_whole(server: Served, tmp_path: Path) -> None:
    server.files["/img.xz"] = BIG
    (tmp_path / "img.xz.part").write_bytes(BIG)
    assert fetch.Fetcher(tmp_path).fetch(server.base + "img.xz", sha512=BIG_SHA512).read_bytes() == BIG
    assert server.log == [("/img.xz", f"bytes={len(BIG)}-", 416)]


def test_fetch_shall_reuse_a_verified_cache_file_and_replace_a_damaged_one(server: Served, tmp_path: Path) -> None:
    server.files["/img.xz"] = BIG
    f = fetch.Fetcher(tmp_path)
    path = f.fetch(server.base + "img.xz", sha512=BIG_SHA512)
    f.fetch(server.base + "img.xz", sha512=BIG_SHA512)
    assert len(server.log) == 1  # the second call did not touch the network
    path.write_bytes(b"x" + BIG[1:])
    assert f.fetch(server.base + "img.xz", sha512=BIG_SHA512).read_bytes() == BIG
    assert len(server.log) == 2


def test_fetch_shall_name_the_http_error(server: Served, tmp_path: Path) -> None:
    with pytest.raises(LabError) as e:
        fetch.Fetcher(tmp_path).fetch(server.base + "nope.xz", sha256="0" * 64)
    assert e.value.stage == "media" and "404" in e.value.message and "nope.xz" in e.value.message
    assert leftovers(tmp_path) == []


def test_fetch_shall_give_up_on_a_silent_server_within_its_timeout(server: Served, tmp_path: Path) -> None:
    server.stall.add("/slow.xz")
    t0 = time.monotonic()
    with pytest.raises(LabError) as e:
        fetch.Fetcher(tmp_path, timeout=0.5).fetch(server.base + "slow.xz", sha256="0" * 64)
    assert time.monotonic() - t0 < 2.5
    assert e.value.stage == "media" and "slow.xz" in e.value.message


def test_fetch_shall_follow_same_origin_redirects_only(server: Served, tmp_path: Path) -> None:
    server.files["/real.xz"] = BIG
    server.redirects["/moved.xz"] = "/real.xz"
    server.redirects["/away.xz"] = f"http://localhost:{server.port}/real.xz"
    f = fetch.Fetcher(tmp_path)
    assert f.fetch(server.base + "moved.xz", sha512=BIG_SHA512).read_bytes() == BIG
    with pytest.raises(LabError) as e:
        f.fetch(server.base + "away.xz", sha512=BIG_SHA512)
    assert "localhost" in e.value.message and not (tmp_path / "away.xz").exists()


def test_fetch_without_digest_shall_reuse_the_cache_unless_refreshed(server: Served, tmp_path: Path) -> None:
    server.files["/CHECKSUM.SHA512"] = b"one\n"
    f = fetch.Fetcher(tmp_path)
    assert f.fetch(server.base, name="CHECKSUM.SHA512", dest="x/CHECKSUM.SHA512").read_text() == "one\n"
    server.files["/CHECKSUM.SHA512"] = b"two\n"
    assert f.fetch(server.base, name="CHECKSUM.SHA512", dest="x/CHECKSUM.SHA512").read_text() == "one\n"
    assert f.fetch(server.base, name="CHECKSUM.SHA512", dest="x/CHECKSUM.SHA512",
                   refresh=True).read_text() == "two\n"


def test_fetch_shall_refuse_paths_that_leave_the_cache(tmp_path: Path) -> None:
    for bad in ("../x.pkg", "/etc/passwd", "All/../../x"):
        with pytest.raises(LabError):
            fetch.Fetcher(tmp_path).fetch("http://127.0.0.1:1/", name=bad)


def test_fetch_of_a_local_file_shall_verify_it_in_place_and_never_delete_it(tmp_path: Path) -> None:
    img = tmp_path / "user" / "img.qcow2.xz"
    img.parent.mkdir()
    img.write_bytes(BIG)
    cache = tmp_path / "cache"
    f = fetch.Fetcher(cache)
    assert f.fetch(str(img), sha512=BIG_SHA512) == img
    assert f.fetch(f"file://{img}", sha512=BIG_SHA512) == img
    with pytest.raises(LabError) as e:
        f.fetch(str(img), sha512="0" * 128)
    assert "mismatch" in e.value.message and img.exists()
    assert not cache.exists()  # nothing copied
    with pytest.raises(LabError):
        f.fetch(str(tmp_path / "absent.xz"))


def test_fetch_of_a_local_directory_shall_find_repository_and_flat_layouts(tmp_path: Path) -> None:
    xt = catalogue()["xen-tools"]
    f = fetch.Fetcher(tmp_path / "cache")
    assert f.fetch(str(REPO), name=xt.path, sha256=xt.sha256) == REPO / xt.path
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(REPO / xt.path, flat)
    assert f.fetch(str(flat), name=xt.path, sha256=xt.sha256) == flat / Path(xt.path).name
    with pytest.raises(LabError):
        f.fetch(str(flat))  # a directory needs a name


# ================================================================ image and packages end to end
def test_get_image_shall_pick_from_checksum_and_verify_the_download(server: Served, tmp_path: Path) -> None:
    good = f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"
    listing = {n: h for n, h in sums("CHECKSUM.SHA512-14.3").items() if n != good}
    listing[good] = BIG_SHA512
    server.files["/r/CHECKSUM.SHA512"] = "".join(f"SHA512 ({n}) = {h}\n" for n, h in sorted(listing.items())).encode()
    server.files[f"/r/{good}"] = BIG
    path = media.get_image(fetch.Fetcher(tmp_path), version="14.3", base_url=server.base + "r/")
    assert path == tmp_path / "freebsd/14.3-amd64" / good and path.read_bytes() == BIG
    assert [r[0] for r in server.log] == ["/r/CHECKSUM.SHA512", f"/r/{good}"]


def test_get_image_from_a_local_file_shall_need_the_checksum_beside_it(tmp_path: Path) -> None:
    img = tmp_path / f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"
    img.write_bytes(BIG)
    with pytest.raises(LabError) as e:
        media.get_image(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(img))
    assert "CHECKSUM.SHA512" in e.value.message
    (tmp_path / "CHECKSUM.SHA512").write_text(f"SHA512 ({img.name}) = {BIG_SHA512}\n")
    assert media.get_image(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(img)) == img
    assert media.get_image(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(tmp_path)) == img


@pytest.mark.parametrize("fmt", ["txz", "tzst"])
def test_get_packages_shall_resolve_and_verify_from_a_repository(server: Served, tmp_path: Path, fmt: str,
                                                                 signer: Signer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if fmt == "tzst" and not shutil.which("zstd"):
        pytest.skip("no zstd tool here")
    repo = "/FreeBSD:14:amd64/release_3/"
    server.files[repo + "meta.conf"] = f'version = 2;\npacking_format = "{fmt}";\n'.encode()
    server.files[repo + "packagesite.pkg"] = packagesite_pkg(fmt)  # unsigned: refused
    for p in (REPO / "All").iterdir():
        server.files[repo + "All/" + p.name] = p.read_bytes()
    with pytest.raises(LabError) as e:
        packages.get_packages(fetch.Fetcher(tmp_path / "unsigned"), version="14.3",
                              source=server.base + repo.lstrip("/"))
    assert "carries no signature" in e.value.message
    server.files[repo + "packagesite.pkg"] = packagesite_pkg(fmt, signer)
    monkeypatch.setitem(packages.TRUSTED_FINGERPRINTS, "test-key", signer.fingerprint)
    got = packages.get_packages(fetch.Fetcher(tmp_path), version="14.3", source=server.base + repo.lstrip("/"))
    names = [p.name for p, _ in got]
    assert names == [p.name for p in packages.resolve(catalogue(), packages.DOM0_PACKAGES)]
    cache = tmp_path / "freebsd/pkg/FreeBSD_14_amd64/release_3"
    for pkg, path in got:
        assert path == cache / pkg.path and hashlib.sha256(path.read_bytes()).hexdigest() == pkg.sha256
    assert not any(r[0].endswith("zsh-5.9_6.pkg") for r in server.log)


def test_get_packages_from_a_local_directory_shall_use_the_files_in_place(tmp_path: Path) -> None:
    got = packages.get_packages(fetch.Fetcher(tmp_path), version="14.3", source=str(REPO))
    assert all(path == REPO / pkg.path for pkg, path in got)
    assert leftovers(tmp_path) == []


def test_get_packages_shall_reject_a_tampered_package(tmp_path: Path) -> None:
    d = tmp_path / "repo"
    shutil.copytree(REPO, d)
    (d / "All/yajl-2.1.0_4.pkg").write_bytes(b"tampered")
    with pytest.raises(LabError) as e:
        packages.get_packages(fetch.Fetcher(tmp_path / "c"), version="14.3", source=str(d))
    assert "yajl" in e.value.message and "sha256 mismatch" in e.value.message


@pytest.mark.skipif(not shutil.which("xz"), reason="no xz here")
def test_decompress_image_shall_unpack_with_xz_atomically(tmp_path: Path) -> None:
    raw = tmp_path / "img.qcow2"
    raw.write_bytes(BIG)
    subprocess.run(["xz", "-z", str(raw)], check=True)
    out = media.decompress_image(tmp_path / "img.qcow2.xz")
    assert out == raw and out.read_bytes() == BIG and not (tmp_path / "img.qcow2.part").exists()
    bad = tmp_path / "bad.raw.xz"
    bad.write_bytes(b"not xz")
    with pytest.raises(LabError):
        media.decompress_image(bad)
    assert not (tmp_path / "bad.raw").exists() and not (tmp_path / "bad.raw.part").exists()


# ================================================================ rendering
def loader_conf(**kw: object) -> str:
    args: dict = {"dom0_mem_mb": 1024, "dom0_vcpus": 2, "iommu": False, **kw}
    return render.render_loader_conf(**args)


def loader_vars(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = shlex.split(v)[0]
    return out


def test_loader_conf_shall_boot_xen_with_a_pvh_dom0_on_com1() -> None:
    v = loader_vars(loader_conf())
    assert v["xen_kernel"] == "/boot/xen" and v["if_tap_load"] == "YES"
    assert v["boot_serial"] == "YES" and v["console"] == "comconsole"
    words = v["xen_cmdline"].split()
    for w in ("dom0_mem=1024M,max:1024M", "dom0_max_vcpus=2", "dom0=pvh", "dom0-iommu=none", "console=com1",
              "com1=115200,8n1", "loglvl=all"):
        assert w in words


def test_loader_conf_shall_drop_dom0_iommu_none_with_an_iommu_and_append_extra() -> None:
    words = loader_vars(loader_conf(iommu=True, extra="sync_console dom0=verbose"))["xen_cmdline"].split()
    assert "dom0-iommu=none" not in words and words[-2:] == ["sync_console", "dom0=verbose"]


@pytest.mark.parametrize("kw", [{"extra": 'x="y"'}, {"dom0_mem_mb": 64}, {"dom0_vcpus": 0}])
def test_loader_conf_shall_refuse_values_that_break_it(kw: dict) -> None:
    with pytest.raises(ScenarioError):
        loader_conf(**kw)


PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK+MH4E8KO32N5CXRvXVqvyZVl0+6ue4DobdhU0FqFd+ xen-blklab"
PRIV = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
HOST_PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHostKe dom0"
def user_data() -> str:
    return render.render_user_data(authorized_key=PUB, host_key_private=PRIV, host_key_public=HOST_PUB,
                                   packages_dir="packages", loader_conf=loader_conf())


def sh_syntax_ok(lines: list[str]) -> None:
    res = subprocess.run(["sh", "-n"], input="#!/bin/sh\n" + "\n".join(lines) + "\n", text=True,
                         capture_output=True)
    assert res.returncode == 0, res.stderr


# FreeBSD's /etc/ssh/sshd_config keeps every setting commented out; the
# BASIC-CLOUDINIT image appends two lines (release/tools/basic-cloudinit.conf).
SSHD_CONFIG = """#	$OpenBSD: sshd_config,v 1.104 2021/07/02 05:11:21 dtucker Exp $
#PermitRootLogin no
#PasswordAuthentication no
#KbdInteractiveAuthentication yes
Subsystem	sftp	/usr/libexec/sftp-server
# Example of overriding settings on a per-user basis
#Match User anoncvs
#	X11Forwarding no
PasswordAuthentication yes
UsePAM no
"""
STUBS = {
    # the FreeBSD tools the script calls, standing in on L0; each logs its argv
    "mount": 'echo "mount $*" >> "$LAB_ROOT/.log"; [ -z "${FAIL_MOUNT:-}" ]',
    "umount": 'echo "umount $*" >> "$LAB_ROOT/.log"',
    "pkg": 'echo "pkg $*" >> "$LAB_ROOT/.log"; case "$*" in *xen-kernel*) : > "$LAB_ROOT/boot/xen";; esac',
    "cap_mkdb": 'echo "cap_mkdb $*" >> "$LAB_ROOT/.log"',
    "pw": 'echo "pw $*" >> "$LAB_ROOT/.log"',
    "poweroff": 'echo POWEROFF',
    # sshd -T -f FILE: the first value wins, as in sshd
    "sshd": "awk 'tolower($1) == \"passwordauthentication\" { print \"passwordauthentication\", tolower($2); exit }' \"$3\"",
    # sysrc [-f FILE] [-n] NAME[=VALUE]...
    "sysrc": """f=/etc/rc.conf; n=
while [ $# -gt 0 ]; do case "$1" in -f) f=$2; shift 2;; -n) n=1; shift;; *) break;; esac; done
for a; do k=${a%%=*}
  if [ -n "$n" ]; then sed -n "s/^$k=\\"\\{0,1\\}\\([^\\"]*\\)\\"\\{0,1\\}$/\\1/p" "$f"; continue; fi
  grep -v "^$k=" "$f" > "$f.t"; echo "$k=\\"${a#*=}\\"" >> "$f.t"; mv "$f.t" "$f"
done""",
}


def fake_freebsd(root: Path) -> Path:
    """The files a fresh BASIC-CLOUDINIT image has that the script touches, and
    the config disk's packages directory; returns the stubs' directory."""
    for d in ("boot", "etc/ssh", "etc/rc.d", "root", "var/cache/nuageinit", "media/lab-cidata/packages"):
        (root / d).mkdir(parents=True)
    (root / "boot/loader.conf").write_text('autoboot_delay="-1"\nconsole="comconsole,vidconsole"\n')
    (root / "etc/rc.conf").write_text('nuageinit_enable="YES"\nfirstboot_freebsd_update_enable="YES"\n')
    (root / "etc/ssh/sshd_config").write_text(SSHD_CONFIG)
    (root / "etc/login.conf").write_text("default:\\\n\t:memorylocked=64K:\\\n\t:umask=022:\n")
    for f in ("etc/sysctl.conf", "etc/ttys", "firstboot", "var/cache/nuageinit/user_data",
              "var/cache/nuageinit/runcmds"):
        (root / f).write_text("")
    (root / "media/lab-cidata/packages/ORDER").write_text("pkg-2.1.2.pkg\nxen-kernel-4.19.2.pkg\n")
    bin_ = root.parent / "bin"
    bin_.mkdir()
    for name, body in STUBS.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_ / name).chmod(0o755)
    return bin_


def run_user_data(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path / "root"
    bin_ = fake_freebsd(root)
    script = tmp_path / "user_data"
    script.write_text(user_data())
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True,
                         env={"PATH": f"{bin_}:/usr/bin:/bin", "LAB_ROOT": str(root), **env})
    return res, root


def test_user_data_shall_be_a_plain_sh_script_that_every_nuageinit_runs() -> None:
    """14.3's nuageinit has no write_files: a #cloud-config's files would be
    skipped there, a #! script runs on 14.3 and 14.4 alike (issue 16, defect 3)."""
    text = user_data()
    assert text.startswith("#!/bin/sh\n") and "#cloud-config" not in text and "write_files" not in text
    sh_syntax_ok(text.splitlines())
    assert render.build_user_data(render.build_script(patches=[], ident="abc")).startswith("#!/bin/sh\n")


def test_provisioning_shall_write_its_files_install_offline_disarm_and_power_off(tmp_path: Path) -> None:
    """The whole script, run under sh on L0 against a stand-in root with stub tools."""
    res, root = run_user_data(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == ["lab-provision: start", "lab-provision: done", "POWEROFF"]
    assert (root / "boot/loader.conf").read_text().endswith(loader_conf())
    assert (root / "boot.config").read_text() == "-h\n"  # defect 1: later boots speak on serial from boot2 on
    assert (root / "etc/sysctl.conf").read_text() == "vm.max_wired=-1\n"
    assert (root / "etc/ttys").read_text() == 'xc0 "/usr/libexec/getty Pc" xterm onifconsole secure\n'
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == PRIV
    assert (root / "etc/ssh/ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text() == HOST_PUB + "\n"
    assert (root / "root/.ssh/authorized_keys").read_text() == PUB + "\n"
    assert (root / "root/.ssh").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/rc.d/lab_ready").read_text() == render.RC_READY
    assert (root / "etc/rc.d/lab_ready").stat().st_mode & 0o111
    assert ":memorylocked=unlimited:" in (root / "etc/login.conf").read_text()
    log = (root / ".log").read_text().splitlines()
    assert [line for line in log if line.startswith("pkg ")] == ["pkg add -f ./pkg-2.1.2.pkg",
                                                                 "pkg add ./xen-kernel-4.19.2.pkg"]
    rc = (root / "etc/rc.conf").read_text()
    for kv in ('hostname="lab-dom0"', 'xencommons_enable="yes"', 'ifconfig_bridge0_name="xenbr0"'):
        assert kv in rc.splitlines()


def test_provisioning_shall_disarm_firstboot_and_nuageinit_before_powering_off(tmp_path: Path) -> None:
    """/firstboot is removed only at the end of rc, and the script powers off from
    inside rc; nuageinit never deletes its cached script: without this the dom0's
    boot ran the provisioning again and powered itself off (issue 16, defect 2)."""
    res, root = run_user_data(tmp_path)
    assert res.returncode == 0
    for f in ("firstboot", "var/cache/nuageinit/user_data", "var/cache/nuageinit/runcmds"):
        assert not (root / f).exists(), f
    rc = (root / "etc/rc.conf").read_text().splitlines()
    assert 'nuageinit_enable="NO"' in rc and 'firstboot_freebsd_update_enable="NO"' in rc
    text = user_data()
    assert text.index("\ndisarm ||") < text.index("echo 'lab-provision: done'")
    trap = next(line for line in text.splitlines() if line.startswith("trap "))
    assert trap.index("disarm") < trap.index("poweroff")  # every exit, failures too


def test_provisioning_shall_report_one_fatal_line_and_power_off_disarmed_on_failure(tmp_path: Path) -> None:
    res, root = run_user_data(tmp_path, FAIL_MOUNT="1")
    assert res.returncode == 1
    assert res.stdout.splitlines() == ["lab-provision: start", "lab-provision: FATAL: cannot mount the config disk",
                                       "POWEROFF"]
    assert console.LAB_FATAL.search(res.stdout.encode())
    assert not (root / "firstboot").exists()


def test_sshd_config_shall_say_no_first_whatever_the_image_appended(tmp_path: Path) -> None:
    """sshd keeps the first value it reads; the image appends `PasswordAuthentication
    yes`: appending `no` after it changed nothing (issue 16)."""
    res, root = run_user_data(tmp_path)
    assert res.returncode == 0
    active = [line for line in (root / "etc/ssh/sshd_config").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert active[:3] == list(render.SSHD_SETTINGS)
    assert [line for line in active if line.lower().startswith("passwordauthentication")] == [
        "PasswordAuthentication no"]
    assert "UsePAM no" in active and "Subsystem\tsftp\t/usr/libexec/sftp-server" in active


def test_user_data_shall_refuse_bad_keys_and_paths() -> None:
    base = {"authorized_key": PUB, "host_key_private": PRIV, "host_key_public": HOST_PUB,
            "packages_dir": "packages", "loader_conf": ""}
    for k, v in [("authorized_key", "not a key"), ("host_key_private", "secret"), ("packages_dir", "a b;rm"),
                 ("loader_conf", "x\nLAB_EOF\nreboot\n")]:
        with pytest.raises(LabError):
            render.render_user_data(**{**base, k: v})


def test_build_script_shall_patch_in_order_build_and_install_into_the_dom0_disk() -> None:
    lines = render.build_script(patches=["/p/revert-2014.patch", "/q/debug.patch"], ident="abc123")
    sh_syntax_ok(lines)
    script = "\n".join(lines)
    steps = ["0000-revert-2014.patch", "0001-debug.patch", "kernel-toolchain", "buildkernel KERNCONF=GENERIC",
             "installkernel KERNCONF=GENERIC DESTDIR=/mnt", "xen-blklab.id", "lab-build: done abc123"]
    at = [script.index(s) for s in steps]
    assert at == sorted(at)
    assert render.SRC_SERIAL in script and render.TARGET_SERIAL in script
    with pytest.raises(LabError):
        render.build_script(patches=[], ident="a;reboot")


def test_meta_data_shall_be_yaml_scalars_nuageinit_reads() -> None:
    text = render.render_meta_data(instance_id="dom0-abc")
    assert text == 'instance-id: "dom0-abc"\nlocal-hostname: "lab-dom0"\n'


def test_cidata_shall_be_an_iso_labelled_lowercase_cidata() -> None:
    argv = render.cidata_argv(Path("/s"), Path("/o.iso"))
    assert argv[0] == "genisoimage" and argv[argv.index("-volid") + 1] == "cidata" and "-rock" in argv


def walk(path: Path, milestones: list[console.Milestone]) -> list[str]:
    """The boot loop's own wait (console.Console.wait_for) over a finished console."""
    con = console.Console(path, "test")
    seen = []
    for m in milestones:
        con.wait_for(m, Deadline(0.5))
        seen.append(m.what)
    return seen


def test_the_loader_milestone_shall_be_seen_before_and_after_the_console_switch() -> None:
    """Consoles reconstructed from the loader's and kernel's sources (tests/data/
    freebsd/README.md): the provisioning boot shows nothing of the loader before
    loader.conf switches the console; the old pattern (`Consoles: |FreeBSD/x86 `)
    never matched there and every FreeBSD VM ended in ERROR (issue 16, defect 1)."""
    prov = FB / "console-provision.txt"
    old = re.compile(rb"Consoles: |FreeBSD/x86 ")
    assert not old.search(prov.read_bytes())
    assert walk(prov, [vm.FREEBSD_LOADER, vm.FREEBSD_KERNEL, vm.PROVISIONED]) == [
        "FreeBSD's loader", "the FreeBSD kernel's banner", "the provisioning script to finish"]
    assert walk(FB / "console-dom0.txt", list(vm.DOM0_BOOT)) == [m.what for m in vm.DOM0_BOOT]
    for line in (b"Loading Xen kernel...", b"Loading kernel...", b"/boot/xen text=0x1a4e40 data=0x2b8c0 ",
                 b"Consoles: serial port  ", b"FreeBSD/x86 bootstrap loader, Revision 1.1"):
        assert vm.FREEBSD_LOADER.pattern.search(line), line
    assert not vm.FREEBSD_LOADER.pattern.search(b"FreeBSD 14.3-RELEASE releng/14.3-n271432 GENERIC amd64")


def test_milestones_shall_match_freebsd_console_lines() -> None:
    assert vm.FREEBSD_KERNEL.pattern.search(b"FreeBSD 14.3-RELEASE releng/14.3-n271432-8c9ce319fef7 GENERIC amd64")
    assert vm.FREEBSD_KERNEL.pattern.search(b"FreeBSD 14.3-RELEASE-p2 GENERIC amd64")
    assert vm.PROVISIONED.pattern.search(b"lab-provision: done\r\n")
    assert not vm.PROVISIONED.pattern.search(b"lab-provision: FATAL: pkg add")


# ================================================================ sysctl dev.xbbd
def series(name: str) -> list[tuple[float, dict[int, dict[str, int | str]]]]:
    """A constructed capture, parsed: (t, {unit: nodes})."""
    return [(t, xbbd.parse_xbbd(text)) for t, text in xbbd_samples(name)]


def unit(name: str, u: int = 0) -> list[tuple[float, dict[str, int | str]]]:
    return [(t, units[u]) for t, units in series(name)]


def test_parse_xbbd_shall_split_units_and_keep_types() -> None:
    units = series("xbbd-healthy.txt")[3][1]
    assert sorted(units) == [0, 1]
    u0 = units[0]
    assert set(xbbd.XBBD_COUNTERS) <= set(u0)
    assert all(isinstance(u0[k], int) for k in xbbd.XBBD_COUNTERS)
    assert u0["%desc"] == "Backend Virtual Block Device" and u0["%location"] == "" and u0["%pnpinfo"] == ""
    assert u0["xenstore_path"] == "backend/vbd/1/51728" and u0["xenbus_peer_domid"] == 1
    assert u0["max_requests"] == 32


def test_parse_xbbd_shall_ignore_other_trees_and_the_devclass_node() -> None:
    got = xbbd.parse_xbbd("dev.xbbd.%parent: \ndev.xbd.0.max_requests: 32\nkern.ostype: FreeBSD\n"
                        "dev.xbbd.2.reqs_received: 18446744073709551615\r\n")
    assert got == {2: {"reqs_received": 18446744073709551615}}


def test_point_shall_compute_inflight_with_and_without_the_2014_counters() -> None:
    c = {"reqs_received": 100, "reqs_completed": 60, "reqs_queued_for_completion": 15,
         "reqs_completed_with_error": 2, "request_shortages": 0, "kva_shortages": 0, "max_requests": 32}
    p = xbbd.FreeBsdPoint.from_counters(1.0, c)
    assert p.inflight == 25 and p.completed_with_error == 2
    old = {k: v for k, v in c.items() if k not in xbbd.FIX_2014_COUNTERS}
    q = xbbd.FreeBsdPoint.from_counters(1.0, old)
    assert q.queued_for_completion is None and q.completed_with_error is None and q.inflight == 40
    with pytest.raises(LabError):
        xbbd.FreeBsdPoint.from_counters(0.0, {"%desc": "Backend Virtual Block Device"})


def test_healthy_series_shall_pass_every_rule() -> None:
    for u in (0, 1):
        r = xbbd.xbbd_check(unit("xbbd-healthy.txt", u), stall_window=3)
        assert r["hang"] is None and r["errors"] == 0 and r["invariant_violations"] == []
        assert r["shortages"] == {"request_shortages": 0, "kva_shortages": 0} and r["missing"] == []


def test_a_queue_stuck_non_zero_shall_hang_after_the_stall_window() -> None:
    s = unit("xbbd-hung-queued.txt")
    r = xbbd.xbbd_check(s, stall_window=30)
    assert r["hang"] is not None
    assert "reqs_queued_for_completion stuck at 5" in r["hang"]["cause"]
    assert (r["hang"]["since_t"], r["hang"]["detected_t"]) == (10.0, 40.0)
    assert xbbd.xbbd_check(s, stall_window=31)["hang"] is None  # 30 s stuck: not yet
    assert xbbd.xbbd_check(s[:7], stall_window=30)["hang"] is None  # at t=30: 20 s stuck


def test_a_pre_2014_kernel_shall_be_judged_without_the_two_counters() -> None:
    s = unit("xbbd-pre2014.txt")
    r = xbbd.xbbd_check(s, stall_window=30)
    assert r["missing"] == list(xbbd.FIX_2014_COUNTERS)
    assert r["errors"] is None
    assert r["shortages"]["request_shortages"] == 148
    assert r["hang"] is not None and r["hang"]["since_t"] == 20.0 and r["hang"]["inflight"] == 32
    assert r["hang"]["queued_for_completion"] is None
    assert xbbd.xbbd_check(s[:5], stall_window=30)["hang"] is None  # up to t=20 it progressed


def test_inflight_above_max_requests_shall_be_an_invariant_violation_with_its_time() -> None:
    r = xbbd.xbbd_check(unit("xbbd-invariant.txt"), stall_window=30)
    assert r["invariant_violations"] == [{"t": 2.0, "inflight": 40, "max_requests": 32}]
    assert r["hang"] is None


def counters(t: float, rec: int, comp: int, *, q: int = 0, err: int = 0, rs: int = 0) -> tuple[float, dict]:
    return (t, {"reqs_received": rec, "reqs_completed": comp, "reqs_queued_for_completion": q,
                "reqs_completed_with_error": err, "request_shortages": rs, "kva_shortages": 0,
                "max_requests": 32})


def test_idle_is_not_a_stall_and_the_clock_starts_when_io_is_in_flight() -> None:
    idle = [counters(t, 50, 50) for t in range(0, 100, 10)]
    assert xbbd.xbbd_check(idle, stall_window=30)["hang"] is None
    late = idle + [counters(100, 60, 50), counters(110, 60, 50), counters(120, 60, 50)]
    assert xbbd.xbbd_check(late, stall_window=30)["hang"] is None  # 20 s in flight since t=100
    r = xbbd.xbbd_check(late + [counters(130, 60, 50)], stall_window=30)
    assert r["hang"] is not None and r["hang"]["since_t"] == 100


def test_slow_is_not_hung() -> None:
    slow = [counters(t, 40 + t // 25, 10 + t // 25) for t in range(0, 300, 5)]
    assert xbbd.xbbd_check(slow, stall_window=30)["hang"] is None


def test_errors_shall_count_growth_of_completed_with_error() -> None:
    r = xbbd.xbbd_check([counters(0, 10, 10, err=1), counters(1, 20, 20, err=4)], stall_window=30)
    assert r["errors"] == 3


def test_no_samples_shall_decide_nothing() -> None:
    r = xbbd.xbbd_check([], stall_window=30)
    assert r["samples"] == 0 and r["hang"] is None and r["missing"] == []


# ================================================================ the plan
def test_plan_shall_list_every_download_with_its_url_and_the_boot_with_its_command() -> None:
    steps = freebsd.plan_steps(version="14.3", arch="amd64", image_file=None, packages_dir=None, src=None, patches=[])
    by = {s["step"]: s for s in steps}
    order = [s["step"] for s in steps]
    assert order.index("checksum") < order.index("image") < order.index("verify") < order.index("decompress")
    assert order.index("cidata") < order.index("provision") < order.index("boot")
    base = "https://download.freebsd.org/releases/VM-IMAGES/14.3-RELEASE/amd64/Latest/"
    assert by["checksum"]["url"] == base + "CHECKSUM.SHA512"
    assert by["image"]["url"] == base + "{name}" and by["image"]["chosen_by"] == "pick_vm_image"
    assert by["packagesite"]["url"] == "https://pkg.freebsd.org/FreeBSD:14:amd64/release_3/meta.conf"
    assert by["decompress"]["command"][0] == "xz"
    assert by["cidata"]["command"][0] == "genisoimage"
    prov = by["provision"]["command"]
    assert "-netdev" not in prov and "-kernel" not in prov and any("cidata.iso" in a for a in prov)
    boot = by["boot"]["command"]
    assert "qemu64,+svm,+npt" in boot and "unverified" in by["boot"]
    assert any("hostfwd=tcp:127.0.0.1:$PORT-:22" in a for a in boot)
    assert by["boot"]["milestones"][-2:] == [console.DOM0_INIT.what, "dom0 SSH"]
    assert console.XEN_BANNER.what in by["boot"]["milestones"]
    assert "build" not in by and by["kernel"]["what"].startswith("the release's GENERIC")
    assert all(s.get("url", "").startswith("https://") for s in steps if "url" in s)


def test_plan_with_local_media_and_a_source_tree_shall_download_nothing_and_build(tmp_path: Path) -> None:
    img = tmp_path / f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"
    steps = freebsd.plan_steps(version="14.3", arch="amd64", image_file=str(img), packages_dir=str(REPO),
                          src="/src/freebsd", patches=["/p/revert-2014.patch"])
    by = {s["step"]: s for s in steps}
    assert not any("url" in s for s in steps)
    assert by["image"]["path"] == str(img) and by["packages"]["path"] == str(REPO)
    build = by["build"]
    assert any("0000-revert-2014.patch" in line for line in build["script"])
    assert any(f"serial={render.SRC_SERIAL}" in a for a in build["command"])
    assert any(f"serial={render.TARGET_SERIAL}" in a for a in build["command"])
    assert by["source"]["command"][:3] == ["tar", "-C", "/src/freebsd"]
    assert [s["step"] for s in steps].index("build") < [s["step"] for s in steps].index("boot")


# ================================================================ missing media
def test_missing_media_offline_shall_say_what_to_download_and_which_key_takes_it(tmp_path: Path) -> None:
    asked: list[str] = []
    out = media.missing_media(image_file=None, packages_dir=None, cache_dir=tmp_path, version="14.3",
                           reachable=lambda url: asked.append(url) or False)
    assert len(out) == 2
    img, pkgs = out
    assert "download.freebsd.org is unreachable" in img and "CHECKSUM.SHA512" in img
    assert "BASIC-CLOUDINIT-ufs.qcow2.xz" in img and "[freebsd] image = PATH" in img
    assert "pkg.freebsd.org" in pkgs and "[freebsd] packages = DIR" in pkgs and "xen-tools" in pkgs
    assert asked == [media.vm_image_base("14.3") + "CHECKSUM.SHA512", packages.pkg_repo_base("14.3") + "meta.conf"]


def test_missing_media_shall_be_empty_when_the_network_can_supply_it(tmp_path: Path) -> None:
    assert media.missing_media(image_file=None, packages_dir=None, cache_dir=tmp_path, version="14.3",
                            reachable=lambda url: True) == []


def test_missing_media_shall_check_the_users_files(tmp_path: Path) -> None:
    def never(url: str) -> bool:
        raise AssertionError("no probe when the user supplied the media")

    img = tmp_path / f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz"
    out = media.missing_media(image_file=str(img), packages_dir=str(tmp_path / "nope"), cache_dir=tmp_path,
                           version="14.3", reachable=never)
    assert "does not exist" in out[0] and "not a directory" in out[1]
    img.write_bytes(b"x")
    out = media.missing_media(image_file=str(img), packages_dir=str(REPO), cache_dir=tmp_path, version="14.3",
                           reachable=never)
    assert len(out) == 1 and "no CHECKSUM.SHA512 beside" in out[0]
    (tmp_path / "CHECKSUM.SHA512").write_text(f"SHA512 (other.qcow2.xz) = {'0' * 128}\n")
    out = media.missing_media(image_file=str(img), packages_dir=str(REPO), cache_dir=tmp_path, version="14.3",
                           reachable=never)
    assert len(out) == 1 and f"does not list {img.name}" in out[0]
    (tmp_path / "CHECKSUM.SHA512").write_text(f"SHA512 ({img.name}) = {'0' * 128}\n")
    for given in (img, tmp_path):  # the file, or the directory holding it
        assert media.missing_media(image_file=str(given), packages_dir=str(REPO), cache_dir=tmp_path,
                                version="14.3", reachable=never) == []
    img.unlink()
    out = media.missing_media(image_file=str(tmp_path), packages_dir=None, cache_dir=tmp_path, version="14.3",
                           reachable=lambda url: True)
    assert len(out) == 1 and f"not {img.name}" in out[0]


def test_missing_media_shall_name_package_files_the_catalogue_requires(tmp_path: Path) -> None:
    d = tmp_path / "pkgs"
    shutil.copytree(REPO, d)
    (d / "All/xen-tools-4.19.2_1.pkg").unlink()
    (d / "All/zsh-5.9_6.pkg").unlink()  # not needed: not reported
    out = media.missing_media(image_file=None, packages_dir=str(d), cache_dir=tmp_path, version="14.3",
                           reachable=lambda url: True)
    assert out == [f"FreeBSD packages in {d}: 1 file(s) the catalogue requires are absent: "
                   "All/xen-tools-4.19.2_1.pkg"]
    (d / "packagesite.yaml").unlink()
    out = media.missing_media(image_file=None, packages_dir=str(d), cache_dir=tmp_path, version="14.3",
                           reachable=lambda url: True)
    assert "no packagesite.pkg" in out[0]


def test_missing_media_shall_trust_the_cache_without_probing(tmp_path: Path) -> None:
    work = tmp_path / "freebsd/14.3-amd64"
    work.mkdir(parents=True)
    shutil.copy(FB / "CHECKSUM.SHA512-14.3", work / "CHECKSUM.SHA512")
    (work / f"{V}-BASIC-CLOUDINIT-ufs.qcow2.xz").write_bytes(b"verified before it was renamed")
    repo = tmp_path / "freebsd/pkg/FreeBSD_14_amd64/release_3"
    shutil.copytree(REPO / "All", repo / "All")
    (repo / "packagesite.pkg").write_bytes(packagesite_pkg("txz"))

    def never(url: str) -> bool:
        raise AssertionError(f"probed {url} although the cache has it")

    assert media.missing_media(image_file=None, packages_dir=None, cache_dir=tmp_path, version="14.3",
                            reachable=never) == []
