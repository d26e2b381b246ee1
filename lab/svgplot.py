"""Pure geometry for the report's inline SVG charts: counters to rates, data to
pixel paths, axis ticks. No I/O and no markup beyond path strings: the template
(lab/templates/report_macros.html.j2) draws what `layout` returns, and the unit
tests drive these functions with tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

Point = tuple[float, float]


def rates(points: Sequence[Point]) -> list[Point]:
    """Running totals -> per-second rates, each at the later sample's time. Samples
    whose time does not advance are skipped; a total that goes down (a counter
    reset, a new device) counts as 0, never as a negative rate."""
    out: list[Point] = []
    prev: Point | None = None
    for t, v in points:
        if prev is not None and t > prev[0]:
            out.append((t, max(0.0, (v - prev[1]) / (t - prev[0]))))
        if prev is None or t > prev[0]:
            prev = (t, v)
    return out


def nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v (1 for v <= 0): an axis maximum
    a person reads at a glance."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v * (1 - 1e-9):
            return float(m * exp)
    return float(10 * exp)  # pragma: no cover - the loop always returns


def ticks(vmax: float, n: int = 4) -> list[float]:
    """n + 1 evenly spaced ticks from 0 to vmax."""
    return [vmax * i / n for i in range(n + 1)]


def fmt(v: float) -> str:
    """A tick label: integers without a point, k/M suffixes for big numbers."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    if v == int(v):
        return str(int(v))
    return f"{v:.3g}"


@dataclass(frozen=True)
class Box:
    """The plotting area in pixels, inside the SVG's margins."""

    left: float
    top: float
    width: float
    height: float

    def x(self, t: float, x_max: float) -> float:
        return self.left + self.width * (min(max(t, 0.0), x_max) / x_max if x_max > 0 else 0.0)

    def y(self, v: float, y_max: float) -> float:
        return self.top + self.height * (1 - (min(max(v, 0.0), y_max) / y_max if y_max > 0 else 0.0))


def svg_path(points: Sequence[Point], box: Box, *, x_max: float, y_max: float) -> str:
    """An SVG path ("M x y L x y ...") through the points, clipped to the box, with
    one decimal (a tenth of a pixel is below what a screen shows)."""
    parts = []
    for i, (t, v) in enumerate(points):
        parts.append(f"{'M' if i == 0 else 'L'}{box.x(t, x_max):.1f} {box.y(v, y_max):.1f}")
    return " ".join(parts)


def step_path(points: Sequence[Point], box: Box, *, x_max: float, y_max: float) -> str:
    """A staircase through the points: a level (in flight) holds until the next sample."""
    stairs: list[Point] = []
    for i, (t, v) in enumerate(points):
        if i:
            stairs.append((t, points[i - 1][1]))
        stairs.append((t, v))
    return svg_path(stairs, box, x_max=x_max, y_max=y_max)


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]
    color: str
    step: bool = False  # a level sampled at points (in flight), drawn as stairs
    dashed: bool = False


@dataclass(frozen=True)
class Band:
    """A shaded time window: a fault in force."""

    start: float
    end: float | None  # None: still in force when the run ended
    label: str


@dataclass(frozen=True)
class Marker:
    """A vertical line at one moment: a HANG detected, the last progress."""

    t: float
    label: str
    color: str
    dashed: bool = False


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    series: tuple[Series, ...]
    bands: tuple[Band, ...] = ()
    markers: tuple[Marker, ...] = ()
    hlines: tuple[tuple[float, str], ...] = ()  # (value, label): the ring capacity
    x_max: float | None = None  # the run's time axis, shared by a disk's charts


@dataclass
class Layout:
    """What the template draws, in pixels."""

    width: int
    height: int
    box: Box
    title: str
    unit: str
    paths: list[dict] = field(default_factory=list)
    bands: list[dict] = field(default_factory=list)
    markers: list[dict] = field(default_factory=list)
    hlines: list[dict] = field(default_factory=list)
    xticks: list[dict] = field(default_factory=list)
    yticks: list[dict] = field(default_factory=list)
    empty: bool = False


def extent(chart: Chart) -> tuple[float, float]:
    """The axes' maxima: time up to the last sample (or the given x_max) and past
    every marker; values up to the largest sample or horizontal line, rounded up."""
    ts = [t for s in chart.series for t, _ in s.points]
    x_max = chart.x_max if chart.x_max is not None else max(ts, default=0.0)
    x_max = max([x_max, *(m.t for m in chart.markers), *(b.start for b in chart.bands)])
    vs = [v for s in chart.series for _, v in s.points] + [v for v, _ in chart.hlines]
    # headroom so a line at the maximum (a full ring) does not sit on the frame
    return nice_ceiling(x_max), nice_ceiling(max(vs, default=0.0) * 1.08)


def layout(chart: Chart, *, width: int = 640, height: int = 220) -> Layout:
    box = Box(left=56, top=24, width=width - 56 - 12, height=height - 24 - 34)
    x_max, y_max = extent(chart)
    out = Layout(width, height, box, chart.title, chart.unit,
                 empty=not any(s.points for s in chart.series))
    for b in chart.bands:
        x0 = box.x(b.start, x_max)
        x1 = box.x(x_max if b.end is None else b.end, x_max)
        out.bands.append({"x": round(x0, 1), "w": round(max(x1 - x0, 1.0), 1), "label": b.label})
    for v, label in chart.hlines:
        out.hlines.append({"y": round(box.y(v, y_max), 1), "label": label})
    for s in chart.series:
        draw = step_path if s.step else svg_path
        out.paths.append({"d": draw(s.points, box, x_max=x_max, y_max=y_max), "color": s.color, "name": s.name,
                          "dashed": s.dashed})
    for m in chart.markers:
        out.markers.append({"x": round(box.x(m.t, x_max), 1), "label": m.label, "color": m.color,
                            "dashed": m.dashed})
    out.xticks = [{"x": round(box.x(t, x_max), 1), "label": fmt(t)} for t in ticks(x_max, 5)]
    out.yticks = [{"y": round(box.y(v, y_max), 1), "label": fmt(v)} for v in ticks(y_max, 4)]
    return out


@dataclass(frozen=True)
class Span:
    name: str
    start: float
    seconds: float
    level: int  # 0: a phase of the run, 1: a step inside it


# The pipeline's phases in the order they run; the steps recorded inside a phase
# (record["phases"] keeps both kinds in one flat dict) and which phase holds them.
TOP_PHASES = ("images", "boot", "guests", "save", "backend", "attach", "workload", "evidence", "teardown")
INNER = {"mount_boot_disk": "guests", "xl_create_": "guests", "guest_ssh_": "guests",
         "fio": "workload", "diskspd": "workload", "drain": "workload"}


def _parent(name: str) -> str | None:
    for prefix, parent in INNER.items():
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return parent
    return None


def timeline(phases: dict[str, float]) -> list[Span]:
    """record["phases"] (name -> seconds, phases and the steps inside them in one
    dict) -> spans on one time axis: phases one after the other, in the order the
    pipeline runs them (unknown names where they appear), each phase's steps one
    after the other from the phase's start."""
    nums = {k: float(v) for k, v in phases.items() if isinstance(v, int | float)}
    top = [k for k in nums if _parent(k) is None or _parent(k) not in nums]
    top.sort(key=lambda k: TOP_PHASES.index(k) if k in TOP_PHASES else len(TOP_PHASES) + list(nums).index(k))
    spans: list[Span] = []
    t = 0.0
    for k in top:
        spans.append(Span(k, t, nums[k], 0))
        inner_t = t
        for name, s in nums.items():
            if name not in top and _parent(name) == k:
                spans.append(Span(name, inner_t, s, 1))
                inner_t += s
        t += nums[k]
    return spans
