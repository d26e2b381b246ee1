"""lab/report.py: the results directory, the counters CSV and the verdict codes
(architecture.md, "Verdicts")."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from labdata import DATA, csv_rows, track_from_rows

from lab import report
from lab.watchdog import BackendPoint, GuestPoint, Track


# ------------------------------------------------------------ verdict codes
@pytest.mark.parametrize(
    ("verdict", "exit_code", "bisect_code"),
    [("PASS", 0, 0), ("FAIL", 1, 1), ("HANG", 2, 1), ("CRASH", 3, 1), ("ERROR", 4, 125)],
)
def test_verdicts_shall_map_to_the_documented_exit_and_bisect_codes(verdict: str, exit_code: int,
                                                                    bisect_code: int) -> None:
    assert report.EXIT_CODES[verdict] == exit_code
    assert report.BISECT_CODES[verdict] == bisect_code


def test_every_verdict_shall_have_both_codes_and_nothing_else() -> None:
    assert set(report.EXIT_CODES) == set(report.BISECT_CODES) == set(report.VERDICTS)
    assert len(set(report.EXIT_CODES.values())) == len(report.VERDICTS), "exit codes tell verdicts apart"


# ------------------------------------------------------------ results directory
def test_make_results_dir_shall_create_scenario_stamp_and_point_latest_at_it(tmp_path: Path) -> None:
    d = report.make_results_dir(tmp_path, "default")
    assert d.is_dir() and d.parent == tmp_path / "default"
    assert len(d.name) == len("20261125T225658Z") and d.name.endswith("Z") and d.name[8] == "T"
    latest = tmp_path / "latest"
    assert latest.is_symlink()
    assert not os.readlink(latest).startswith("/"), "relative: the results tree can move"
    assert latest.resolve() == d.resolve()


def test_make_results_dir_shall_give_distinct_dirs_within_one_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "utc_stamp", lambda t=None: "20261125T225658Z")
    dirs = [report.make_results_dir(tmp_path, "default") for _ in range(3)]
    assert [d.name for d in dirs] == ["20261125T225658Z", "20261125T225658Z-2", "20261125T225658Z-3"]
    assert all(d.is_dir() for d in dirs)
    assert (tmp_path / "latest").resolve() == dirs[-1].resolve()


def test_make_results_dir_twice_with_the_real_clock_shall_give_two_dirs(tmp_path: Path) -> None:
    a = report.make_results_dir(tmp_path, "s")
    b = report.make_results_dir(tmp_path, "s")
    assert a != b and a.is_dir() and b.is_dir()
    assert (tmp_path / "latest").resolve() == b.resolve()


def test_latest_shall_follow_the_newest_run_across_scenarios(tmp_path: Path) -> None:
    report.make_results_dir(tmp_path, "default")
    other = report.make_results_dir(tmp_path, "other")
    assert (tmp_path / "latest").resolve() == other.resolve()
    assert not list(tmp_path.glob(".latest.*")), "no temporary link left behind"


def test_utc_stamp_shall_be_utc() -> None:
    assert report.utc_stamp(0) == "19700101T000000Z"
    assert report.utc_stamp(1795647532) == "20261125T225852Z"  # fio's timestamp in the captured run


# ------------------------------------------------------------ counters.csv
def test_write_series_shall_write_the_header_and_one_row_per_sample(tmp_path: Path) -> None:
    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    tr.guest_pts += [GuestPoint(1.5, 10, 2), GuestPoint(0.5, 0, 0)]
    stats = {"oo_req": 0, "rd_req": 5, "wr_req": 6, "f_req": 0, "ds_req": 0, "rd_sect": 40, "wr_sect": 48,
             "backing_inflight": 1, "taken": 11, "not_a_column": 99}
    tr.backend_pts.append(BackendPoint(1.0, stats))
    path = tmp_path / "counters.csv"
    assert report.write_series(path, [tr]) == 3
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.CSV_FIELDS
        rows = list(reader)
    assert [(r["t"], r["source"]) for r in rows] == [("0.5", "guest"), ("1.0", "dom0"), ("1.5", "guest")]
    assert rows[1]["taken"] == "11" and rows[1]["completed"] == "" and rows[1]["vbd"] == "vbd-1-51728"
    assert rows[2]["completed"] == "10" and rows[2]["inflight"] == "2" and rows[2]["taken"] == ""


def test_write_series_shall_round_trip_the_counters_of_a_real_run(tmp_path: Path) -> None:
    """Tracks rebuilt from a run's counters.csv write back the same table."""
    for name in ("counters-default-pass.csv", "counters-dm-suspend-hang.csv"):
        rows = csv_rows(name)
        out = tmp_path / name
        assert report.write_series(out, [track_from_rows(rows)]) == len(rows)
        with open(out, newline="") as f:
            assert list(csv.DictReader(f)) == rows
        assert out.read_text().splitlines()[0] == (DATA / name).read_text().splitlines()[0]


def test_write_series_of_no_tracks_shall_write_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    assert report.write_series(path, []) == 0
    assert path.read_text().strip() == ",".join(report.CSV_FIELDS)


def test_counter_summary_shall_give_first_last_and_delta() -> None:
    """On the PASS run blkback's rd_req/wr_req deltas are the requests of the
    workload: fio's own read and write total_ios in the captured JSON."""
    s = report.counter_summary(track_from_rows(csv_rows("counters-default-pass.csv")))
    fio = json.loads((DATA / "fio-default-tcg.json").read_text())["jobs"][0]
    assert s["delta"]["rd_req"] == fio["read"]["total_ios"] == 18516
    assert s["delta"]["wr_req"] == fio["write"]["total_ios"] == 18344
    assert s["first"]["taken"] == 54 and s["last"]["taken"] == 36914
    assert report.counter_summary(Track("g", "xvdb", "vbd", 32)) == {}


def test_write_record_shall_leave_a_complete_json_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    report.write_record(path, {"verdict": "PASS", "results_dir": tmp_path})
    assert json.loads(path.read_text()) == {"verdict": "PASS", "results_dir": str(tmp_path)}
    assert not list(tmp_path.glob("*.tmp"))


def test_summary_lines_shall_say_verdict_stage_and_workload_figures() -> None:
    rec = {
        "verdict": "ERROR", "scenario": "default", "wall_s": 12.4, "accel": "tcg", "stage": "boot:dom0",
        "error": "no dom0's init", "summary": "the lab failed",
        "workloads": [{"guest": "lin1", "disk": "xvdb", "result": {"iops": 1226.9, "clat_p99_ms": 316.67,
                                                                    "errors": 0},
                       "ring_capacity": 32, "peak_inflight_guest": 32, "peak_inflight_backing": 17}],
        "phases": {"boot": 50.04}, "results_dir": "results/default/x",
    }
    text = "\n".join(report.summary_lines(rec))
    assert text.splitlines()[0] == "ERROR  default  (12s, accel tcg)"
    assert "stage boot:dom0: no dom0's init" in text
    assert "lin1/xvdb: 1227 IOPS, p99 316.67 ms, errors 0; ring 32 vs peak in flight guest 32 / backing 17" in text
    assert "phases: boot 50.0s" in text and "results: results/default/x" in text


def test_two_claims_in_one_second_get_two_directories(tmp_path: Path) -> None:
    """Two bisects (or runs) started in the same second under one results root
    each get a directory of their own (a plain mkdir made the second fail)."""
    from lab import report

    a, b = report.claim(tmp_path / "bisect"), report.claim(tmp_path / "bisect")
    assert a != b and a.is_dir() and b.is_dir()
