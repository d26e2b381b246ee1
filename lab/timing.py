"""Deadlines, not sleeps: one point in time flows down and each phase takes a slice.

Modelled on tmt's `Deadline`/`Waiting`: a check returns a value or None ("not yet");
waiting that runs out raises a LabError saying what it waited for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lab.errors import LabError

T = TypeVar("T")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    @classmethod
    def at_time(cls, at: float) -> Deadline:
        d = cls(0)
        d.at = at
        d.seconds = max(0.0, at - time.monotonic())
        return d

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def slice(self, seconds: float) -> Deadline:
        """A sub-deadline: `seconds` from now, but never past this one."""
        return Deadline.at_time(min(self.at, time.monotonic() + seconds))

    def __repr__(self) -> str:
        return f"Deadline({self.remaining():.1f}s left)"


def wait_until(
    check: Callable[[], T | None],
    deadline: Deadline,
    *,
    stage: str,
    what: str,
    interval: float = 0.25,
    tail: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something other than None/False.

    Raises LabError(stage) naming `what` when the deadline passes; `tail` supplies
    the console lines to quote in that error."""
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if deadline.expired():
            raise LabError(
                stage,
                f"timed out after {deadline.seconds:.0f}s waiting for {what}",
                tail=tail() if tail else "",
            )
        time.sleep(min(interval, max(0.01, deadline.remaining())))


def sh_poll(until: str, seconds: float, on_timeout: str) -> str:
    """sh: run `until` (a command list) every 0.1 s until it succeeds, at most
    `seconds`; then `on_timeout`, which must end the loop (`break`, `exit N`).
    A wait inside one remote command: a poll there is a process (a few ms),
    where a round trip per poll costs 0.3-0.6 s under TCG."""
    tries = max(1, int(seconds / 0.1))
    return f"n=0; until {until}; do n=$((n+1)); [ $n -ge {tries} ] && {{ {on_timeout}; }}; sleep 0.1; done"


class Background:
    """One step run in a thread beside the main one (its commands have
    their own deadlines). Its exception, of whatever kind, is raised again by
    result() in the main thread, so the verdict's rules see it as if the step
    had run in line; result() itself waits no longer than the run's deadline."""

    def __init__(self, stage: str, fn: Callable[[], Any], *, beside: str = "the guests") -> None:
        self.stage = stage
        self.beside = beside
        self.elapsed = 0.0
        self._value: Any = None
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"lab-{stage}", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the main thread by result()
            self._error = e
        finally:
            self.elapsed = round(time.monotonic() - self._t0, 2)

    def result(self, deadline: Deadline) -> Any:
        self._thread.join(timeout=max(0.0, deadline.remaining()))
        if self._thread.is_alive():
            raise LabError(self.stage, f"the {self.stage} step (run beside {self.beside}) did not finish "
                           f"within the run's deadline ({deadline.seconds:.0f}s)")
        if self._error is not None:
            raise self._error
        return self._value

    def abandon(self, seconds: float = 30.0) -> None:
        """The main thread failed: wait a little for the step (its commands end
        with L1), never let its error hide the main thread's."""
        self._thread.join(timeout=seconds)
