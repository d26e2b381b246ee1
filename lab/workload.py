"""Workload tools behind one protocol: render a job for a test disk, the argv that
runs it (writing structured output to a file), and a parser of that output into
one IoResult. fio, and blkring (the userspace frontend, lab/ringfront.py);
diskspd (Windows, -Rxml) plugs in beside them in WORKLOADS without touching the
pipeline."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Protocol

from lab.errors import ScenarioError
from lab.ringfront import Ring
from lab.scenario import WorkloadCfg
from lab.values import FIO_KEY, FIO_VALUE, fio_extra_problems, text_problem


@dataclass(frozen=True)
class IoResult:
    tool: str
    read_iops: float
    write_iops: float
    read_bw_kib: float
    write_bw_kib: float
    clat_p50_ms: float
    clat_p99_ms: float
    clat_p999_ms: float
    clat_max_ms: float
    errors: int
    runtime_s: float
    ios: int
    extra: dict = field(default_factory=dict)

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops

    def as_dict(self) -> dict:
        return {**asdict(self), "iops": round(self.iops, 1)}


def fio_job(w: WorkloadCfg, device: str) -> str:
    """The fio job file: one group of `numjobs` jobs, outstanding = iodepth x numjobs.

    Each line is `key=value`: a newline or an `=` in a key, or anything fio would
    expand or read as a path in a value, could add options (exec_prerun=...) or
    point fio elsewhere. The loader refuses those (lab/scenario.py, by the rules
    of lab/values.py); this checks again, since a workload built in code does
    not pass through the loader."""
    problems = fio_extra_problems(w.extra)
    for kind, value in (("bssplit", w.bssplit), ("fio_size", w.size)):
        if problem := text_problem(value, kind):
            problems.append(problem)
    if not re.fullmatch(r"/dev/[a-z][a-z0-9]*", device):
        problems.append(f"a test disk device like /dev/xvdb, got {device!r}")
    if problems:
        raise ScenarioError(f"fio job for {w.guest}/{w.disk}: " + "; ".join(problems))
    opts: dict[str, str] = {
        "filename": device,
        "ioengine": w.ioengine,
        "direct": "1" if w.direct else "0",
        "rw": w.rw,
        "rwmixread": str(w.rwmixread),
        "bssplit": w.bssplit,
        "iodepth": str(w.iodepth),
        "numjobs": str(w.numjobs),
        "time_based": "1",
        "runtime": f"{int(w.runtime)}s",
        "group_reporting": "1",
        "randrepeat": "0",
        "norandommap": "1",
    }
    if w.size:
        opts["size"] = w.size
    opts.update(w.extra)
    for k, v in opts.items():  # the lab's own values too: a Literal is not checked at run time
        if not FIO_KEY.fullmatch(k) or not FIO_VALUE.fullmatch(v):
            raise ScenarioError(f"fio job for {w.guest}/{w.disk}: refused line {k}={v!r}")
    lines = ["[global]", *(f"{k}={v}" for k, v in opts.items()), "", "[lab]", ""]
    return "\n".join(lines)


def fio_argv(job_path: str, out_path: str) -> list[str]:
    return ["fio", "--output-format=json", f"--output={out_path}", "--eta=never", job_path]


def _pct(d: dict, key: str) -> float:
    pct = d.get("clat_ns", {}).get("percentile", {}) or {}
    v = pct.get(key)
    return round(v / 1e6, 3) if v else 0.0


def parse_fio(text: str) -> IoResult:
    """fio's --output-format=json (with group_reporting: one job entry). fio may
    print warnings before the JSON; they are skipped."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio output")
    data = json.loads(text[start:])
    jobs = data.get("jobs", [])
    if not jobs:
        raise ValueError("fio output has no jobs")
    rd: dict[str, float] = {"iops": 0.0, "bw": 0.0, "io": 0}
    wr: dict[str, float] = {"iops": 0.0, "bw": 0.0, "io": 0}
    p50 = p99 = p999 = mx = 0.0
    errors = 0
    runtime = 0.0
    for j in jobs:
        # `error` is the first error's errno; with continue_on_error fio counts them in total_err
        errors += max(int(j.get("total_err", 0)), 1 if int(j.get("error", 0)) else 0)
        # with group_reporting, job_runtime is the sum over the numjobs jobs; each
        # direction's runtime is the group's longest, i.e. the wall runtime
        side_runtime = 0.0
        for side, acc in (("read", rd), ("write", wr), ("trim", wr)):
            s = j.get(side, {})
            side_runtime = max(side_runtime, float(s.get("runtime", 0)) / 1000)
            acc["iops"] += float(s.get("iops", 0))
            acc["bw"] += float(s.get("bw", 0))
            acc["io"] += int(s.get("total_ios", 0))
            if s.get("total_ios"):
                p50 = max(p50, _pct(s, "50.000000"))
                p99 = max(p99, _pct(s, "99.000000"))
                p999 = max(p999, _pct(s, "99.900000"))
                mx = max(mx, round(s.get("clat_ns", {}).get("max", 0) / 1e6, 3))
        runtime = max(runtime, side_runtime or float(j.get("job_runtime", 0)) / 1000)
    return IoResult(
        tool="fio", read_iops=round(rd["iops"], 1), write_iops=round(wr["iops"], 1),
        read_bw_kib=round(rd["bw"], 1), write_bw_kib=round(wr["bw"], 1),
        clat_p50_ms=p50, clat_p99_ms=p99, clat_p999_ms=p999, clat_max_ms=mx,
        errors=errors, runtime_s=runtime, ios=int(rd["io"] + wr["io"]),
        extra={"fio_version": data.get("fio version", "")},
    )


class Workload(Protocol):
    tool: str

    def job(self, w: WorkloadCfg, device: str) -> str: ...
    def argv(self, job_path: str, out_path: str) -> list[str]: ...
    def parse(self, text: str) -> IoResult: ...
    def lab_failure(self, text: str) -> str: ...  # why the tool could not run at all ("" if it ran)


class Fio:
    tool = "fio"

    def job(self, w: WorkloadCfg, device: str) -> str:
        return fio_job(w, device)

    def argv(self, job_path: str, out_path: str) -> list[str]:
        return fio_argv(job_path, out_path)

    def parse(self, text: str) -> IoResult:
        return parse_fio(text)

    def lab_failure(self, text: str) -> str:
        return ""  # fio's failures to run are its exit code and stderr (FAIL: errors)


# "ring": the userspace frontend (lab/ringfront.py)
WORKLOADS: dict[str, Workload] = {"fio": Fio(), "ring": Ring()}
