"""lab/watchdog.py: the hang decision, replayed on the counters of two real runs
(a PASS and the dm-suspend negative control, which HANGs) and on synthetic series.
architecture.md: progress is the guest's completed count advancing at least once
per stall window while I/O is in flight; slow is not hung."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from labdata import csv_rows, track_from_rows

from lab.sampling import Sampler
from lab.watchdog import (
    BackendPoint,
    GuestPoint,
    Hang,
    Track,
    _first_side,
    check_drain,
    check_hang,
    last_change,
    longest_gap,
    peak,
)

STALL = 15.0
INTERVAL = 1.0


def replay(rows: list[dict[str, str]], *, stall_window: float = STALL, tail: float = 25.0) -> list[Hang]:
    """Feed the samples one by one and decide as the run does: at every sample's
    time, and at every tick of the watchdog loop (each INTERVAL, as in run.py)
    until `tail` seconds past the last sample. Returns every Hang found, in order.

    The ticks matter: the HANG capture ends 14.6 s after the last progress (the
    real run decided at a tick, 27.02 s, before the next sample arrived), so a
    replay at sample times alone could never reach the 15 s window."""
    track = track_from_rows(rows)
    pts = sorted(
        [(p.t, "g", p) for p in track.guest_pts] + [(p.t, "b", p) for p in track.backend_pts],
        key=lambda x: x[0],
    )
    end = pts[-1][0] + tail
    ticks = [k * INTERVAL for k in range(1, int(end / INTERVAL) + 1)]
    events = sorted({t for t, _, _ in pts} | set(ticks))
    live = Track(track.guest, track.vdev, track.vbd, track.ring_capacity)
    hangs = []
    i = 0
    for now in events:
        while i < len(pts) and pts[i][0] <= now:
            _, side, p = pts[i]
            (live.guest_pts if side == "g" else live.backend_pts).append(p)
            i += 1
        h = check_hang(live, now=now, stall_window=stall_window)
        if h:
            hangs.append(h)
    return hangs


def _last_guest_progress(rows: list[dict[str, str]]) -> float:
    """The time of the last guest sample whose completed count differs from the
    guest sample before it (read off the CSV, independently of the code)."""
    guest = [(float(r["t"]), int(r["completed"])) for r in rows if r["source"] == "guest"]
    return max(t for (t, c), (_, c0) in zip(guest[1:], guest[:-1], strict=True) if c != c0)


# ------------------------------------------------------------ real series
def test_the_pass_series_shall_never_hang() -> None:
    rows = csv_rows("counters-default-pass.csv")
    assert replay(rows) == []
    assert replay(rows, stall_window=5.0) == [], "healthy TCG run: no gap near even a third of the window"


def test_the_hang_series_shall_hang_within_window_plus_interval_plus_slack() -> None:
    rows = csv_rows("counters-dm-suspend-hang.csv")
    last_progress = _last_guest_progress(rows)
    assert last_progress == 11.721  # 4419 -> 4719 completed; 32 in flight from then on
    hangs = replay(rows)
    assert hangs, "the suspended dm device shall be a HANG"
    h = hangs[0]
    assert h.disk == "lin1/xvdb"
    assert h.last_progress_t == pytest.approx(last_progress)
    assert STALL <= h.detected_t - last_progress <= STALL + INTERVAL + 2
    assert h.inflight == 32 > 0 and h.completed == 4719
    assert "stuck at 4719" in h.cause
    # blkback took its last request at 11.572 (taken 4310 -> 4751), 0.15 s before
    # the guest's last completion: within one sampling step, so both stopped
    assert h.side_stopped_first == "both"
    assert (h.backend_taken, h.backing_inflight) == (4751, 0)
    d = h.as_dict()
    assert d["detected_after_s"] == pytest.approx(h.detected_t - last_progress, abs=0.01)
    assert d["guest_inflight"] == 32


def test_the_hang_series_shall_not_hang_before_the_window_has_passed() -> None:
    rows = csv_rows("counters-dm-suspend-hang.csv")
    last_progress = _last_guest_progress(rows)
    for h in replay(rows):
        assert h.detected_t - last_progress >= STALL
    # every sample in the capture came less than a window after the last progress
    assert all(float(r["t"]) - last_progress < STALL for r in rows)


def test_real_series_drain_shall_match_their_verdicts() -> None:
    ok = check_drain(track_from_rows(csv_rows("counters-default-pass.csv")), since=34.0)
    assert ok.drained and ok.totals_match
    assert (ok.guest_completed, ok.backend_taken, ok.guest_inflight, ok.backing_inflight) == (36914, 36914, 0, 0)
    stuck = check_drain(track_from_rows(csv_rows("counters-dm-suspend-hang.csv")), since=20.0)
    assert not stuck.drained and stuck.guest_inflight == 32 and not stuck.totals_match


# ------------------------------------------------------------ synthetic series
def _track(guest: list[tuple[float, int, int]] = (), backend: list[tuple[float, int, int]] = ()) -> Track:  # type: ignore[assignment]
    tr = Track("g1", "xvdb", "vbd-1-51728", 32)
    tr.guest_pts += [GuestPoint(t, c, i) for t, c, i in guest]
    tr.backend_pts += [BackendPoint(t, {"taken": tk, "backing_inflight": bi}) for t, tk, bi in backend]
    return tr


def _replay_synthetic(tr: Track, until: float, step: float = 0.5) -> list[Hang]:
    full_g, full_b = list(tr.guest_pts), list(tr.backend_pts)
    live = Track(tr.guest, tr.vdev, tr.vbd, tr.ring_capacity)
    out = []
    for k in range(1, int(until / step) + 1):
        now = k * step
        live.guest_pts = [p for p in full_g if p.t <= now]
        live.backend_pts = [p for p in full_b if p.t <= now]
        h = check_hang(live, now=now, stall_window=STALL)
        if h:
            out.append(h)
    return out


def test_slow_but_steady_progress_shall_never_hang() -> None:
    """One completion every 5 s, always 32 in flight: slow, not hung."""
    guest = [(float(t), t // 5, 32) for t in range(0, 121)]
    backend = [(t + 0.1, c, 32) for t, c, _ in guest]
    assert _replay_synthetic(_track(guest, backend), until=120) == []


def test_progress_just_inside_the_window_shall_never_hang() -> None:
    guest = [(float(t), t // 14, 8) for t in range(0, 100)]
    assert _replay_synthetic(_track(guest), until=99) == []


def test_no_progress_with_nothing_in_flight_shall_never_hang() -> None:
    guest = [(float(t), 54, 0) for t in range(0, 120)]
    backend = [(t + 0.1, 54, 0) for t, _, _ in guest]
    assert _replay_synthetic(_track(guest, backend), until=130) == []


def test_stuck_with_io_in_flight_shall_hang_once_the_window_has_passed() -> None:
    guest = [(float(t), min(t, 10) * 100, 32) for t in range(0, 60)]
    tr = _track(guest)
    assert check_hang(tr, now=24.9, stall_window=STALL) is None
    h = check_hang(tr, now=25.0, stall_window=STALL)
    assert h is not None and h.last_progress_t == 10.0 and h.detected_t == 25.0 and h.inflight == 32


def test_io_starting_after_a_long_idle_shall_get_a_whole_window() -> None:
    """Idle (nothing in flight) for longer than the window, then I/O is submitted:
    the window counts from when it was in flight, not from the idle start."""
    guest = [(float(t), 54, 0) for t in range(0, 30)] + [(float(t), 54, 4) for t in range(30, 60)]
    tr = _track(guest)
    assert check_hang(tr, now=30.0, stall_window=STALL) is None
    assert check_hang(tr, now=44.0, stall_window=STALL) is None
    h = check_hang(tr, now=45.0, stall_window=STALL)
    assert h is not None and h.inflight == 4


def test_guest_unreachable_and_backend_frozen_with_io_shall_hang_as_unreachable() -> None:
    """The guest stops answering at t=20 (its last completion at t=10); blkback took
    nothing since t=10 with requests in flight on the backing device."""
    guest = [(float(t), min(t, 10) * 50, 32) for t in range(0, 21)]
    backend = [(t + 0.2, min(t, 10) * 50 + 32, 7) for t in range(0, 60)]
    tr = _track(guest, backend)
    assert check_hang(tr, now=24.0, stall_window=STALL) is None
    h = check_hang(tr, now=36.0, stall_window=STALL)
    assert h is not None
    assert "unreachable" in h.cause and "vbd-1-51728" in h.cause
    assert h.backing_inflight == 7 and h.backend_taken == 532
    assert h.completed == 500 and h.last_progress_t == pytest.approx(10.2)


def test_guest_unreachable_with_backend_still_moving_or_idle_shall_not_hang() -> None:
    guest = [(float(t), t * 10, 3) for t in range(0, 10)]
    moving = [(t + 0.2, t * 10, 3) for t in range(0, 60)]
    idle = [(t + 0.2, 90, 0) for t in range(0, 60)]
    assert check_hang(_track(guest, moving), now=50.0, stall_window=STALL) is None
    assert check_hang(_track(guest, idle), now=50.0, stall_window=STALL) is None


def test_both_sides_silent_shall_not_be_judged_by_the_counters() -> None:
    """No sample from anyone within the window: L1 itself is gone; the run's
    crash and liveness checks decide that, not the counters."""
    guest = [(float(t), 100, 32) for t in range(0, 10)]
    backend = [(t + 0.2, 132, 5) for t in range(0, 10)]
    assert check_hang(_track(guest, backend), now=40.0, stall_window=STALL) is None


def test_an_empty_track_shall_not_hang() -> None:
    assert check_hang(_track(), now=100.0, stall_window=STALL) is None


# ------------------------------------------------------------ drain
@pytest.mark.parametrize(
    ("guest", "backend", "drained"),
    [
        ((100, 0), (100, 0), True),
        ((100, 1), (100, 0), False),
        ((100, 0), (100, 2), False),
        ((100, 0), (99, 0), False),  # totals differ: a request lost between the sides
        ((100, 3), (100, 3), False),
    ],
)
def test_check_drain_shall_need_zero_in_flight_on_both_sides_and_equal_totals(
    guest: tuple[int, int], backend: tuple[int, int], drained: bool
) -> None:
    tr = _track([(1.0, 50, 9), (5.0, *guest)], [(1.1, 50, 9), (5.1, *backend)])
    d = check_drain(tr, since=4.0)
    assert d.drained is drained
    assert (d.guest_completed, d.guest_inflight, d.backend_taken, d.backing_inflight) == (*guest, *backend)
    assert d.totals_match is (guest[0] == backend[0])
    assert d.as_dict()["drained"] is drained


def test_check_drain_shall_only_use_samples_after_since() -> None:
    tr = _track([(1.0, 100, 0)], [(1.0, 100, 0)])
    d = check_drain(tr, since=2.0)
    assert not d.drained and d.guest_completed is None and not d.totals_match
    tr.guest_pts.append(GuestPoint(3.0, 100, 0))
    assert not check_drain(tr, since=2.0).drained, "a backend sample after `since` is needed too"
    tr.backend_pts.append(BackendPoint(3.1, {"taken": 100, "backing_inflight": 0}))
    assert check_drain(tr, since=2.0).drained


# ------------------------------------------------------------ helpers
@pytest.mark.parametrize(
    ("values", "start", "expected"),
    [
        ([], 0.0, 0.0),
        ([(1.0, 5)], 0.0, 0.0),
        ([(1.0, 5), (2.0, 5), (3.0, 5)], 0.5, 0.5),
        ([(1.0, 5), (2.0, 6), (3.0, 6)], 0.0, 2.0),
        ([(1.0, 5), (2.0, 6), (3.0, 7), (4.0, 7), (5.0, 7)], 0.0, 3.0),
        ([(1.0, 5), (2.0, 6), (3.0, 5)], 0.0, 3.0),  # any change counts, even backwards
    ],
)
def test_last_change_shall_be_the_time_of_the_last_new_value(values: list, start: float, expected: float) -> None:
    assert last_change(values, start) == expected


def test_longest_gap_shall_be_the_longest_wait_between_two_advances() -> None:
    tr = _track([(0.0, 0, 4), (1.0, 10, 4), (2.0, 10, 4), (6.5, 20, 4), (7.0, 30, 4), (8.0, 30, 4)])
    assert longest_gap(tr) == 5.5
    assert longest_gap(_track()) == 0.0
    assert longest_gap(_track([(0.0, 1, 1)])) == 0.0


def test_longest_gap_shall_ignore_the_start_up_before_the_first_advance() -> None:
    """Nothing completes from 0 to 21 s (fio starting), then one advance a second."""
    tr = _track([(float(t), 54, 0) for t in range(0, 21)] + [(float(t), 54 + t * 10, 5) for t in range(21, 30)])
    assert longest_gap(tr) == pytest.approx(1.0)


def test_longest_gap_of_the_pass_series_shall_stay_far_below_the_window() -> None:
    """The real healthy run under TCG: computed here from the CSV's guest rows, the
    longest spacing of two advances after the first (fio's ~3 s start-up, 1.425 ->
    4.549, excluded); the stall window (15 s) is more than 3x that (architecture.md)."""
    rows = csv_rows("counters-default-pass.csv")
    guest = [(float(r["t"]), int(r["completed"])) for r in rows if r["source"] == "guest"]
    advances = [t for (t, c), (_, c0) in zip(guest[1:], guest[:-1], strict=True) if c != c0]
    assert advances[0] == 4.549
    expected = max(b - a for a, b in zip(advances, advances[1:], strict=False))
    gap = longest_gap(track_from_rows(rows))
    assert gap == round(expected, 2) == 1.2  # 20.582 -> 21.785
    assert STALL >= 3 * gap


@pytest.mark.parametrize(
    ("t_guest", "t_back", "window", "side"),
    [
        (10.0, 10.5, 15.0, "both"),
        (10.5, 10.0, 15.0, "both"),
        (10.0, 11.9, 15.0, "both"),
        (10.0, 12.5, 15.0, "guest"),  # the guest's count stopped first
        (12.5, 10.0, 15.0, "backend"),
        (10.0, 11.2, 4.0, "guest"),  # a short window narrows "together" to window/4
    ],
)
def test_first_side_shall_name_who_stopped_first(t_guest: float, t_back: float, window: float, side: str) -> None:
    assert _first_side(t_guest, t_back, window) == side


def test_peak_shall_be_the_maximum_or_zero() -> None:
    assert peak([3, 32, 7]) == 32
    assert peak([]) == 0


def test_track_key_shall_be_guest_slash_vdev() -> None:
    assert _track().key == "g1/xvdb"


# ------------------------------------------------------------ sampler
def test_sampler_shall_hand_on_each_json_line_and_keep_raw_lines(tmp_path: Path) -> None:
    lines = ['{"up":1.0,"v":["1 ","2 "]}', "not json", '{"up":2.0}', '{"up":3.0,"v":[null,"5"]}']

    def stream() -> Iterator[str]:
        yield from lines

    got: list[list[str | None]] = []
    raw = tmp_path / "samples-x.jsonl"
    s = Sampler("x", stream, lambda t, v: got.append(v), t0=0.0, raw=raw)
    s.start()
    s.join(5)
    assert not s.is_alive()
    assert got == [["1 ", "2 "], [None, "5"]]
    # a stream that ends while the run still wants samples is the lab's failure
    assert s.lines == 2 and s.ended_early and "stream ended" in (s.error or "")
    written = [json.loads(x) for x in raw.read_text().splitlines()]
    assert [w["line"] for w in written] == lines, "every line as received, the bad ones too"
    assert all(isinstance(w["t"], float) for w in written)


def test_sampler_shall_keep_the_reason_its_stream_ended() -> None:
    def stream() -> Iterator[str]:
        yield '{"v":["1"]}'
        raise EOFError("transport closed")

    s = Sampler("y", stream, lambda t, v: None, t0=0.0)
    s.start()
    s.join(5)
    assert s.lines == 1 and s.error == "EOFError: transport closed"


def test_sampler_stop_shall_end_the_thread() -> None:
    release = threading.Event()

    def stream() -> Iterator[str]:
        while True:
            release.wait(5)
            yield '{"v":["1"]}'

    s = Sampler("z", stream, lambda t, v: None, t0=0.0)
    s.start()
    s.stop()
    release.set()
    s.join(5)
    assert not s.is_alive()


def test_drain_with_flushes_shall_compare_what_requests_carry() -> None:
    """Figures from a real flush-storm run (fio randwrite 4k, fsync=1): the guest
    counted 28,288 writes (each fsync's empty PREFLUSH bio is one) and 8,740 flushes;
    blkback took 14,122 wr_req and 8,740 f_req; 112,976 sectors written on both sides."""
    from lab.watchdog import BackendPoint, GuestPoint, Track, check_drain

    def drain(**backend: int) -> tuple[bool, list[str]]:
        tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
        stat = {"reads": 54, "writes": 28288, "discards": 0, "flushes": 8740, "sectors_read": 2112,
                "sectors_written": 112976}
        tr.guest_pts.append(GuestPoint(40.0, 54 + 28288 + 8740, 0, 8740, stat))
        b = {"rd_req": 54, "wr_req": 14122, "f_req": 8740, "ds_req": 0, "rd_sect": 2112, "wr_sect": 112976,
             "backing_inflight": 0}
        b.update(backend)
        b["taken"] = b["rd_req"] + b["wr_req"] + b["f_req"] + b["ds_req"]
        tr.backend_pts.append(BackendPoint(40.0, b))
        d = check_drain(tr, 39.0)
        return d.drained, list(d.mismatches)

    assert drain() == (True, [])
    ok, why = drain(wr_req=14121, wr_sect=112968)  # one 4 KiB write the backend never took
    assert not ok and any("sectors written" in w for w in why)
    ok, why = drain(f_req=8739)  # a flush lost
    assert not ok and any("flushes" in w for w in why)


def test_drain_without_flushes_shall_need_equal_totals() -> None:
    from lab.watchdog import BackendPoint, GuestPoint, Track, check_drain

    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    stat = {"reads": 10, "writes": 5, "discards": 0, "flushes": 0, "sectors_read": 80, "sectors_written": 40}
    tr.guest_pts.append(GuestPoint(1.0, 15, 0, 0, stat))
    tr.backend_pts.append(BackendPoint(1.0, {"taken": 14, "wr_req": 5, "backing_inflight": 0}))
    d = check_drain(tr, 0.5)
    assert not d.drained and d.mismatches == ("guest completed 15 != backend took 14",)


def test_first_io_shall_be_the_first_sample_of_either_end_above_the_attach_probe() -> None:
    """A real default run (tests/data/counters-default-pass.csv): the guest's
    first sample already counts the 54 reads of the kernel's partition probe at
    attach; fio's first I/O is the first sample above that, of the guest or of
    blkback (requests taken), whichever came first."""
    from lab.observe import first_io

    tr = track_from_rows(csv_rows("counters-default-pass.csv"))
    first = next(p for p in tr.guest_pts if p.completed > tr.guest_pts[0].completed)
    first_be = next(p for p in tr.backend_pts if p.taken > tr.backend_pts[0].taken)
    assert tr.guest_pts[0].completed == 54 and first_io([tr]) == min(first.t, first_be.t)
    guest_only = Track(tr.guest, tr.vdev, tr.vbd, tr.ring_capacity, guest_pts=tr.guest_pts)
    assert first_io([guest_only]) == first.t > tr.guest_pts[0].t
    backend_only = Track(tr.guest, tr.vdev, tr.vbd, tr.ring_capacity, backend_pts=tr.backend_pts)
    assert first_io([backend_only]) == first_be.t > tr.backend_pts[0].t
    idle = Track("lin1", "xvdc", "vbd-1-51744", ring_capacity=32)
    idle.guest_pts += [GuestPoint(1.0, 54, 0), GuestPoint(2.0, 54, 0)]
    assert first_io([idle]) is None and first_io([]) is None
    assert first_io([idle, tr]) == min(first.t, first_be.t)  # the earliest disk that moved
