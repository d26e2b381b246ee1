"""One way to put an entry in the lab's cache: build it aside under a unique
name, verify it, rename it into place atomically, under a lock.

An entry is a file or a directory `final`. While it is built it lives beside
`final` as `.<name>.building-<pid>-<token>`: the same directory (so the rename
is atomic: one filesystem), hidden, and named after the process that builds it,
so a build killed hard (SIGKILL, power loss) leaves something `sweep` can tell
apart from a build still running. Readers only ever look at `final`, which
either does not exist or is complete.

Two processes that want the same entry take `locked(final)`, an flock(2) on
`.<name>.lock` beside it: the second waits and then finds the entry built. The
kernel drops the lock of a process that dies, so a killed builder never blocks
the next one. Lock files stay (removing one while another process waits on it
would let two builders in); they are empty."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("lab.cache")
MARK = ".building-"


def aside(final: Path) -> Path:
    """A unique temporary path beside `final` (not created)."""
    return final.parent / f".{final.name}{MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _mounts_under(p: Path) -> list[str]:
    """Mount points at or below `p` (a chroot build killed before it unmounted)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    top = os.path.realpath(p)
    points = [ln.split()[4].replace("\\040", " ") for ln in lines if len(ln.split()) > 4]
    return [m for m in points if m == top or m.startswith(top + "/")]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        busy = _mounts_under(p)
        if busy:
            # rmtree would descend into a bind-mounted /dev or /proc and delete the host's
            log.warning("not removing %s: still mounted: %s", p, ", ".join(busy))
            return
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def promote(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final` atomically. If `final` already exists (another
    process won the race), `tmp` is removed and `final` kept. Returns `final`."""
    if final.exists() or final.is_symlink():
        _remove(tmp)
        return final
    if tmp.is_dir() and not tmp.is_symlink():
        # rename(2) of a directory cannot replace a non-empty one: a winner
        # that appeared since the check above makes it fail, and it stays.
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            _remove(tmp)
    else:
        # rename(2) of a file silently replaces; link(2) never does.
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            pass
        _remove(tmp)
    return final


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.<name>.lock` beside `path` (blocking)."""
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor drops the lock


def put(
    final: Path,
    build: Callable[[Path], None],
    *,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """The entry `final`, built first if it does not exist: `build(tmp)` creates
    `tmp` (a file or a directory), `verify(tmp)` raises if it is not right, then
    `tmp` becomes `final`. On any exception, Ctrl-C included, `tmp` is removed
    and the exception propagates; `final` is never half-written."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final):
        if final.exists():  # built by the process we waited for
            return final
        sweep(final.parent)
        tmp = aside(final)
        try:
            build(tmp)
            if not (tmp.exists() or tmp.is_symlink()):
                raise FileNotFoundError(f"the build of {final} did not create {tmp}")
            if verify is not None:
                verify(tmp)
            return promote(tmp, final)
        except BaseException:
            _remove(tmp)
            raise


def builder_pid(name: str) -> int | None:
    """The pid in `.<name>.building-<pid>-<token>` (or the older `-<pid>` form)."""
    if not name.startswith(".") or MARK not in name:
        return None
    pid = name.rsplit(MARK, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def sweep(parent: Path) -> list[Path]:
    """Remove the leftovers of builds whose process is gone; returns them."""
    gone: list[Path] = []
    if not parent.is_dir():
        return gone
    for p in sorted(parent.iterdir()):
        pid = builder_pid(p.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            _remove(p)
            gone.append(p)
    return gone
