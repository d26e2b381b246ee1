"""lab/cache.py: one way into the cache. An entry is built aside, verified,
renamed into place atomically, under a lock; a reader never sees half an entry,
two processes never build the same entry twice, a killed builder's leftover is
swept."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lab import cache

DEAD = 999999999  # above any pid_max: no such process


def _file(data: bytes):
    def build(tmp: Path) -> None:
        tmp.write_bytes(data)
    return build


def _dir(tmp: Path) -> None:
    tmp.mkdir()
    (tmp / "a").write_text("a")


# ------------------------------------------------------------ aside
def test_aside_shall_be_hidden_unique_beside_final_and_name_this_process(tmp_path: Path) -> None:
    final = tmp_path / "entry-1234"
    a, b = cache.aside(final), cache.aside(final)
    assert a != b
    assert a.parent == final.parent
    assert a.name.startswith(f".entry-1234.building-{os.getpid()}-")
    assert cache.builder_pid(a.name) == os.getpid()
    assert not a.exists()


@pytest.mark.parametrize(("name", "pid"), [
    (".x.building-123-abcd", 123),
    (".x-1.building-45-0f0f", 45),
    (".x.building-67", 67),  # the older form, without a token
    ("x.building-123-ab", None),  # not hidden
    (".x.lock", None),
    (".x.building-abc-1", None),
    ("entry", None),
])
def test_builder_pid_shall_read_only_building_names(name: str, pid: int | None) -> None:
    assert cache.builder_pid(name) == pid


# ------------------------------------------------------------ promote
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_promote_shall_rename_into_place(tmp_path: Path, kind: str) -> None:
    final = tmp_path / "e"
    tmp = cache.aside(final)
    (_file(b"x") if kind == "file" else _dir)(tmp)
    assert cache.promote(tmp, final) == final
    assert final.exists() and not tmp.exists()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_promote_shall_keep_a_winner_and_drop_the_loser(tmp_path: Path, kind: str) -> None:
    final = tmp_path / "e"
    first, second = cache.aside(final), cache.aside(final)
    if kind == "file":
        first.write_text("first")
        second.write_text("second")
    else:
        for d, t in ((first, "first"), (second, "second")):
            d.mkdir()
            (d / "who").write_text(t)
    cache.promote(first, final)
    assert cache.promote(second, final) == final
    assert (final.read_text() if kind == "file" else (final / "who").read_text()) == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


# ------------------------------------------------------------ put
def test_put_shall_build_verify_and_promote_once(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "e.bin"
    calls: list[str] = []

    def build(tmp: Path) -> None:
        calls.append("build")
        assert tmp.parent == final.parent and not final.exists()
        tmp.write_bytes(b"data")

    def verify(tmp: Path) -> None:
        calls.append("verify")
        assert tmp.read_bytes() == b"data"

    assert cache.put(final, build, verify=verify) == final
    assert cache.put(final, build, verify=verify) == final  # cached: no second build
    assert calls == ["build", "verify"]
    assert final.read_bytes() == b"data"
    assert [p.name for p in final.parent.iterdir() if cache.builder_pid(p.name)] == []


class Boom(Exception):
    pass


def _raise(exc: BaseException):
    def f(tmp: Path) -> None:
        raise exc
    return f


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize(("where", "exc"), [
    ("build", Boom("compile error")),
    ("build", KeyboardInterrupt()),  # Ctrl-C while building
    ("verify", Boom("bad checksum")),
    ("verify", KeyboardInterrupt()),
    ("verify", SystemExit(1)),
])
def test_put_shall_remove_the_temporary_on_any_exception(
    tmp_path: Path, kind: str, where: str, exc: BaseException
) -> None:
    final = tmp_path / "e"
    make = _file(b"x") if kind == "file" else _dir

    def build(tmp: Path) -> None:
        make(tmp)
        if where == "build":
            raise exc

    with pytest.raises(type(exc)):
        cache.put(final, build, verify=_raise(exc) if where == "verify" else None)
    assert not final.exists()
    assert [p for p in tmp_path.iterdir() if cache.builder_pid(p.name)] == []
    # and the lock was released: the next put builds
    assert cache.put(final, make) == final


def test_put_shall_fail_when_the_build_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cache.put(tmp_path / "e", lambda tmp: None)
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------ sweep
def test_sweep_shall_remove_only_leftovers_of_dead_builders(tmp_path: Path) -> None:
    dead_dir = tmp_path / f".img-abc.building-{DEAD}-0a0a"
    dead_dir.mkdir()
    (dead_dir / "rootfs").mkdir()
    dead_file = tmp_path / f".pkg.bin.building-{DEAD}-0b0b"
    dead_file.write_text("x")
    legacy = tmp_path / f".img-old.building-{DEAD}"  # the pre-cache.py form
    legacy.mkdir()
    alive = tmp_path / f".img-def.building-{os.getppid()}-0c0c"
    alive.mkdir()
    keep = [tmp_path / "img-abc", tmp_path / ".img-abc.lock", tmp_path / f"img.building-{DEAD}-0d0d"]
    for k in keep:
        k.mkdir()
    gone = cache.sweep(tmp_path)
    assert sorted(gone) == sorted([dead_dir, dead_file, legacy])
    assert sorted(tmp_path.iterdir()) == sorted([alive, *keep])
    assert cache.sweep(tmp_path / "missing") == []


# ------------------------------------------------------------ locked
def _hold(path: str, held, release) -> None:
    with cache.locked(Path(path)):
        held.set()
        release.wait(30)


def test_locked_shall_exclude_another_process_until_released(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "e"), held, release))
    p.start()
    try:
        assert held.wait(30)
        t = time.monotonic()
        release_at = t + 0.5

        def later() -> None:
            time.sleep(max(0.0, release_at - time.monotonic()))
            release.set()

        threading.Thread(target=later, daemon=True).start()
        with cache.locked(tmp_path / "e"):
            assert time.monotonic() >= release_at - 0.05  # waited for the other holder
    finally:
        release.set()
        p.join(30)


# ------------------------------------------------------------ concurrency, for real
def _racer(final: str, log: str, barrier, out) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for every racer to arrive at the lock
        tmp.mkdir()
        (tmp / "payload").write_text(str(os.getpid()))

    barrier.wait(30)
    out.put(str(cache.put(Path(final), build)))


def test_put_from_racing_processes_shall_build_once_and_give_everyone_the_same_path(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, out = ctx.Barrier(n), ctx.Queue()
    final, log = tmp_path / "images" / "entry-1", tmp_path / "builds.log"
    procs = [ctx.Process(target=_racer, args=(str(final), str(log), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == [str(final)] * n
    builders = log.read_text().split()
    assert len(builders) == 1
    assert (final / "payload").read_text() == builders[0]
    assert sorted(p.name for p in final.parent.iterdir()) == [".entry-1.lock", "entry-1"]


def _stuck(final: str, started) -> None:
    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("half")
        started.set()
        time.sleep(600)

    cache.put(Path(final), build)


def test_a_killed_builder_shall_leave_a_leftover_that_is_swept_and_no_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    final = tmp_path / "entry"
    p = ctx.Process(target=_stuck, args=(str(final), started))
    p.start()
    assert started.wait(30)
    left = [q for q in tmp_path.iterdir() if cache.builder_pid(q.name) == p.pid]
    assert len(left) == 1 and (left[0] / "half").exists()
    assert cache.sweep(tmp_path) == []  # still building: untouched
    os.kill(p.pid, signal.SIGKILL)  # no finally runs: the leftover stays
    p.join(30)
    assert left[0].exists()
    assert cache.sweep(tmp_path) == left
    # the kernel dropped the dead builder's lock: the next put does not wait
    assert cache.put(final, _dir) == final
    assert sorted(q.name for q in tmp_path.iterdir()) == [".entry.lock", "entry"]
