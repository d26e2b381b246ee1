"""Every preset shall reach the verdict it claims, and each workload preset shall
show from the backend's statistics, xenstore and in-flight counts that it
stressed what its name says. `stall`, `io-errors` and the two lifecycle presets
run in `make test`; the rest nightly (`make test-e2e-all`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lab import pipeline, scenario


def _run(name: str, results: Path) -> dict:
    rec = pipeline.run(scenario.load(name), pipeline.Options(results_root=results))
    print(json.dumps({k: rec.get(k) for k in ("verdict", "summary", "hang", "faults", "workloads", "l1")},
                     indent=1, default=str))
    return rec


def _delta(rec: dict, guest: str, vdev: str, key: str) -> int:
    sysfs = rec["guests"][guest]["vbds"][vdev]["sysfs"]
    return rec["counters"][sysfs]["delta"][key]


def test_stall_is_a_hang_caught_within_the_window(results: Path) -> None:
    sc = scenario.load("stall")
    rec = _run("stall", results)
    assert rec["verdict"] == "HANG", rec.get("summary")
    hang, fault = rec["hang"], rec["faults"][0]
    assert fault["kind"] == "stall" and fault["started_at_s"] is not None
    assert hang["detected_after_from"] == "fault stall"
    # stall window + one sampling interval + one SSH round trip (generously 3 s under TCG)
    assert 0 < hang["detected_after_s"] <= sc.watchdog.stall_window + sc.watchdog.interval + 3, hang
    assert hang["guest_inflight"] > 0
    assert rec["bisect_code"] == 1
    assert "evidence" in rec and "xen-debug-keys-q" in rec["evidence"]


def test_io_errors_are_a_fail_not_a_hang(results: Path) -> None:
    rec = _run("io-errors", results)
    assert rec["verdict"] == "FAIL", rec.get("summary")
    assert "hang" not in rec
    assert rec["workloads"][0]["result"]["errors"] > 0


@pytest.mark.nightly
def test_stall_recovers_is_a_pass_with_the_stall_in_the_series(results: Path) -> None:
    rec = _run("stall-recovers", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = rec["faults"][0]
    assert f["ended_at_s"] - f["started_at_s"] >= 6
    rows = [r for r in csv.DictReader(open(Path(rec["results_dir"]) / "counters.csv")) if r["source"] == "guest"]
    # the guest's completed count stood still for most of the stall, with I/O in flight
    still = [float(r["t"]) for a, r in zip(rows, rows[1:], strict=False)
             if r["completed"] == a["completed"] and int(r["inflight"]) > 0
             and f["started_at_s"] <= float(r["t"]) <= f["ended_at_s"] + 1]
    assert len(still) >= 4, still


@pytest.mark.nightly
def test_slow_disk_is_a_pass(results: Path) -> None:
    rec = _run("slow-disk", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["workloads"][0]["result"]["clat_p50_ms"] >= 100


@pytest.mark.nightly
def test_l1_pause_is_a_hang_with_cause_l1_unresponsive(results: Path) -> None:
    rec = _run("l1-pause", results)
    assert rec["verdict"] == "HANG", rec.get("summary")
    assert rec["hang"]["l1_unresponsive"] and rec["hang"]["cause"] == "L1 unresponsive"
    assert rec["bisect_code"] == 125
    assert rec["evidence"]["l1"].startswith("dom0 did not answer")


@pytest.mark.nightly
def test_ring_saturation_keeps_the_backend_full(results: Path) -> None:
    rec = _run("ring-saturation", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    w = rec["workloads"][0]
    assert w["ring_capacity"] == 32 and w["outstanding"] >= 128
    assert w["backing_full_fraction"] > 0.5, w
    assert w["oo_req"] is not None


@pytest.mark.nightly
def test_indirect_uses_indirect_descriptors(results: Path) -> None:
    rec = _run("indirect", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["max_indirect_segments"] > 0
    sect = _delta(rec, "lin1", "xvdb", "rd_sect") + _delta(rec, "lin1", "xvdb", "wr_sect")
    reqs = _delta(rec, "lin1", "xvdb", "rd_req") + _delta(rec, "lin1", "xvdb", "wr_req")
    # a plain ring request holds 11 segments of 4 KiB = 88 sectors
    assert sect / reqs > 88


@pytest.mark.nightly
def test_flush_storm_flushes(results: Path) -> None:
    rec = _run("flush-storm", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert _delta(rec, "lin1", "xvdb", "f_req") > 100


@pytest.mark.nightly
def test_discard_discards(results: Path) -> None:
    rec = _run("discard", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert _delta(rec, "lin1", "xvdb", "ds_req") > 100


@pytest.mark.nightly
def test_multiqueue_negotiates_several_queues(results: Path) -> None:
    rec = _run("multiqueue", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["num_queues"] > 1


@pytest.mark.nightly
def test_mixed_does_it_all_at_once(results: Path) -> None:
    rec = _run("mixed", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["num_queues"] > 1
    assert _delta(rec, "lin1", "xvdb", "f_req") > 0
    assert _delta(rec, "lin1", "xvdc", "ds_req") > 0


@pytest.mark.nightly
def test_light_passes(results: Path) -> None:
    rec = _run("light", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["workloads"][0]["outstanding"] == 1


def test_lifecycle_churn_passes_with_every_cycle_clean(results: Path) -> None:
    """Five detach-attach cycles of an idle disk beside a disk under load shall
    each complete and leave nothing of the old connection; then the orderly
    teardown (each disk detached, the guest destroyed, xen-blkback unloaded) too."""
    rec = _run("lifecycle-churn", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = rec["faults"][0]
    assert f["kind"] == "detach-attach" and f["count"] == 5
    assert f["outcome"]["ok"] and not f["outcome"]["leftovers"], f
    assert f["ended_at_s"] > f["started_at_s"]
    td = rec["teardown"]
    assert not td["skipped"] and not td["leftovers"]
    assert [s["kind"] for s in td["steps"]] == ["detach", "detach", "destroy", "unload"], td


def test_destroy_under_load_passes_and_leaves_nothing_behind(results: Path) -> None:
    """The guest destroyed with its ring full against a slow backing device shall
    leave nothing of its domain in dom0, and the run stops judging its workload."""
    rec = _run("destroy-under-load", results)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = next(f for f in rec["faults"] if f["kind"] == "destroy")
    assert f["outcome"]["ok"] and not f["outcome"]["leftovers"], f
    w = rec["workloads"][0]
    assert "ended_by" in w and w["peak_inflight_guest"] >= w["ring_capacity"] // 2, w
    assert rec["teardown"]["steps"][-1]["kind"] == "unload" and rec["teardown"]["steps"][-1]["ok"]
