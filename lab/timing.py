"""Deadlines, not sleeps: one point in time flows down and each phase takes a slice.

Modelled on tmt's `Deadline`/`Waiting`: a check returns a value or None ("not yet");
waiting that runs out raises a LabError saying what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
