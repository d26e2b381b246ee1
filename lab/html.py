"""report.html: one self-contained page per results directory (inline SVG, no
network, no script), rendered with jinja2 from the files a run leaves: record.json,
counters.csv, samples-*.jsonl. Also the side-by-side page of two runs, the page of
a bisect, and the table of past runs (`lab results`).

Everything here reads files a run already wrote, so `lab report DIR` renders any
results directory again, old ones included; a file that is missing or torn (an
ERROR before sampling) leaves its section out, never the page."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lab import svgplot
from lab.svgplot import Band, Chart, Marker, Point, Series

REPORT = "report.html"
VERDICT_COLORS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "HANG": "#bc4c00", "CRASH": "#8250df", "ERROR": "#6e7781"}
GUEST, BACKING, BACKEND = "#0969da", "#cf222e", ("#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#0550ae")
# blkback's statistics (Linux) and dev.xbbd's (FreeBSD) plotted as rates; a FreeBSD
# level (responses queued, not yet pushed) as it is
LINUX_RATES = ("rd_req", "wr_req", "f_req", "ds_req", "oo_req")
XBBD_RATES = ("reqs_received", "reqs_completed", "reqs_completed_with_error", "request_shortages", "kva_shortages")
XBBD_LEVELS = ("reqs_queued_for_completion",)


@dataclass
class Disk:
    """What was sampled about one guest test disk, as series over the run's clock
    (seconds since the workload started)."""

    guest: str
    vdev: str
    vbd: str = ""
    completed: list[Point] = field(default_factory=list)
    inflight: list[Point] = field(default_factory=list)
    backing_inflight: list[Point] = field(default_factory=list)
    counters: dict[str, list[Point]] = field(default_factory=dict)  # running totals and levels by name
    backend: str = "blkback"  # or "xbbd"

    @property
    def key(self) -> str:
        return f"{self.guest}/{self.vdev}"


def _num(s: str | None) -> float | None:
    try:
        return float(s) if s not in (None, "") else None
    except ValueError:
        return None


def read_counters(path: Path) -> dict[str, Disk]:
    """counters.csv (guest and dom0 rows interleaved, running totals) -> Disk by key."""
    disks: dict[str, Disk] = {}
    if not path.is_file():
        return disks
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = _num(row.get("t"))
            if t is None:
                continue
            d = disks.setdefault(f"{row['guest']}/{row['vdev']}", Disk(row["guest"], row["vdev"], row.get("vbd", "")))
            if row.get("source") == "guest":
                for attr, col in (("completed", "completed"), ("inflight", "inflight")):
                    v = _num(row.get(col))
                    if v is not None:
                        getattr(d, attr).append((t, v))
                continue
            v = _num(row.get("backing_inflight"))
            if v is not None:
                d.backing_inflight.append((t, v))
            for k in ("taken", *LINUX_RATES):
                v = _num(row.get(k))
                if v is not None:
                    d.counters.setdefault(k, []).append((t, v))
    return disks


def read_xbbd_samples(path: Path, keys: list[str]) -> dict[str, dict[str, list[Point]]]:
    """A FreeBSD dom0's samples-dom0.jsonl -> the dev.xbbd counters per disk. The
    sampler prints one text per test disk, in the order of the run's tracks (the
    record's workloads): counters.csv keeps only the columns both backends share."""
    from lab.platform.freebsd.xbbd import xbbd_stats

    out: dict[str, dict[str, list[Point]]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            outer = json.loads(line)
            values = json.loads(outer["line"]).get("v", [])
            t = float(outer["t"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        for key, text in zip(keys, values, strict=False):
            if not isinstance(text, str) or "dev.xbbd." not in text:
                continue
            stats = xbbd_stats(text.replace("\\n", "\n"))
            for k, v in (stats or {}).items():
                out.setdefault(key, {}).setdefault(k, []).append((t, float(v)))
    return out


def load_record(d: Path) -> dict[str, Any]:
    f = d / "record.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no record.json (not a results directory of `lab run`)")
    rec = json.loads(f.read_text())
    if not isinstance(rec, dict):
        raise ValueError(f"{f}: not a JSON object")
    return rec


def load_disks(d: Path, rec: dict[str, Any]) -> list[Disk]:
    disks = read_counters(d / "counters.csv")
    keys = [f"{w.get('guest')}/{w.get('disk')}" for w in rec.get("workloads", [])]
    for key, counters in read_xbbd_samples(d / "samples-dom0.jsonl", keys).items():
        guest, _, vdev = key.partition("/")
        disk = disks.setdefault(key, Disk(guest, vdev))
        disk.backend = "xbbd"
        disk.counters = counters
    return list(disks.values())


def _applies(item: dict[str, Any], disk: Disk) -> bool:
    """A fault or a hang concerns this disk: it names it, or it names no disk."""
    if item.get("disk") and "/" in str(item["disk"]):
        return str(item["disk"]) == disk.key
    if item.get("guest"):
        return item["guest"] == disk.guest and item.get("disk") in (None, disk.vdev)
    return True


def _overlays(rec: dict[str, Any], disk: Disk) -> tuple[tuple[Band, ...], tuple[Marker, ...]]:
    bands = tuple(
        Band(float(f["started_at_s"]), None if f.get("ended_at_s") is None else float(f["ended_at_s"]),
             f"fault: {f.get('kind', '?')}")
        for f in rec.get("faults") or [] if f.get("started_at_s") is not None and _applies(f, disk))
    markers: list[Marker] = []
    hang = rec.get("hang") or {}
    if hang and _applies(hang, disk):
        if hang.get("last_progress_at_s") is not None:
            markers.append(Marker(float(hang["last_progress_at_s"]), "last progress", "#bf8700", dashed=True))
        if hang.get("detected_at_s") is not None:
            markers.append(Marker(float(hang["detected_at_s"]), "HANG detected", VERDICT_COLORS["HANG"]))
    return bands, tuple(markers)


def disk_charts(rec: dict[str, Any], disk: Disk) -> list[Chart]:
    """The three charts of one disk, on one time axis: completions per second in the
    guest; in flight in the guest and on the backing device against the ring; the
    backend's own counters."""
    w: dict[str, Any] = next(
        (w for w in rec.get("workloads", []) if f"{w.get('guest')}/{w.get('disk')}" == disk.key), {})
    ring = w.get("ring_capacity")
    bands, markers = _overlays(rec, disk)
    everything = [disk.completed, disk.inflight, disk.backing_inflight, *disk.counters.values()]
    x_max = max((p[0] for pts in everything for p in pts), default=0.0)

    def chart(title: str, unit: str, series: Iterable[Series], hlines: tuple[tuple[float, str], ...] = ()) -> Chart:
        return Chart(title, unit, tuple(series), bands=bands, markers=markers, hlines=hlines, x_max=x_max)

    out = [
        chart("Completions per second in the guest", "I/Os per second",
              [Series("completed/s", tuple(svgplot.rates(disk.completed)), GUEST)]),
        chart("In flight", "requests",
              [Series("guest", tuple(disk.inflight), GUEST, step=True),
               Series("backing device (dom0)", tuple(disk.backing_inflight), BACKING, step=True)],
              ((float(ring), f"ring capacity {ring}"),) if ring else ()),
    ]
    names = XBBD_RATES if disk.backend == "xbbd" else LINUX_RATES
    series = [Series(f"{k}/s", tuple(svgplot.rates(disk.counters[k])), BACKEND[i % len(BACKEND)])
              for i, k in enumerate(names) if k in disk.counters]
    series += [Series(k, tuple(disk.counters[k]), BACKEND[(i + 4) % len(BACKEND)], step=True, dashed=True)
               for i, k in enumerate(XBBD_LEVELS) if k in disk.counters]
    title = (f"dev.xbbd counters ({disk.vbd or disk.key})" if disk.backend == "xbbd"
             else f"blkback statistics ({disk.vbd or disk.key}): requests taken off the ring")
    out.append(chart(title, "per second", series))
    return out


def mean_rate(points: list[Point]) -> float | None:
    """Completions per second over the whole sampled span: what the counters saw,
    for a disk whose workload left no result (a HANG or CRASH elsewhere)."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def _rel(target: Path, base: Path) -> str:
    return os.path.relpath(target.resolve(), base.resolve())


def _links(d: Path, rec: dict[str, Any], base: Path) -> dict[str, list[tuple[str, str]]]:
    """Consoles, evidence and raw files as (label, href relative to the page)."""
    consoles = [(p.name, _rel(p, base)) for p in sorted(d.glob("console-*.log"))]
    evidence = []
    for label, value in (rec.get("evidence") or {}).items():
        f = d / str(value)
        evidence.append((f"{label}: {value}", _rel(f, base) if f.is_file() else ""))
    names = list(rec.get("files") or sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()))
    if (d / "record.json").is_file() and "record.json" not in names:
        names.insert(0, "record.json")
    raw = [(n, _rel(d / n, base)) for n in names if n != REPORT and (d / n).is_file()]
    return {"consoles": consoles, "evidence": evidence, "raw": raw}


_SHOWN = {"scenario", "verdict", "stage", "summary", "rule", "phases", "results_dir", "started_utc", "accel",
          "accel_reason", "wall_s", "workloads", "faults", "hang", "evidence", "files", "error", "drain",
          "series", "counters", "guests", "boot", "backend", "images", "l1", "qemu"}


def run_view(d: Path, *, base: Path, width: int = 640) -> dict[str, Any]:
    """Everything the template shows of one run, links relative to `base` (the
    directory of the page)."""
    rec = load_record(d)
    disks = load_disks(d, rec)
    by_key = {x.key: x for x in disks}
    workloads = []
    for w in rec.get("workloads", []):
        disk = by_key.get(f"{w.get('guest')}/{w.get('disk')}")
        workloads.append({**w, "r": w.get("result") or {},
                          "counters_rate": mean_rate(disk.completed) if disk else None})
    spans = svgplot.timeline(rec.get("phases") or {})
    total = max((s.start + s.seconds for s in spans), default=0.0)
    return {
        "rec": rec, "dir": str(d), "name": f"{rec.get('scenario', d.parent.name)} {d.name}",
        "color": VERDICT_COLORS.get(str(rec.get("verdict")), "#6e7781"),
        "workloads": workloads,
        "disks": [{"key": x.key, "backend": x.backend,
                   "charts": [svgplot.layout(c, width=width) for c in disk_charts(rec, x)]} for x in disks],
        "timeline": {"spans": spans, "total": total or 1.0},
        "links": _links(d, rec, base),
        "details": {k: v for k, v in rec.items() if k not in _SHOWN},
        "report_href": _rel(d / REPORT, base),
    }


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("lab", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=1, default=str)
    return env


def _write(path: Path, template: str, **ctx: Any) -> Path:
    html = _env().get_template(template).render(generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                                colors=VERDICT_COLORS, **ctx)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(html)
    tmp.replace(path)
    return path


def write_report(results_dir: Path) -> Path:
    """Render results_dir/report.html from the files the run left; returns its path.
    The pipeline calls this at the end of every run, `lab report DIR` at any time."""
    d = Path(results_dir)
    if (d / "bisect.json").is_file():
        return write_bisect_report(d)
    return _write(d / REPORT, "report.html.j2", run=run_view(d, base=d))


def write_compare(a: Path, b: Path, out: Path | None = None) -> Path:
    """Two runs side by side (a bisect's culprit and its parent): one page, by
    default in the two runs' common parent directory."""
    if out is None:
        common = Path(os.path.commonpath([a.resolve(), b.resolve()]))
        out = common / f"compare-{a.name}-vs-{b.name}.html"
    base = out.parent
    runs = [run_view(x, base=base, width=520) for x in (a, b)]
    return _write(out, "report_compare.html.j2", runs=runs)


def write_bisect_report(d: Path) -> Path:
    """A bisect's page: the range, the result, one row per step with a link to its
    report (rendered here when the step has none yet) and the culprit against its
    parent side by side when the bisect confirmed one."""
    res = json.loads((d / "bisect.json").read_text())
    steps = []
    for s in res.get("steps", []):
        sd = Path(s.get("record", "")).parent
        if not (sd / "record.json").is_file():  # moved: look for the step by its number
            sd = next(iter(sorted((d / "steps").glob(f"{int(s.get('n', 0)):02d}-*"))), sd)
        href = ""
        if (sd / "record.json").is_file():
            try:
                if not (sd / REPORT).is_file():
                    write_report(sd)
                href = _rel(sd / REPORT, d)
            except (OSError, ValueError) as e:
                s = {**s, "report_error": str(e)}
        steps.append({**s, "dir": sd, "href": href, "color": VERDICT_COLORS.get(str(s.get("verdict")), "#6e7781")})
    compare = ""
    bad = next((s for s in steps if s.get("label") == "confirm-bad" and s["href"]), None)
    good = next((s for s in steps if s.get("label") == "confirm-parent" and s["href"]), None)
    if bad and good:
        compare = _rel(write_compare(bad["dir"], good["dir"], d / "compare-culprit-vs-parent.html"), d)
    return _write(d / REPORT, "report_bisect.html.j2", res=res, steps=steps, compare=compare)


# ------------------------------------------------------------------ lab results
def find_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under root (each directory with a record.json; `latest` and other
    symlinks are not followed twice), oldest first, as the row `lab results` prints."""
    seen: set[Path] = set()
    rows = []
    for f in sorted(Path(root).rglob("record.json")):
        real = f.resolve()
        if real in seen or _through_symlink(Path(root), f):
            continue
        seen.add(real)
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict):
            continue
        iops = [float((w.get("result") or {}).get("iops", 0)) for w in rec.get("workloads", []) if w.get("result")]
        rows.append({
            "when": _when(str(rec.get("started_utc") or f.parent.name)), "scenario": rec.get("scenario", "?"),
            "verdict": rec.get("verdict", "?"), "iops": sum(iops) if iops else None,
            "wall_s": rec.get("wall_s"), "accel": rec.get("accel", "?"), "dir": str(f.parent),
            "stamp": str(rec.get("started_utc") or ""),
        })
    rows.sort(key=lambda r: (r["stamp"], r["dir"]))
    return rows


def _through_symlink(root: Path, f: Path) -> bool:
    p = root
    for part in f.relative_to(root).parts[:-1]:
        p = p / part
        if p.is_symlink():
            return True
    return False


def _when(stamp: str) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.strptime(stamp[:16], "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return stamp


def runs_table(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The rows of `lab results` as aligned text lines, a header first."""
    lines = [f"{'when (UTC)':19}  {'scenario':20} {'verdict':7} {'IOPS':>7} {'wall':>6}  {'accel':5}  results"]
    for r in rows:
        iops = f"{r['iops']:.0f}" if r["iops"] is not None else "-"
        wall = f"{float(r['wall_s']):.0f}s" if isinstance(r["wall_s"], int | float) else "-"
        lines.append(f"{r['when']:19}  {str(r['scenario'])[:20]:20} {r['verdict']:7} {iops:>7} {wall:>6}  "
                     f"{str(r['accel'])[:5]:5}  {r['dir']}")
    return lines
