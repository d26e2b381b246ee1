"""The userspace frontend as a workload tool (tool = "ring"): blkring, a blkif
frontend in guest userspace (images/blkring/blkring.c, compiled on L0 and baked
into the guest image), run on a test disk the guest's blkfront was kept off
(lab/guests.py attaches it so). It keeps the ring full the way the Windows PV
driver did, or sends what no well-behaved frontend sends, each such case with
its expected outcome asserted by the program.

Like fio it gets a job file (key=value lines), writes one JSON object to a
file, and the lab parses it into an IoResult. Its live counters go to a
one-line stat file that the guest's sampler reads in place of
/sys/block/X/stat (there is no block device): `stat_path`, `parse_stat`.

What makes the run FAIL goes into IoResult.errors (and `problems` names it):
error responses to well-formed requests, verify mismatches, hostile cases
whose expectation failed, responses for no request, requests never answered,
and connections of a reconnect schedule that failed (refused, a ring of
another size than granted, nothing completed: extra["connections_detail"]).
A program that could not connect leaves no result (`parse_ring` raises with
its reason); `fatal` tells a lab failure (setup, refused) from the backend's."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from lab.errors import ScenarioError
from lab.scenario import RING_HOSTILE_CASES, RING_MAX_QUEUES, RING_MAX_RECONNECTS, WorkloadCfg
from lab.xen import VDEV_DEVID

if TYPE_CHECKING:
    from lab.workload import IoResult

BINARY = "blkring"  # in the guest's PATH (/usr/local/bin)
TOOL = "ring"
# the program's stages whose failure is the lab's, not the backend's: it could
# not run at all, or found the disk taken by another frontend
LAB_STAGES = ("usage", "setup", "refused")
STAT_KEYS = ("completed", "inflight", "reads", "writes", "flushes", "discards", "sectors_read", "sectors_written")
_JOB_VALUE = re.compile(r"[A-Za-z0-9_.,:/-]*")


def devid(device: str) -> int:
    """The xenstore device id of a test disk's device (/dev/xvdb -> 51728)."""
    m = re.fullmatch(r"/dev/(xvd[a-z])", device)
    if not m:
        raise ScenarioError(f"blkring job: a test disk device like /dev/xvdb, got {device!r}")
    return VDEV_DEVID[m.group(1)]


def stat_path(vdev: str) -> str:
    """Where blkring keeps its live counters for this disk (its --stat)."""
    return f"/run/blkring-{VDEV_DEVID[vdev]}.stat"


def drives(workloads: tuple[WorkloadCfg, ...] | list[WorkloadCfg], guest: str, vdev: str) -> bool:
    """Is this test disk driven by the userspace frontend (its blkfront kept off)?"""
    return any(w.guest == guest and w.disk == vdev and w.tool == TOOL for w in workloads)


def job_options(w: WorkloadCfg, device: str) -> dict[str, str]:
    """blkring's options for workload `w` on `device`, as its job file says them."""
    r = w.ring
    dev = devid(device)
    return {
        "devid": str(dev),
        "duration": f"{float(w.runtime):g}",
        "behaviour": r.behaviour,
        "op": r.op,
        "rwmixread": str(w.rwmixread),
        "segments": str(r.segments),
        "depth": str(r.depth),
        "ring_page_order": str(r.ring_page_order),
        "queues": str(r.queues),
        "persistent": "1" if r.persistent else "0",
        "notify": r.notify,
        "poll": "1" if r.poll else "0",
        "verify": "1" if r.verify else "0",
        "hostile": ",".join(r.hostile),
        "reconnect_orders": ",".join(str(o) for o in r.reconnect_orders),
        "halt_wait": f"{float(r.halt_wait):g}",
        "burst_gap": f"{float(r.burst_gap):g}",
        "settle": f"{float(r.settle):g}",
        "stat": f"/run/blkring-{dev}.stat",
        # stay connected after the run: blkback's statistics live as long as the
        # ring, and the drain compares them with ours after the workload ended;
        # the lingering process closes when the toolstack detaches the disk
        "at_end": "linger",
    }


def ring_job(w: WorkloadCfg, device: str) -> str:
    """The job file: one key=value a line. The loader checked the values
    (lab/scenario.py); a workload built in code did not pass through it, so
    each line is checked here against what blkring's job parser accepts."""
    problems = [f"hostile case {c!r} (expected one of {', '.join(RING_HOSTILE_CASES)})"
                for c in w.ring.hostile if c not in RING_HOSTILE_CASES]
    orders = w.ring.reconnect_orders
    problems += [f"reconnect order {o!r} (expected 0..4)" for o in orders if not 0 <= o <= 4]
    if len(orders) > RING_MAX_RECONNECTS:
        problems.append(f"{len(orders)} reconnect orders (at most {RING_MAX_RECONNECTS})")
    if not 1 <= w.ring.queues <= RING_MAX_QUEUES:
        problems.append(f"queues {w.ring.queues!r} (expected 1..{RING_MAX_QUEUES})")
    opts = job_options(w, device)
    problems += [f"{k}={v!r}" for k, v in opts.items() if not _JOB_VALUE.fullmatch(v)]
    if problems:
        raise ScenarioError(f"blkring job for {w.guest}/{w.disk}: refused " + "; ".join(problems))
    lines = [f"# blkring job for {w.guest}/{w.disk} (lab/ringfront.py)", *(f"{k}={v}" for k, v in opts.items()), ""]
    return "\n".join(lines)


def ring_argv(job_path: str, out_path: str) -> list[str]:
    return [BINARY, "--job", job_path, "--output", out_path]


def _load(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in blkring's output")
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"blkring's output is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("tool") != "blkring":
        raise ValueError('not blkring\'s output (no "tool": "blkring")')
    return data


def fatal(text: str) -> tuple[str, str] | None:
    """(stage, message) when blkring stopped before a result, else None. A
    stage in LAB_STAGES is the lab's failure (ERROR), the others (connect, io,
    hostile, close) the backend's."""
    try:
        f = _load(text).get("fatal")
    except ValueError:
        return None
    return (str(f.get("stage", "")), str(f.get("message", ""))) if isinstance(f, dict) else None


def _int(d: Any, *keys: str) -> int:
    for k in keys:
        d = d.get(k, 0) if isinstance(d, dict) else 0
    return int(d or 0)


def parse_ring(text: str) -> IoResult:
    """blkring's JSON into an IoResult. Reads are read IOPS; writes, flushes and
    discards write IOPS (as fio's trims are); `errors` counts everything that
    makes the run FAIL (see the module's docstring)."""
    from lab.workload import IoResult  # lab.workload imports this module

    data = _load(text)
    if isinstance(data.get("fatal"), dict):
        f = data["fatal"]
        raise ValueError(f"blkring stopped at {f.get('stage', '?')}: {f.get('message', '')}")
    runtime = float(data.get("runtime_s") or 0.0)

    def per_s(n: float) -> float:
        return round(n / runtime, 1) if runtime > 0 else 0.0

    done = data.get("completed", {})
    lat = data.get("latency_ms", {})
    hostile = [c for c in data.get("hostile", []) if isinstance(c, dict)]
    failed = [c for c in hostile if not c.get("ok")]
    mismatches = _int(data, "verify", "mismatches")
    conns = [c for c in data.get("connections_detail", []) if isinstance(c, dict)]
    errors = (_int(data, "unexpected_errors") + mismatches + len(failed) + _int(data, "bogus_responses")
              + _int(data, "never_completed") + _int(data, "failed_connections"))
    extra = {
        "behaviour": data.get("behaviour", ""), "op": data.get("op", ""), "ring": data.get("ring", {}),
        "connections": _int(data, "connections"), "connections_detail": conns,
        "reconnect_orders": [int(o) for o in data.get("reconnect_orders", [])],
        "reconnect_idle_s": float(data.get("reconnect_idle_s") or 0.0), "requests": _int(data, "requests"),
        "responses": data.get("responses", {}), "completed": done, "verify": data.get("verify", {}),
        "hostile": hostile, "series": data.get("series", {}), "notifies": _int(data, "notifies"),
        "events": _int(data, "events"), "closed": data.get("closed", ""),
        "stopped_by_signal": bool(data.get("stopped_by_signal")),
        "problems": [str(p) for p in data.get("errors", [])],
    }
    return IoResult(
        tool=TOOL,
        read_iops=per_s(_int(done, "read")),
        write_iops=per_s(_int(done, "write") + _int(done, "flush") + _int(done, "discard")),
        read_bw_kib=per_s(_int(data, "bytes", "read") / 1024),
        write_bw_kib=per_s(_int(data, "bytes", "written") / 1024),
        clat_p50_ms=float(lat.get("p50", 0.0)), clat_p99_ms=float(lat.get("p99", 0.0)),
        clat_p999_ms=float(lat.get("p999", 0.0)), clat_max_ms=float(lat.get("max", 0.0)),
        errors=errors, runtime_s=runtime, ios=sum(int(v) for v in data.get("responses", {}).values()),
        extra=extra,
    )


def problems(result: IoResult) -> list[str]:
    """What made a ring workload FAIL, in blkring's own words (for a verdict's
    summary; [] for a fio result)."""
    return list(result.extra.get("problems", [])) if result.tool == TOOL else []


def parse_stat(text: str | None) -> dict[str, int] | None:
    """blkring's stat file ("blkring conn=1 completed=.. inflight=.. reads=.."),
    as the guest sampler reads it, into the fields /sys/block/X/stat gives
    (lab/platform/linux/guest.py parse_block_stat); None for anything else."""
    if text is None:
        return None
    words = text.split()
    if not words or words[0] != "blkring":
        return None
    out: dict[str, int] = {}
    for w in words[1:]:
        k, sep, v = w.partition("=")
        if not sep or not v.isdigit():
            return None
        out[k] = int(v)
    return out if all(k in out for k in STAT_KEYS) else None


def lost_request(stat: dict[str, int] | None, window_s: float) -> str | None:
    """From one guest sample of a ring disk: a request the backend has held for
    longer than `window_s` (the stall window), whatever the other slots do.
    The progress rule needs the whole ring stuck; a pool that drops one request
    at a time (the seed's leak) shows here first. None when nothing is that old.
    Not wired into the verdict (lab/decide.py) yet."""
    if not stat or stat.get("inflight", 0) == 0 or "oldest_ms" not in stat:
        return None
    age = stat["oldest_ms"] / 1000
    if age < window_s:
        return None
    return (f"a request has been outstanding for {age:.0f}s (more than the {window_s:g}s stall window) with "
            f"{stat['inflight']} in flight and {stat['completed']} completed")


def capacity(extra: dict[str, Any]) -> int | None:
    """Request slots blkring had across its queues: the largest of its
    connections (a reconnect schedule changes the ring). The lab reads a ring
    disk's vbd at attach, before blkring connects, so only this says it."""
    conns = extra.get("connections_detail") or [extra.get("ring") or {}]
    sizes = [int(c.get("entries") or 0) * max(1, int(c.get("queues") or 1)) for c in conns if isinstance(c, dict)]
    return max(sizes, default=0) or None


class Ring:
    tool = TOOL

    def job(self, w: WorkloadCfg, device: str) -> str:
        return ring_job(w, device)

    def argv(self, job_path: str, out_path: str) -> list[str]:
        return ring_argv(job_path, out_path)

    def parse(self, text: str) -> IoResult:
        return parse_ring(text)

    def lab_failure(self, text: str) -> str:
        """blkring stopped at a stage that is the lab's (it could not run, or the
        disk was taken by another frontend): ERROR, not the backend's FAIL."""
        f = fatal(text)
        return f"blkring {f[0]}: {f[1]}" if f and f[0] in LAB_STAGES else ""
