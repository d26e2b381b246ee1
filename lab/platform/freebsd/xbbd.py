"""blkback's counters on a FreeBSD dom0 and the verdict rules over them.

blkback (xbbd) is built into FreeBSD's kernel; its counters are sysctl nodes
dev.xbbd.<unit>.*, each unit naming its xenstore node (xenbusb's
`xenstore_path`, backend/vbd/<domid>/<devid>). The rules work on kernels with and
without the two counters the 2014 fix added."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lab.errors import LabError
from lab.platform import Finding, Rules

if TYPE_CHECKING:
    from lab.watchdog import Track

# One `sysctl dev.xbbd` per tick samples every unit; awk keeps the integer nodes
# of the units asked for, matched by their xenstore path, and prints the lab's
# sample line {"v": [unit text or null, ...]}. POSIX sh + awk + sleep with
# fractions: all in FreeBSD's base system.
XBBD_SAMPLER = r"""
iv=$1; shift
while :; do
  sysctl dev.xbbd 2>/dev/null | awk -v want="$*" '
    BEGIN { n = split(want, w, " ") }
    {
      if (!match($0, /^dev\.xbbd\.[0-9]+\./)) next
      rest = substr($0, RLENGTH + 1); unit = substr($0, 10, RLENGTH - 10)
      k = rest; sub(/:.*/, "", k); v = rest; sub(/^[^:]*: ?/, "", v)
      if (k == "xenstore_path") path[unit] = v
      else if (v ~ /^-?[0-9]+$/) text[unit] = text[unit] "dev.xbbd." unit "." k ": " v "\\n"
    }
    END {
      printf "{\"v\": ["
      for (i = 1; i <= n; i++) {
        hit = ""
        for (u in path) if (path[u] ~ ("(^|/)" w[i] "$")) hit = u
        printf "%s%s", (i > 1 ? ", " : ""), (hit == "" ? "null" : "\"" text[hit] "\"")
      }
      print "]}"
    }'
  sleep "$iv"
done
"""


# Every numeric node blkback.c's xbb_setup_sysctl() adds under dev.xbbd.<unit>.
XBBD_COUNTERS = (
    "disable_flush", "flush_interval", "no_coalesce_reqs",
    "reqs_received", "reqs_completed", "reqs_queued_for_completion", "reqs_completed_with_error",
    "forced_dispatch", "normal_dispatch", "total_dispatch",
    "kva_shortages", "request_shortages",
    "max_requests", "max_request_segments", "max_request_size", "ring_pages",
)
# Added by the 2014 fix (59adbba20f, "fix blkback pushing responses before
# releasing internal resources"): a kernel without them predates it or reverts it.
FIX_2014_COUNTERS = ("reqs_queued_for_completion", "reqs_completed_with_error")
_CORE = ("reqs_received", "reqs_completed", "request_shortages", "kva_shortages", "max_requests")
_SYSCTL_LINE = re.compile(r"^dev\.xbbd\.(\d+)\.([%\w]+): ?(.*)$")


def parse_xbbd(sysctl_output: str) -> dict[int, dict[str, int | str]]:
    """`sysctl dev.xbbd` output -> {unit: {node: value}}: integers as int, the
    string nodes (%desc, %location, xenstore_path, xenbus_connection_state, ...)
    as str. Lines of other trees and the devclass's own nodes are ignored."""
    out: dict[int, dict[str, int | str]] = {}
    for raw in sysctl_output.splitlines():
        m = _SYSCTL_LINE.match(raw.rstrip("\r"))
        if not m:
            continue
        value = m[3].strip()
        out.setdefault(int(m[1]), {})[m[2]] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


@dataclass(frozen=True)
class FreeBsdPoint:
    """One sample of one xbbd unit. queued_for_completion and completed_with_error
    are None on kernels without the 2014 fix."""

    t: float
    received: int
    completed: int
    queued_for_completion: int | None
    completed_with_error: int | None
    request_shortages: int
    kva_shortages: int
    max_requests: int

    @property
    def inflight(self) -> int:
        """Requests taken off the ring whose responses are not yet queued or pushed."""
        return self.received - self.completed - (self.queued_for_completion or 0)

    @classmethod
    def from_counters(cls, t: float, c: Mapping[str, int | str]) -> FreeBsdPoint:
        absent = [k for k in _CORE if not isinstance(c.get(k), int)]
        if absent:
            # the nodes appear only once the vbd is connected (xbb_attach_disk)
            raise LabError("sample", f"dev.xbbd unit lacks {', '.join(absent)}: not connected yet?")

        def opt(k: str) -> int | None:
            v = c.get(k)
            return v if isinstance(v, int) else None

        return cls(t, int(c["reqs_received"]), int(c["reqs_completed"]), opt("reqs_queued_for_completion"),
                   opt("reqs_completed_with_error"), int(c["request_shortages"]), int(c["kva_shortages"]),
                   int(c["max_requests"]))


def _trailing_since(pts: Sequence[FreeBsdPoint], same: Callable[[FreeBsdPoint], bool]) -> float | None:
    """The time of the first sample of the run of trailing samples for which `same` holds."""
    since = None
    for p in reversed(pts):
        if not same(p):
            break
        since = p.t
    return since


def xbbd_check(samples: Sequence[tuple[float, Mapping[str, int | str]]], *, stall_window: float) -> dict:
    """The FreeBSD verdict rules over one unit's samples (t ascending):

    - hang: `reqs_completed` has not advanced for `stall_window` while requests were
      in flight; or `reqs_queued_for_completion` stayed at the same non-zero value,
      with nothing completed, for `stall_window` (responses queued, never pushed);
    - errors: how much `reqs_completed_with_error` grew (None if the kernel lacks it);
    - invariant_violations: samples where in flight > max_requests (the pools hold
      max_requests requests: more means the counters or the backend are wrong);
    - shortages: growth of request_shortages / kva_shortages (the 2014 bug's oracle);
    - missing: the counters this kernel lacks (the rules run without them).
    """
    pts = [FreeBsdPoint.from_counters(t, c) for t, c in samples]
    result: dict = {
        "samples": len(pts), "hang": None, "errors": None, "invariant_violations": [],
        "shortages": {"request_shortages": 0, "kva_shortages": 0},
        "missing": [k for k in XBBD_COUNTERS if samples and k not in samples[0][1]],
    }
    if not pts:
        return result
    first, last = pts[0], pts[-1]
    result["shortages"] = {"request_shortages": last.request_shortages - first.request_shortages,
                           "kva_shortages": last.kva_shortages - first.kva_shortages}
    if first.completed_with_error is not None and last.completed_with_error is not None:
        result["errors"] = last.completed_with_error - first.completed_with_error
    result["invariant_violations"] = [
        {"t": p.t, "inflight": p.inflight, "max_requests": p.max_requests}
        for p in pts if p.max_requests > 0 and p.inflight > p.max_requests
    ]
    # responses queued but never pushed: the same non-zero queue, nothing completing
    if last.queued_for_completion:
        since = _trailing_since(pts, lambda p: (p.queued_for_completion, p.completed)
                                == (last.queued_for_completion, last.completed))
        if since is not None and last.t - since >= stall_window:
            result["hang"] = _hang(pts, since, f"reqs_queued_for_completion stuck at {last.queued_for_completion} "
                                   f"with reqs_completed at {last.completed} for {last.t - since:.0f}s: "
                                   "responses queued but never pushed to the ring")
            return result
    # completions stopped while requests were in flight: the stall clock starts at the
    # first in-flight sample since reqs_completed last moved (idle time is no stall)
    if last.inflight > 0:
        moved = _trailing_since(pts, lambda p: p.completed == last.completed)
        assert moved is not None  # `last` itself always qualifies
        since = next(p.t for p in pts if p.t >= moved and p.inflight > 0)
        if last.t - since >= stall_window:
            cause = (f"reqs_completed stuck at {last.completed} for {last.t - since:.0f}s with "
                     f"{last.inflight} request(s) in flight")
            grew = [p for p in pts if p.t >= moved]
            if grew[-1].request_shortages > grew[0].request_shortages or \
                    grew[-1].kva_shortages > grew[0].kva_shortages:
                cause += "; the backend ran short of requests/KVA while stalling"
            result["hang"] = _hang(pts, since, cause)
    return result


def _hang(pts: Sequence[FreeBsdPoint], since: float, cause: str) -> dict:
    last = pts[-1]
    return {
        "cause": cause, "since_t": since, "detected_t": last.t, "stalled_s": round(last.t - since, 2),
        "completed": last.completed, "inflight": last.inflight,
        "queued_for_completion": last.queued_for_completion,
        "request_shortages": last.request_shortages, "kva_shortages": last.kva_shortages,
    }


def xbbd_stats(text: str | None) -> dict[str, int] | None:
    """One unit's sampled sysctl lines -> the stats of a BackendPoint: every
    xbbd counter, plus `taken` (reqs_received: requests taken off the ring, as
    Linux's rd+wr+f+ds) and `backing_inflight` (taken, not yet completed or
    queued for completion) so the common watchdog reads both backends alike."""
    if not text:
        return None
    units = parse_xbbd(text)
    if len(units) != 1:
        return None
    c = {k: v for k, v in next(iter(units.values())).items() if isinstance(v, int)}
    if "reqs_received" not in c or "reqs_completed" not in c:
        return None  # not connected yet
    c["taken"] = c["reqs_received"]
    c["backing_inflight"] = c["reqs_received"] - c["reqs_completed"] - c.get("reqs_queued_for_completion", 0)
    return c


# ------------------------------------------------------------ the platform's rules
def _track_check(tr: Track, stall_window: float) -> dict:
    # a copy of the list: the sampler thread appends while the run decides
    samples = [(p.t, p.stats) for p in list(tr.backend_pts)]
    return xbbd_check(samples, stall_window=stall_window)


def live_rules(tracks: Sequence[Track], *, stall_window: float) -> Rules:
    """While the workload runs: FreeBSD's own hang rule on top of the common one,
    responses queued for completion and never pushed (the 2014 fix's counter stuck
    non-zero). The common rule (completions stopped with I/O in flight) already
    sees the rest through `backing_inflight`, so only this cause is a finding."""
    for tr in tracks:
        h = _track_check(tr, stall_window)["hang"]
        if h and "reqs_queued_for_completion" in h["cause"]:
            detail = {"disk": tr.key, **h, "detected_at_s": round(h["detected_t"], 2),
                      "last_progress_at_s": round(h["since_t"], 2), "side_stopped_first": "backend"}
            return Rules(findings=(Finding("HANG", tr.key, h["cause"], detail),))
    return Rules()


def final_rules(tracks: Sequence[Track], *, stall_window: float, fail_on_request_shortages: bool) -> Rules:
    """After the workload: the xbbd rules' report per disk (which counters this
    kernel lacks, shortages) for the record under "xbbd"; errors completed by the
    backend, and in flight above max_requests, are FAIL findings; request shortages
    too when the scenario asks ([freebsd] fail_on_request_shortages). A FAIL
    message names its disk ("guest/vdev: ..."): the verdict joins them as they are."""
    findings: list[Finding] = []
    rep: dict[str, Any] = {}
    for tr in tracks:
        c = _track_check(tr, stall_window)
        rep[tr.key] = {k: c[k] for k in ("samples", "missing", "shortages", "errors", "invariant_violations")}
        if c["missing"]:
            rep[tr.key]["note"] = ("this kernel lacks " + ", ".join(c["missing"])
                                   + " (older than the 2014 fix, or it reverted): rules ran without them")
        if c["errors"]:
            findings.append(Finding("FAIL", tr.key, f"{tr.key}: blkback completed {c['errors']} request(s) with an error "
                                    "(reqs_completed_with_error grew)", {"errors": c["errors"]}))
        short = c["shortages"]["request_shortages"]
        if short and fail_on_request_shortages:
            findings.append(Finding("FAIL", tr.key, f"{tr.key}: blkback ran out of request structures {short} time(s) "
                                    "(request_shortages grew; [freebsd] fail_on_request_shortages)",
                                    {"request_shortages": short}))
        if c["invariant_violations"]:
            v = c["invariant_violations"][0]
            findings.append(Finding(
                "FAIL", tr.key, f"{tr.key}: {len(c['invariant_violations'])} sample(s) with more requests in flight than "
                f"max_requests (first at t={v['t']:.0f}s: {v['inflight']} > {v['max_requests']})",
                {"invariant_violations": c["invariant_violations"]}))
    return Rules(findings=tuple(findings), record={"xbbd": rep})


def sample_plan() -> dict[str, Any]:
    """The plan's sampling step: the argv FreeBsdDom0.sample_argv builds."""
    return {"step": "sample", "what": "one long-lived sampler in dom0 over SSH: `sysctl dev.xbbd` every interval, "
            "the units serving the test disks picked by xenstore_path; verdict rules in xbbd_check",
            "command": ["sh", "-c", "<xbbd.XBBD_SAMPLER>", "lab-xbbd-sample", "1", "vbd/{domid}/{devid}"]}
