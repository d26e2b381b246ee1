"""One result type for every command on every level, and the local runner.

Every command is an argument list (quoting happens once, in the transport), runs
under a deadline, and is written to the run's commands.log with rc and duration so
a failed run can be replayed by hand."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
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
            start_new_session=True,
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
