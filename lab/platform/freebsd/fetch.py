"""Downloads into the cache, only from the URLs the lab was given: resumable,
verified (sha256/sha512), atomic. A local file or directory given by the user is
verified the same way and used in place, never modified.

A download is not a build: its `<dest>.part` keeps a fixed name on purpose, so
the next run resumes an interrupted transfer (lab.cache's unique temporary
names would throw the received bytes away)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.client import HTTPMessage
from pathlib import Path
from typing import IO

from lab.errors import LabError

log = logging.getLogger("lab.freebsd")


def media_error(msg: str) -> LabError:
    """A medium that cannot be had or is not what it claims: stage `media`."""
    return LabError("media", msg)


_media = media_error  # the short name the messages below use


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part keeps what arrived."""


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host: the lab downloads only
    from the URLs it was given."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
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


def is_url(source: str) -> bool:
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
        if not is_url(source):
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


def progress_logger(what: str) -> Callable[[int, int | None], None]:
    """Download progress on the log, at most every 5% (or every 50 MB unsized)."""
    state = {"last": -1}

    def report(done: int, total: int | None) -> None:
        step = (done * 20 // total) if total else done >> 26
        if step != state["last"]:
            state["last"] = step
            log.info("%s: %d MB%s", what, done >> 20, f" of {total >> 20} MB" if total else "")

    return report
