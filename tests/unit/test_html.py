"""lab/svgplot.py and lab/html.py: the report shall turn running totals into rates,
data into pixel paths inside the plot, a HANG into a marker and a fault into a
shaded window; it shall render from any results directory (a PASS, a HANG, an
ERROR with nothing sampled, a bisect) without the network, and `lab results`
shall list the runs under a root."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lab import cli, html, svgplot
from lab.svgplot import Band, Box, Chart, Marker, Series

DATA = Path(__file__).resolve().parent.parent / "data"
PASS_DIR, HANG_DIR = DATA / "run-default-pass", DATA / "run-stall-hang"


@pytest.mark.parametrize(("points", "want"), [
    ([], []),
    ([(0.0, 5.0)], []),
    ([(0.0, 0.0), (1.0, 100.0), (3.0, 300.0)], [(1.0, 100.0), (3.0, 100.0)]),
    ([(0.0, 0.0), (0.0, 50.0), (2.0, 100.0)], [(2.0, 50.0)]),  # no time passed: skipped, the first kept
    ([(0.0, 100.0), (1.0, 40.0)], [(1.0, 0.0)]),  # a total that went down is no negative rate
])
def test_rates_difference_running_totals(points: list, want: list) -> None:
    assert svgplot.rates(points) == want


@pytest.mark.parametrize(("v", "want"), [
    (0, 1.0), (-3, 1.0), (1, 1.0), (1.2, 2.0), (2.1, 2.5), (33.5, 50.0), (34.56, 50.0), (170, 200.0),
    (1800, 2000.0), (2000, 2000.0), (0.03, 0.05), (float("nan"), 1.0),
])
def test_nice_ceiling(v: float, want: float) -> None:
    assert svgplot.nice_ceiling(v) == pytest.approx(want)


def test_svg_path_maps_data_into_the_box_and_clips() -> None:
    box = Box(left=10, top=20, width=100, height=50)
    d = svgplot.svg_path([(0, 0), (5, 10), (10, 20), (20, 40)], box, x_max=10, y_max=20)
    # x: 10 + 100 * t/10; y: 20 + 50 * (1 - v/20); the last point is clipped to the corner
    assert d == "M10.0 70.0 L60.0 45.0 L110.0 20.0 L110.0 20.0"
    assert svgplot.svg_path([], box, x_max=10, y_max=20) == ""


def test_step_path_holds_each_level_until_the_next_sample() -> None:
    box = Box(0, 0, 10, 10)
    assert svgplot.step_path([(0, 0), (5, 10), (10, 0)], box, x_max=10, y_max=10) == \
        "M0.0 10.0 L5.0 10.0 L5.0 0.0 L10.0 0.0 L10.0 10.0"


def test_layout_shades_faults_marks_hangs_and_draws_the_ring() -> None:
    c = Chart("in flight", "requests", (Series("guest", ((0, 0), (10, 32), (40, 32)), "#000", step=True),),
              bands=(Band(20, None, "fault: stall"),), markers=(Marker(36, "HANG detected", "#f00"),),
              hlines=((32.0, "ring capacity 32"),))
    lay = svgplot.layout(c, width=640, height=220)
    assert lay.box.width == 572 and not lay.empty
    (band,) = lay.bands
    x_max = 50.0  # nice_ceiling(40)
    assert band["x"] == pytest.approx(56 + 572 * 20 / x_max, abs=0.1)
    assert band["x"] + band["w"] == pytest.approx(56 + 572, abs=0.2)  # still in force: to the end
    assert lay.markers[0]["x"] == pytest.approx(56 + 572 * 36 / x_max, abs=0.1)
    assert lay.hlines[0]["y"] == pytest.approx(24 + 162 * (1 - 32 / 50), abs=0.1)  # y axis to 50 (32 * 1.08)
    assert lay.paths[0]["d"].startswith("M56.0 186.0")
    assert [t["label"] for t in lay.xticks] == ["0", "10", "20", "30", "40", "50"]


def test_timeline_orders_phases_and_nests_their_steps() -> None:
    # the order a run records them in (pipeline.run): guests, save, backend, attach
    spans = svgplot.timeline({"images": 2, "boot": 19, "mount_boot_disk": 1, "xl_create_lin1": 10,
                              "guest_ssh_lin1": 13, "guests": 25, "save": 2, "backend": 1, "attach": 7,
                              "workload": 34, "fio": 32.5, "drain": 1, "teardown": 2, "evidence": 12,
                              "odd": "x"})  # type: ignore[dict-item]
    top = [(s.name, s.start) for s in spans if s.level == 0]
    assert top == [("images", 0), ("boot", 2), ("guests", 21), ("save", 46), ("backend", 48), ("attach", 49),
                   ("workload", 56), ("evidence", 90), ("teardown", 102)]
    inner = {s.name: (s.start, s.level) for s in spans if s.level == 1}
    assert inner["xl_create_lin1"] == (22, 1) and inner["fio"] == (56, 1) and inner["drain"] == (88.5, 1)


def test_counters_csv_splits_into_disks() -> None:
    disks = html.read_counters(PASS_DIR / "counters.csv")
    (d,) = disks.values()
    assert (d.key, d.vbd, d.backend) == ("lin1/xvdb", "vbd-1-51728", "blkback")
    assert len(d.completed) == len(d.inflight) == 32 and len(d.backing_inflight) == 32
    assert d.completed[-1][1] == 50319 and d.counters["taken"][-1][1] == 50319


def test_xbbd_counters_come_from_the_dom0_samples(tmp_path: Path) -> None:
    """A FreeBSD dom0's sampler prints the dev.xbbd nodes of each test disk; the
    report plots them (counters.csv keeps only what both backends share)."""
    text = "".join(f"dev.xbbd.0.{k}: {v}\n" for k, v in
                   (("reqs_received", 10), ("reqs_completed", 8), ("reqs_queued_for_completion", 1),
                    ("request_shortages", 0), ("kva_shortages", 0), ("max_requests", 32)))
    lines = [json.dumps({"t": t, "line": json.dumps({"v": [text if t else None]})}) for t in (0.0, 1.0)]
    (tmp_path / "samples-dom0.jsonl").write_text("\n".join([*lines, "torn {"]) + "\n")
    got = html.read_xbbd_samples(tmp_path / "samples-dom0.jsonl", ["fbsd1/xbd1"])
    assert got["fbsd1/xbd1"]["reqs_received"] == [(1.0, 10.0)]
    assert got["fbsd1/xbd1"]["backing_inflight"] == [(1.0, 1.0)]  # received - completed - queued


def _svg_count(page: str) -> int:
    return len(re.findall(r"<svg class=\"plot\"", page))


def test_report_of_a_pass_run(tmp_path: Path) -> None:
    d = shutil.copytree(PASS_DIR, tmp_path / "run")
    page = html.write_report(d).read_text()
    assert ">PASS<" in page and "all workloads finished, progressed and drained" in page
    assert _svg_count(page) == 3 and "ring capacity 32" in page and 'class="timeline"' in page
    assert "HANG detected" not in page and 'class="fault"' not in page
    assert 'href="console-lin1.log"' in page and 'href="counters.csv"' in page
    assert 'href="fio-0.json"' not in page  # listed in the record, not in this directory: no dead link
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page


def test_report_of_a_hang_marks_it_and_shades_the_fault(tmp_path: Path) -> None:
    d = shutil.copytree(HANG_DIR, tmp_path / "run")
    page = html.write_report(d).read_text()
    assert ">HANG<" in page and "completed I/Os stuck at 28179" in page
    assert page.count("HANG detected</text>") == 3 and page.count('class="fault"') == 3
    assert 'href="evidence/tail-lin1.txt"' in page
    # the hung disk's counters show what it did before it stopped, not "0 IOPS"
    assert "no result" in page and re.search(r">\s*805\s*<", page)


def test_report_of_an_error_before_sampling(tmp_path: Path) -> None:
    rec = {"scenario": "default", "verdict": "ERROR", "stage": "boot:xen", "summary": "lab failed",
           "error": "no Xen banner within 60s", "phases": {"images": 1.0, "boot": 60.0}}
    (tmp_path / "record.json").write_text(json.dumps(rec))
    page = html.write_report(tmp_path).read_text()
    assert ">ERROR<" in page and "No counters were sampled" in page and _svg_count(page) == 0


def test_compare_and_bisect_pages(tmp_path: Path) -> None:
    out = tmp_path / "bisect" / "20261130T000000Z"
    good = shutil.copytree(PASS_DIR, out / "steps" / "01-aaaaaaaaaaaa-confirm-parent")
    bad = shutil.copytree(HANG_DIR, out / "steps" / "02-bbbbbbbbbbbb-confirm-bad")
    steps = [{"n": 1, "commit": "a" * 40, "subject": "good one", "label": "confirm-parent", "verdict": "PASS",
              "code": 0, "summary": "ok", "time_s": 90.0, "record": str(good / "record.json")},
             {"n": 2, "commit": "b" * 40, "subject": "bad one", "label": "confirm-bad", "verdict": "HANG",
              "code": 1, "summary": "stuck", "time_s": 92.0, "record": "/moved/away/record.json"}]
    (out / "bisect.json").write_text(json.dumps(
        {"scenario": "stall", "repo": "/src/linux", "good": "a" * 40, "bad": "b" * 40, "runs": 1,
         "first_bad": "b" * 40, "subject": "bad one", "steps": steps, "total_s": 182.0,
         "confirm": {"first_bad_runs": ["HANG"], "parent_runs": ["PASS"], "parent": "a" * 40}}))
    page = html.write_report(out).read_text()
    assert "FIRST BAD" in page and "bbbbbbbbbbbb" in page
    assert 'href="steps/01-aaaaaaaaaaaa-confirm-parent/report.html"' in page
    assert 'href="steps/02-bbbbbbbbbbbb-confirm-bad/report.html"' in page  # found by its number
    assert (bad / "report.html").is_file() and (good / "report.html").is_file()
    cmp_page = (out / "compare-culprit-vs-parent.html").read_text()
    assert ">HANG<" in cmp_page and ">PASS<" in cmp_page and _svg_count(cmp_page) == 6


def test_cli_report_results_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    a = shutil.copytree(PASS_DIR, root / "default" / "20261130T132739Z")
    b = shutil.copytree(HANG_DIR, root / "stall" / "20261130T133126Z")
    (root / "latest").symlink_to("stall/20261130T133126Z")
    assert cli.main(["report", str(a), str(b)]) == 0
    assert (a / "report.html").is_file() and (b / "report.html").is_file()
    assert cli.main(["report", "--compare", str(a), str(b), "-o", str(tmp_path / "c.html")]) == 0
    assert (tmp_path / "c.html").is_file()
    capsys.readouterr()
    assert cli.main(["results", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("when (UTC)") and len(lines) == 3  # `latest` is not counted twice
    assert re.search(r"2026-11-30 13:27:39\s+default\s+PASS\s+1677\s+92s\s+tcg", lines[1])
    assert re.search(r"stall\s+HANG\s+-\s+90s\s+tcg", lines[2])
    assert cli.main(["report", str(tmp_path / "nothing")]) == 4
