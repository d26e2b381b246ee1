"""One result type for every command on every level, and the local runner.

Every command is an argument list (quoting happens once, in the transport), runs
under a deadline, and is written to the run's commands.log with rc and duration so
a failed run can be replayed by hand."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lab.errors import LabError


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int  # -1 when the deadline killed the command
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False
    transport_error: str = ""  # the lab lost the connection the command ran over (ssh)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def check(self, stage: str) -> Result:
        if not self.ok:
            why = ("lost its connection: " + self.transport_error if self.transport_error
                   else "timed out" if self.timed_out else f"exited {self.rc}")
            err = (self.stderr or self.stdout).strip()[-1500:]
            raise LabError(stage, f"`{shlex.join(self.argv)}` {why}: {err}")
        return self


class CommandLog:
    """Append-only JSON-lines log of every command the lab ran, on every machine."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, machine: str, result: Result) -> None:
        if self.path is None:
            return
        line = {
            "t": round(time.time(), 3),
            "machine": machine,
            "argv": list(result.argv),
            "rc": result.rc,
            "elapsed": round(result.elapsed, 3),
            "timed_out": result.timed_out,
        }
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class Runner(Protocol):
    name: str

    def run(
        self, argv: list[str], *, timeout: float, input: str | None = None
    ) -> Result: ...


class LocalRunner:
    """Runs on L0. Each command gets its own process group so a deadline kills the
    whole tree, not just the direct child."""

    def __init__(self, log: CommandLog | None = None, name: str = "l0") -> None:
        self.name = name
        self.log = log or CommandLog(None)
        self.logger = logging.getLogger(f"lab.{name}")

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        input: str | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Result:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            start_new_session=True,  # a deadline kills the whole tree
            preexec_fn=die_with_parent(),  # and so does the lab's death (SIGKILL included)
        )
        timed_out = False
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            out, err = proc.communicate()
        except BaseException:
            kill_group(proc.pid)
            proc.wait()
            raise
        result = Result(
            tuple(argv), -1 if timed_out else proc.returncode, out, err,
            time.monotonic() - start, timed_out,
        )
        self.log.write(self.name, result)
        self.logger.debug("%s rc=%s %.2fs", shlex.join(argv), result.rc, result.elapsed)
        return result


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group we started (never anything found by name)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


# ------------------------------------------------------------ children die with the lab
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # unsigned long arguments, as the kernel reads them (a bare int would leave the upper half unset)
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `sig` when the lab dies, SIGKILL
    included (PR_SET_PDEATHSIG). The lab starts QEMU and its tools in their own
    session (so a deadline can kill the group), which also means nothing else
    would end them when `lab` is killed. None where prctl does not exist.

    subprocess warns that preexec_fn is unsafe with threads: the child is a fork
    of a threaded process and could deadlock on a lock another thread held at the
    fork. This function takes none: a ctypes call resolved before the fork, and
    os.getppid/os.kill (no import, no logging, no I/O). The kernel ties the death
    signal to the *thread* that forked: the lab starts its children from the
    thread that waits for them (LocalRunner.run) or from the main thread (QEMU)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def child() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the lab died before prctl: no signal would come
            os.kill(os.getpid(), sig)

    return child


def set_parent_death_signal(sig: int) -> bool:
    """This process gets `sig` when its parent dies (a `lab bisect` step: when
    `git bisect run` is killed, the step unwinds and its QEMU goes with it)."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _handlers(handler: Callable[[int, object], None] | int) -> Iterator[None]:
    """HELD's handlers replaced by `handler` for the block, restored after it.
    Main thread only (elsewhere Python never runs signal handlers): a no-op there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in HELD}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a child is started and its owner
    recorded; a signal that came meanwhile is raised again at the end of the block
    (with the handlers it would have met), where the caller's `except` owns the
    child. A signal mask would do the same for this thread, but a signal can
    still be taken by another thread and its Python handler still runs in the
    main thread; and a blocked mask is inherited by the child across exec."""
    got: list[int] = []

    def hold(signum: int, frame: object) -> None:
        got.append(signum)

    with _handlers(hold):
        yield
    if got:
        signal.raise_signal(got[0])  # Python runs the restored handler before this returns


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP for the block: a second Ctrl-C must not
    cut a teardown short and leak QEMU, overlays or a repository mid-bisect."""
    with _handlers(signal.SIG_IGN):
        yield


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            out.append(int(d.name))
    return out


def end_group(proc: subprocess.Popen, *, grace: float = 60) -> list[int]:
    """End the process group led by `proc` (started with start_new_session):
    SIGTERM, so a lab step inside unwinds and tears its QEMU down; after `grace`
    seconds SIGKILL. Waits for `proc` and for every member of the group; returns
    the pids still alive after all that (none, unless the kernel could not kill)."""
    pgid = proc.pid
    kill_group(pgid, signal.SIGTERM)
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGKILL:
            kill_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            if proc.poll() is not None and not group_members(pgid):
                return []
    proc.poll()
    return group_members(pgid)
