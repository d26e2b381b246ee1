"""The hang and drain rules (architecture.md), as pure functions over sampled
counters.

Progress is the guest's completed I/Os on its test disk advancing while I/O is in
flight there. blkback's statistics count requests *taken* off the ring, not
completed: they are a second signal (they freeze when the ring stalls) and tell
which side stopped first. Drain is both in-flight counts at 0 and the backend's
taken total equal to the guest's completed total. Slow is not hung: I/O that keeps
completing, however slowly, never trips the stall window. The samplers that feed
these rules are in lab/sampling.py; lab/decide.py turns them into a verdict."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GuestPoint:
    t: float  # seconds since the workload started, L0's clock at receipt
    completed: int  # reads + writes + discards + flushes completed
    inflight: int
    flushes: int = 0  # of `completed`, the flush requests
    stat: dict | None = None  # the whole parsed /sys/block/X/stat, for the drain's accounting


@dataclass(frozen=True)
class BackendPoint:
    t: float
    stats: dict[str, int]  # VBD_STATS + backing_inflight + taken

    @property
    def taken(self) -> int:
        return self.stats["taken"]

    @property
    def backing_inflight(self) -> int:
        return self.stats["backing_inflight"]


@dataclass
class Track:
    """Everything sampled about one guest test disk."""

    guest: str
    vdev: str
    vbd: str  # sysfs name, vbd-<domid>-<devid>
    ring_capacity: int
    guest_pts: list[GuestPoint] = field(default_factory=list)
    backend_pts: list[BackendPoint] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.guest}/{self.vdev}"


@dataclass(frozen=True)
class Hang:
    disk: str
    cause: str
    detected_t: float
    last_progress_t: float
    side_stopped_first: str  # "guest", "backend", "both" or "unknown"
    completed: int
    inflight: int
    backend_taken: int | None
    backing_inflight: int | None

    def as_dict(self) -> dict:
        return {
            "disk": self.disk, "cause": self.cause,
            "detected_at_s": round(self.detected_t, 2),
            "last_progress_at_s": round(self.last_progress_t, 2),
            "detected_after_s": round(self.detected_t - self.last_progress_t, 2),
            "side_stopped_first": self.side_stopped_first,
            "guest_completed": self.completed, "guest_inflight": self.inflight,
            "backend_taken": self.backend_taken, "backing_inflight": self.backing_inflight,
        }


def last_change(values: Iterable[tuple[float, int]], start: float = 0.0) -> float:
    """The time of the last sample whose value differs from the one before it
    (`start` if it never changed)."""
    t_last, prev = start, None
    for t, v in values:
        if prev is not None and v != prev:
            t_last = t
        prev = v
    return t_last


def check_hang(track: Track, now: float, stall_window: float, *, io_running: bool = False,
               since: float = 0.0) -> Hang | None:
    """HANG if the guest's completed count has not advanced for `stall_window`
    while it had I/O in flight. With `io_running` (the workload tool is still
    running and had completed I/O before), also when the guest's block layer shows
    nothing in flight: the tool's requests may be stuck above it (a real run
    where fio still had I/O outstanding with an in-flight count of 0 otherwise
    ran into the lab's deadline). If the guest's own view is lost (no guest
    sample within the window), the backend decides: taken frozen for the window
    with requests in flight on the backing device. Only samples from `since` on
    count (after a save-restore, the stall clock starts again at its end)."""
    g = [p for p in track.guest_pts if p.t >= since]
    b = [p for p in track.backend_pts if p.t >= since]
    t_guest = last_change(((p.t, p.completed) for p in g), since)
    # the stall clock runs while I/O is in flight: from the first sample since the
    # last progress that shows some (idle time before the I/O is not a stall)
    t_stall = next((p.t for p in g if p.t >= t_guest and p.inflight > 0), t_guest)
    t_back = last_change(((p.t, p.taken) for p in b), since)
    side = _first_side(t_guest, t_back, stall_window)
    if g and now - g[-1].t < stall_window:
        last = g[-1]
        if last.inflight > 0 and now - t_stall >= stall_window:
            return Hang(
                track.key,
                f"guest {track.guest} {track.vdev}: completed I/Os stuck at {last.completed} for "
                f"{now - t_stall:.0f}s with {last.inflight} in flight",
                now, t_guest, side, last.completed, last.inflight,
                b[-1].taken if b else None, b[-1].backing_inflight if b else None,
            )
        began = any(p.completed != g[0].completed for p in g)
        if io_running and began and now - t_guest >= stall_window:
            return Hang(
                track.key,
                f"guest {track.guest} {track.vdev}: completed I/Os stuck at {last.completed} for "
                f"{now - t_guest:.0f}s while the workload was still running ({last.inflight} in flight "
                "in the guest's block layer)",
                now, t_guest, side, last.completed, last.inflight,
                b[-1].taken if b else None, b[-1].backing_inflight if b else None,
            )
        return None
    # the guest stopped answering: judge from the backend alone
    if b and now - b[-1].t < stall_window and now - t_back >= stall_window and b[-1].backing_inflight > 0:
        return Hang(
            track.key,
            f"guest {track.guest} unreachable for {now - (g[-1].t if g else 0):.0f}s; backend "
            f"{track.vbd} took no request for {now - t_back:.0f}s with {b[-1].backing_inflight} "
            "in flight on its backing device",
            now, max(t_guest, t_back) if g else t_back, side,
            g[-1].completed if g else 0, g[-1].inflight if g else 0, b[-1].taken, b[-1].backing_inflight,
        )
    return None


def _first_side(t_guest: float, t_back: float, window: float) -> str:
    """Which side stopped first: the one whose counter last moved earlier. Within
    one sampling step of each other they stopped together."""
    if abs(t_guest - t_back) < min(2.0, window / 4):
        return "both"
    return "guest" if t_guest < t_back else "backend"


@dataclass(frozen=True)
class Drain:
    drained: bool
    guest_inflight: int | None
    backing_inflight: int | None
    guest_completed: int | None
    backend_taken: int | None
    mismatches: tuple[str, ...] = ()
    not_compared: str = ""  # why the accounting was not compared (mismatches then do not count)

    @property
    def totals_match(self) -> bool:
        return self.guest_completed is not None and self.backend_taken is not None and not self.mismatches

    def as_dict(self) -> dict:
        return {
            "drained": self.drained, "guest_inflight": self.guest_inflight,
            "backing_inflight": self.backing_inflight, "guest_completed": self.guest_completed,
            "backend_taken": self.backend_taken, "totals_match": self.totals_match,
            "mismatches": list(self.mismatches), **({"not_compared": self.not_compared} if self.not_compared else {}),
        }


def accounting_mismatches(g: GuestPoint, b: dict[str, int]) -> list[str]:
    """Did blkback take exactly what the guest completed? Without flushes the
    request totals are equal. With flushes they cannot be: the guest counts an
    fsync's empty PREFLUSH bio as a write (it never reaches the ring as one) and
    blkback counts a write carrying FUA as f_req (a flush-storm run: guest 28,288
    writes and 8,740 flushes; blkback 14,122 wr_req and 8,740 f_req, the sectors
    equal). So compare what each request carries: reads, sectors both ways,
    discards, and flushes at most f_req, writes at least wr_req."""
    st = g.stat
    if "reqs_received" in b:
        # FreeBSD's xbbd counts ring requests, not their kinds: only the totals
        # compare, and only without flushes (an empty PREFLUSH never reaches the ring)
        if g.flushes or g.completed == b["taken"]:
            return []
        return [f"guest completed {g.completed} != backend received {b['taken']}"]
    if st is None or g.flushes == 0 and st.get("writes") == b.get("wr_req"):
        return [] if g.completed == b["taken"] else [f"guest completed {g.completed} != backend took {b['taken']}"]
    checks = [
        ("reads", st["reads"], "rd_req", b.get("rd_req"), "=="),
        ("sectors read", st["sectors_read"], "rd_sect", b.get("rd_sect"), "=="),
        ("sectors written", st["sectors_written"], "wr_sect", b.get("wr_sect"), "=="),
        ("discards", st["discards"], "ds_req", b.get("ds_req"), "=="),
        ("flushes", st["flushes"], "f_req", b.get("f_req"), "<="),
        ("writes", st["writes"], "wr_req", b.get("wr_req"), ">="),
    ]
    out = []
    for name, gv, bname, bv, op in checks:
        ok = gv == bv if op == "==" else (gv <= bv if op == "<=" else gv >= bv) if bv is not None else False
        if not ok:
            out.append(f"guest {name} {gv} vs backend {bname} {bv} (expected {op})")
    return out


def check_drain(track: Track, since: float) -> Drain:
    """Drained: the latest samples taken after `since` show nothing in flight on
    either side and the backend's accounting matches the guest's
    (accounting_mismatches)."""
    g = [p for p in track.guest_pts if p.t >= since]
    b = [p for p in track.backend_pts if p.t >= since]
    if not g or not b:
        return Drain(False, None, None, None, None)
    lg, lb = g[-1], b[-1]
    mism = tuple(accounting_mismatches(lg, lb.stats))
    ok = lg.inflight == 0 and lb.backing_inflight == 0 and not mism
    return Drain(ok, lg.inflight, lb.backing_inflight, lg.completed, lb.taken, mism)


def peak(values: Iterable[int]) -> int:
    return max(values, default=0)


def longest_gap(track: Track) -> float:
    """The longest time between two advances of the guest's completed count once
    I/O had begun (what the stall window must stay well above). The workload's
    start-up, before the first advance, is not a completion gap."""
    gap, t_prev, prev = 0.0, None, None
    for p in track.guest_pts:
        if prev is None:
            prev = p.completed
            continue
        if p.completed != prev:
            if t_prev is not None:
                gap = max(gap, p.t - t_prev)
            t_prev, prev = p.t, p.completed
    return round(gap, 2)
