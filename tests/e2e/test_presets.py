"""Every preset shall reach the verdict it claims, and each workload preset shall
show from the backend's statistics, xenstore and in-flight counts that it
stressed what its name says. `stall`, `io-errors` and the two lifecycle presets
run in `make test`; the rest nightly (`make test-e2e-all`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lab import scenario
from lab.pytest_plugin import LabRun


def _run(name: str, lab_run: LabRun) -> dict:
    rec = lab_run(name)
    print(json.dumps({k: rec.get(k) for k in ("verdict", "summary", "hang", "faults", "workloads", "l1")},
                     indent=1, default=str))
    return rec


def _delta(rec: dict, guest: str, vdev: str, key: str) -> int:
    sysfs = rec["guests"][guest]["vbds"][vdev]["sysfs"]
    return rec["counters"][sysfs]["delta"][key]


def test_stall_is_a_hang_caught_within_the_window(lab_run: LabRun) -> None:
    sc = scenario.load("stall")
    rec = _run("stall", lab_run)
    assert rec["verdict"] == "HANG", rec.get("summary")
    hang, fault = rec["hang"], rec["faults"][0]
    assert fault["kind"] == "stall" and fault["started_at_s"] is not None
    assert hang["detected_after_from"] == "fault stall"
    # stall window + one sampling interval + one SSH round trip (generously 3 s under TCG)
    assert 0 < hang["detected_after_s"] <= sc.watchdog.stall_window + sc.watchdog.interval + 3, hang
    assert hang["guest_inflight"] > 0
    assert rec["bisect_code"] == 1
    assert "evidence" in rec and "xen-debug-keys-q" in rec["evidence"]


def test_io_errors_are_a_fail_not_a_hang(lab_run: LabRun) -> None:
    rec = _run("io-errors", lab_run)
    assert rec["verdict"] == "FAIL", rec.get("summary")
    assert "hang" not in rec
    assert rec["workloads"][0]["result"]["errors"] > 0


@pytest.mark.nightly
def test_stall_recovers_is_a_pass_with_the_stall_in_the_series(lab_run: LabRun) -> None:
    rec = _run("stall-recovers", lab_run)
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
def test_slow_disk_is_a_pass(lab_run: LabRun) -> None:
    rec = _run("slow-disk", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["workloads"][0]["result"]["clat_p50_ms"] >= 100


@pytest.mark.nightly
def test_l1_pause_is_a_hang_with_cause_l1_unresponsive(lab_run: LabRun) -> None:
    rec = _run("l1-pause", lab_run)
    assert rec["verdict"] == "HANG", rec.get("summary")
    assert rec["hang"]["l1_unresponsive"] and rec["hang"]["cause"] == "L1 unresponsive"
    assert rec["bisect_code"] == 125
    assert rec["evidence"]["l1"].startswith("dom0 did not answer")


@pytest.mark.nightly
def test_ring_saturation_keeps_the_backend_full(lab_run: LabRun) -> None:
    rec = _run("ring-saturation", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    w = rec["workloads"][0]
    assert w["ring_capacity"] == 32 and w["outstanding"] >= 128
    assert w["backing_full_fraction"] > 0.5, w
    assert w["oo_req"] is not None


@pytest.mark.nightly
def test_indirect_uses_indirect_descriptors(lab_run: LabRun) -> None:
    rec = _run("indirect", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["max_indirect_segments"] > 0
    sect = _delta(rec, "lin1", "xvdb", "rd_sect") + _delta(rec, "lin1", "xvdb", "wr_sect")
    reqs = _delta(rec, "lin1", "xvdb", "rd_req") + _delta(rec, "lin1", "xvdb", "wr_req")
    # a plain ring request holds 11 segments of 4 KiB = 88 sectors
    assert sect / reqs > 88


@pytest.mark.nightly
def test_flush_storm_flushes(lab_run: LabRun) -> None:
    rec = _run("flush-storm", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert _delta(rec, "lin1", "xvdb", "f_req") > 100


@pytest.mark.nightly
def test_discard_discards(lab_run: LabRun) -> None:
    rec = _run("discard", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert _delta(rec, "lin1", "xvdb", "ds_req") > 100


@pytest.mark.nightly
def test_multiqueue_negotiates_several_queues(lab_run: LabRun) -> None:
    rec = _run("multiqueue", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["num_queues"] > 1


@pytest.mark.nightly
def test_mixed_does_it_all_at_once(lab_run: LabRun) -> None:
    rec = _run("mixed", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["guests"]["lin1"]["vbds"]["xvdb"]["num_queues"] > 1
    assert _delta(rec, "lin1", "xvdb", "f_req") > 0
    assert _delta(rec, "lin1", "xvdc", "ds_req") > 0


@pytest.mark.nightly
def test_light_passes(lab_run: LabRun) -> None:
    rec = _run("light", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    assert rec["workloads"][0]["outstanding"] == 1


def test_lifecycle_churn_passes_with_every_cycle_clean(lab_run: LabRun) -> None:
    """Five detach-attach cycles of an idle disk beside a disk under load shall
    each complete and leave nothing of the old connection; then the orderly
    teardown (each disk detached, the guest destroyed, xen-blkback unloaded) too."""
    rec = _run("lifecycle-churn", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = rec["faults"][0]
    assert f["kind"] == "detach-attach" and f["count"] == 5
    assert f["outcome"]["ok"] and not f["outcome"]["leftovers"], f
    assert f["ended_at_s"] > f["started_at_s"]
    td = rec["teardown"]
    assert not td["skipped"] and not td["leftovers"]
    assert [s["kind"] for s in td["steps"]] == ["detach", "detach", "destroy", "unload"], td


def test_destroy_under_load_passes_and_leaves_nothing_behind(lab_run: LabRun) -> None:
    """The guest destroyed with its ring full against a slow backing device shall
    leave nothing of its domain in dom0, and the run stops judging its workload."""
    rec = _run("destroy-under-load", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = next(f for f in rec["faults"] if f["kind"] == "destroy")
    assert f["outcome"]["ok"] and not f["outcome"]["leftovers"], f
    w = rec["workloads"][0]
    assert "ended_by" in w and w["peak_inflight_guest"] >= w["ring_capacity"] // 2, w
    assert rec["teardown"]["steps"][-1]["kind"] == "unload" and rec["teardown"]["steps"][-1]["ok"]


@pytest.mark.nightly
def test_save_restore_under_load_passes_and_the_workload_goes_on(lab_run: LabRun) -> None:
    """xl save then xl restore with fio running: nothing of the old domain left in
    dom0, the disk Connected again on the new domain, fio going on afterwards and
    the backend's counters continued across the two connections."""
    rec = _run("save-restore", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    f = rec["faults"][0]
    assert f["kind"] == "save-restore" and f["outcome"]["ok"], f
    assert "Connected again" in f["outcome"]["detail"]
    d = rec["drain"]["lin1/xvdb"]
    assert d["drained"] and d["guest_completed"] > 0
    with open(Path(rec["results_dir"]) / "counters.csv") as fh:
        rows = list(csv.DictReader(fh))
    after = [int(r["completed"]) for r in rows if r["source"] == "guest" and float(r["t"]) > f["ended_at_s"]]
    assert len(after) > 5 and after[-1] > after[0], "fio made no progress after the restore"
    taken = [int(r["taken"]) for r in rows if r["source"] == "dom0" and r["taken"]]
    assert taken == sorted(taken), "the backend's series went backwards across the reconnect"


@pytest.mark.nightly
def test_hot_attach_without_persistent_grants_negotiates_none(lab_run: LabRun) -> None:
    """A frontend that turns persistent grants off gets disks hot-attached (and one
    re-attached twice under load): none may use persistent grants."""
    rec = _run("hot-attach-nopersist", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    vbds = rec["guests"]["lin1"]["vbds"]
    assert {v: vbds[v]["persistent"] for v in vbds} == {"xvdb": False, "xvdc": False}
    assert rec["guests"]["lin1"]["blkfront_params"]["feature_persistent"] == "0"


def test_aggressive_frontend_keeps_the_ring_full_and_passes(lab_run: LabRun) -> None:
    """The userspace frontend (blkring) keeps a one-page ring full against a slow
    backing device, each request re-queued the moment its response lands: the
    seed's trigger. A sound backend serves it all, and its statistics count
    exactly what the program did."""
    rec = _run("aggressive-frontend", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    w = rec["workloads"][0]
    res = w["result"]
    assert res["tool"] == "ring" and res["errors"] == 0
    assert res["extra"]["ring"]["entries"] == 32 and res["extra"]["responses"]["error"] == 0
    assert w["peak_inflight_guest"] == 32 and w["peak_inflight_backing"] >= 30, w
    d = rec["drain"]["lin1/xvdb"]
    assert d["totals_match"] and d["backend_taken"] == res["extra"]["requests"], d


def test_silent_corruption_is_a_fail_only_verify_sees(lab_run: LabRun) -> None:
    """The negative control for verify mode: dom0's backing device changes a byte
    of every write from 8 s on and every request completes okay; the read-backs
    differ, so the run is a FAIL by the errors rule, never a PASS."""
    rec = _run("silent-corruption", lab_run)
    assert rec["verdict"] == "FAIL" and rec["rule"] == "errors", rec.get("summary")
    res = rec["workloads"][0]["result"]
    v = res["extra"]["verify"]
    assert v["checked"] > 0 and 0 < v["mismatches"] < v["checked"], v  # clean before the fault, bad after
    assert res["extra"]["responses"]["error"] == 0, "every request completed okay: only the data is wrong"
    assert rec["faults"][0]["kind"] == "corrupt" and rec["faults"][0]["started_at_s"] is not None


@pytest.mark.nightly
def test_hostile_frontend_gets_each_expected_answer_and_the_neighbour_progresses(lab_run: LabRun) -> None:
    """Malformed requests each answered as the protocol allows (error response,
    or the ring halted until a reconnect), dom0 healthy, and the fio disk beside
    it progressing throughout."""
    rec = _run("hostile-frontend", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    hostile = rec["workloads"][0]["result"]["extra"]["hostile"]
    assert [h["case"] for h in hostile] == list(scenario.load("hostile-frontend").workloads[0].ring.hostile)
    assert all(h["ok"] for h in hostile), hostile
    kill = next(h for h in hostile if h["case"] == "kill-with-outstanding")
    assert "with 0 reads outstanding" not in kill["got"], kill  # the kill must leave requests behind
    assert rec["workloads"][1]["result"]["errors"] == 0


@pytest.mark.nightly
def test_ring_behaviours_each_served_and_counted(lab_run: LabRun) -> None:
    """blkring's bursty mixed ops (indirect, persistent, two pages), verified
    writes and busy-polled writes: no error response, no verify mismatch, and
    blkback's totals equal to blkring's for each disk."""
    rec = _run("ring-behaviours", lab_run)
    assert rec["verdict"] == "PASS", rec.get("summary")
    by_disk = {w["disk"]: w["result"]["extra"] for w in rec["workloads"]}
    assert by_disk["xvdb"]["ring"]["indirect"] and by_disk["xvdb"]["ring"]["pages"] == 2
    assert by_disk["xvdb"]["completed"]["flush"] > 0 and by_disk["xvdb"]["completed"]["discard"] > 0
    assert by_disk["xvdc"]["verify"]["checked"] > 0 and by_disk["xvdc"]["verify"]["mismatches"] == 0
    assert by_disk["xvde"]["ring"]["queues"] == 2 and all(q["completed"] > 0 for q in by_disk["xvde"]["ring"]["per_queue"])
    assert all(d["totals_match"] for d in rec["drain"].values()), rec["drain"]
