"""Long-lived samplers: one `lab-sample`-style reader per machine (no process per
sample: spawning is slow under TCG), each line handed to the tracks with L0's
receipt time. What to read comes from the dom0 and guest platforms.

A sampler whose stream ends while the run still wants samples is a lab failure
(its SSH channel or its process died), never a stall of the system under test:
`ended_early` says so and lab/decide.py makes it ERROR."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.watchdog import BackendPoint, GuestPoint, Track

log = logging.getLogger("lab.sampling")


class Sampler(threading.Thread):
    """Runs one long-lived sampler command on a machine and hands each parsed line
    to `on_sample(t, values)`, with t on L0's clock (seconds since t0)."""

    def __init__(
        self,
        name: str,
        stream: Callable[[], Iterable[str]],
        on_sample: Callable[[float, list[str | None]], None],
        t0: float,
        raw: Path | None = None,
    ) -> None:
        super().__init__(name=f"sampler-{name}", daemon=True)
        self.machine = name
        self.raw = raw  # every line as received, with L0's time: the series' provenance
        self.stream = stream
        self.on_sample = on_sample
        self.t0 = t0
        self.error: str | None = None
        self.lines = 0
        self.last_t: float | None = None  # when the last line arrived (workload clock)
        self.ended_early = False  # the stream ended before stop() was asked
        # not `_stop`: that name is threading.Thread's own method (join, is_alive)
        self._stop_event = threading.Event()

    def run(self) -> None:
        rawf = open(self.raw, "a") if self.raw else None  # noqa: SIM115  (closed in finally)
        try:
            for line in self.stream():
                if self._stop_event.is_set():
                    break
                if rawf:
                    rawf.write(json.dumps({"t": round(time.monotonic() - self.t0, 3), "line": line}) + "\n")
                    rawf.flush()
                try:
                    values = json.loads(line)["v"]
                except (ValueError, KeyError, TypeError):
                    continue
                self.lines += 1
                self.last_t = time.monotonic() - self.t0
                self.on_sample(self.last_t, values)
            if not self._stop_event.is_set():
                self.error = "its stream ended (the sampler process or its channel died)"
        except Exception as e:  # the decision sees it: a dead sampler is the lab's failure
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if not self._stop_event.is_set() and self.error:
                self.ended_early = True
                log.warning("sampler %s ended: %s", self.machine, self.error)
            if rawf:
                rawf.close()

    def stop(self) -> None:
        self._stop_event.set()


@dataclass(frozen=True)
class SamplerState:
    """What the decision needs to know about one sampler (lab/decide.py)."""

    name: str
    lines: int
    last_t: float | None
    error: str | None
    ended_early: bool

    def as_dict(self) -> dict:
        return {"lines": self.lines, "error": self.error, "ended_early": self.ended_early}


def state(s: Sampler) -> SamplerState:
    return SamplerState(s.machine, s.lines, s.last_t, s.error, s.ended_early)


# the backend's counters that only grow within one connection (Linux blkback's
# statistics and their sum); in-flight gauges are not among them
CUMULATIVE = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "taken")


def rebase(prev: dict[str, int] | None, base: dict[str, int], st: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """One series across connections: blkback's statistics start from 0 with each
    connect (after a save-restore the disk is a new backend device). When the
    total taken falls below the previous raw sample, what the old connection
    counted becomes the base added to every later sample. Returns (new base,
    the sample on the continued series); `prev` is the previous raw sample."""
    if prev is not None and st.get("taken", 0) < prev.get("taken", 0):
        base = {k: base.get(k, 0) + prev[k] for k in CUMULATIVE if k in prev}
    if not base:
        return base, st
    return base, {k: v + base.get(k, 0) if k in CUMULATIVE else v for k, v in st.items()}


def on_backend(tracks: Sequence[Track], parse: Callable[[list[str | None], int], list[dict[str, int] | None]],
               lock: threading.Lock) -> Callable[[float, list[str | None]], None]:
    """dom0's line: the platform's parser splits it into one stats dict per track,
    each continued across reconnects (`rebase`)."""
    prev: dict[str, dict[str, int]] = {}
    bases: dict[str, dict[str, int]] = {}

    def on(t: float, values: list[str | None]) -> None:
        for tr, st in zip(tracks, parse(values, len(tracks)), strict=True):
            if st is not None:
                bases[tr.key], point = rebase(prev.get(tr.key), bases.get(tr.key, {}), st)
                prev[tr.key] = st
                with lock:
                    tr.backend_pts.append(BackendPoint(t, point))

    return on


def on_guest(tracks: Sequence[Track], parse: Callable[[str | None], dict[str, int] | None],
             lock: threading.Lock) -> Callable[[float, list[str | None]], None]:
    """A guest's line: one value per track of that guest, in order."""

    def on(t: float, values: list[str | None]) -> None:
        for tr, v in zip(tracks, values, strict=False):
            st = parse(v)
            if st is not None:
                with lock:
                    tr.guest_pts.append(GuestPoint(t, st["completed"], st["inflight"], st["flushes"], st))

    return on
