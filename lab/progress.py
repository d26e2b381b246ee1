"""What a person watching a run sees: on a terminal one status line, redrawn (the
phase, then during the workload each disk's rate, in flight against the ring and
how long it has gone without progress); anywhere else (CI logs, pipes) one plain
line per phase and nothing redrawn."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from lab.watchdog import Track, last_change


class Progress:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._width = 0
        self._last_status = 0.0

    def phase(self, name: str) -> None:
        """A phase begins: its own line, off a terminal too."""
        with self._lock:
            self._clear()
            self.stream.write(f"[{time.monotonic() - self.t0:5.0f}s] {name}\n")
            self.stream.flush()

    def status(self, text: str) -> None:
        """The redrawn line (terminals only, at most twice a second)."""
        if not self.tty:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last_status < 0.5:
                return
            self._last_status = now
            line = text[:200]
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
            self.stream.flush()

    def done(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


def workload_line(tracks: Sequence[Track], now: float, stall_window: float, active_faults: Sequence[str]) -> str:
    """`t=23s lin1/xvdb 2277 IOPS in-flight 32/32 no-progress 4s/15s [stall active]`"""
    parts = [f"t={now:.0f}s"]
    for tr in tracks:
        g = tr.guest_pts
        recent = [p for p in g if p.t >= now - 3.0]
        rate = 0.0
        if len(recent) >= 2 and recent[-1].t > recent[0].t:
            rate = (recent[-1].completed - recent[0].completed) / (recent[-1].t - recent[0].t)
        inflight = g[-1].inflight if g else 0
        stuck = now - last_change((p.t, p.completed) for p in g) if g else 0.0
        parts.append(f"{tr.key} {rate:.0f} IOPS in-flight {inflight}/{tr.ring_capacity} "
                     f"no-progress {stuck:.0f}s/{stall_window:.0f}s")
    if active_faults:
        parts.append("[" + ", ".join(f"{k} active" for k in active_faults) + "]")
    return " ".join(parts)
