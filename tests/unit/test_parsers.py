"""Structured tool output into numbers: fio's JSON (lab/workload.py), the guest's
/sys/block/X/stat (lab/platform/linux/guest.py) and blkback's statistics
(lab/platform/linux/dom0.py), on the
captured output of a real `lab run default`. Expected figures are computed here
from the raw data and the kernel's field layout, not taken from the code."""

from __future__ import annotations

import configparser
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from labdata import DATA, FakeRunner, csv_rows, sample_values

from lab import platform, platforms, scenario, workload, xen
from lab.errors import LabError
from lab.platform.linux import dom0, guest

FIO = DATA / "fio-default-tcg.json"

# Documentation/block/stat.rst, in order
BLOCK_STAT_FIELDS = (
    "read_ios", "read_merges", "read_sectors", "read_ticks",
    "write_ios", "write_merges", "write_sectors", "write_ticks",
    "in_flight", "io_ticks", "time_in_queue",
    "discard_ios", "discard_merges", "discard_sectors", "discard_ticks",
    "flush_ios", "flush_ticks",
)


# ------------------------------------------------------------ fio
@pytest.fixture(scope="module")
def fio_json() -> dict:
    return json.loads(FIO.read_text())


def test_parse_fio_shall_agree_with_the_json_fields(fio_json: dict) -> None:
    (job,) = fio_json["jobs"]  # group_reporting: one entry for the 4 jobs
    rd, wr, tr = job["read"], job["write"], job["trim"]
    res = workload.parse_fio(FIO.read_text())
    assert res.tool == "fio"
    assert res.read_iops == pytest.approx(rd["iops"], abs=0.05)
    assert res.write_iops == pytest.approx(wr["iops"] + tr["iops"], abs=0.05)
    assert res.iops == pytest.approx(res.read_iops + res.write_iops)
    assert res.iops == pytest.approx(rd["iops"] + wr["iops"], abs=0.1)
    assert res.read_bw_kib == pytest.approx(rd["bw"]) and res.write_bw_kib == pytest.approx(wr["bw"])
    assert res.ios == rd["total_ios"] + wr["total_ios"] + tr["total_ios"]
    assert res.errors == job["error"] == 0
    pct = {s: job[s]["clat_ns"]["percentile"] for s in ("read", "write")}
    assert res.clat_p50_ms == pytest.approx(max(p["50.000000"] for p in pct.values()) / 1e6, abs=1e-3)
    assert res.clat_p99_ms == pytest.approx(max(p["99.000000"] for p in pct.values()) / 1e6, abs=1e-3)
    assert res.clat_p999_ms == pytest.approx(max(p["99.900000"] for p in pct.values()) / 1e6, abs=1e-3)
    assert res.clat_max_ms == pytest.approx(max(rd["clat_ns"]["max"], wr["clat_ns"]["max"]) / 1e6, abs=1e-3)
    assert res.clat_max_ms >= res.clat_p999_ms >= res.clat_p99_ms >= res.clat_p50_ms > 0
    assert res.extra["fio_version"] == fio_json["fio version"] == "fio-3.33"


def test_parse_fio_runtime_shall_be_the_wall_runtime_not_the_sum_over_jobs(fio_json: dict) -> None:
    """With group_reporting, fio's `job_runtime` adds up the runtime of all numjobs
    jobs (here 4 x 30 s); the workload ran for read/write `runtime` ms (30 s as the
    job asked, `elapsed` 31 s)."""
    (job,) = fio_json["jobs"]
    res = workload.parse_fio(FIO.read_text())
    assert res.runtime_s == pytest.approx(max(job["read"]["runtime"], job["write"]["runtime"]) / 1000)
    assert res.runtime_s == pytest.approx(30, abs=1)
    assert res.runtime_s <= job["elapsed"]


def test_fio_io_counts_shall_match_the_guests_block_stat_deltas() -> None:
    """Two independent views of the same run: fio's total_ios per direction equals
    what /sys/block/xvdb/stat counted between the first and the last sample."""
    fio = json.loads(FIO.read_text())["jobs"][0]
    stats = [dict(zip(BLOCK_STAT_FIELDS, map(int, v[0].split()), strict=True))
             for _, v in sample_values("samples-lin1-default.jsonl")]
    assert stats[-1]["read_ios"] - stats[0]["read_ios"] == fio["read"]["total_ios"]
    assert stats[-1]["write_ios"] - stats[0]["write_ios"] == fio["write"]["total_ios"]
    first, last = (guest.parse_block_stat(v[0]) for v in (sample_values("samples-lin1-default.jsonl")[i][1]
                                                           for i in (0, -1)))
    assert first is not None and last is not None
    assert last["completed"] - first["completed"] == workload.parse_fio(FIO.read_text()).ios


def test_parse_fio_shall_skip_leading_warnings() -> None:
    text = FIO.read_text()
    noisy = "fio: note: both iodepth >= 1 and synchronous I/O engine are selected\nwarning: xvdb: line 2\n" + text
    assert workload.parse_fio(noisy) == workload.parse_fio(text)


@pytest.mark.parametrize("text", ["", "fio: failed to open /dev/xvdb: No such file\n", "{not json",
                                  '{"fio version": "fio-3.33", "jobs": []}', '{"fio version": "fio-3.33"}'])
def test_parse_fio_shall_raise_value_error_without_a_result(text: str) -> None:
    with pytest.raises(ValueError):
        workload.parse_fio(text)


def test_parse_fio_shall_count_errors_and_trim_as_writes() -> None:
    data = {"fio version": "fio-3.33", "jobs": [
        {"error": 5, "job_runtime": 1000,
         "read": {"iops": 10.0, "bw": 40, "total_ios": 100, "runtime": 1000,
                  "clat_ns": {"max": 9e6, "percentile": {"50.000000": 1e6, "99.000000": 3e6, "99.900000": 8e6}}},
         "write": {"iops": 0, "bw": 0, "total_ios": 0, "runtime": 0},
         "trim": {"iops": 5.0, "bw": 20, "total_ios": 50, "runtime": 1000,
                  "clat_ns": {"max": 2e6, "percentile": {"50.000000": 2e6, "99.000000": 2e6}}}},
    ]}
    res = workload.parse_fio(json.dumps(data))
    # `error` is the errno of the first error (5 = EIO), not a count: at least one error
    assert res.errors == 1
    assert (res.read_iops, res.write_iops, res.ios) == (10.0, 5.0, 150)
    assert (res.clat_p50_ms, res.clat_p99_ms, res.clat_max_ms) == (2.0, 3.0, 9.0)
    assert res.runtime_s == pytest.approx(1.0)
    assert res.as_dict()["iops"] == 15.0


def test_parse_fio_shall_count_every_error_under_continue_on_error() -> None:
    """With continue_on_error fio keeps going and counts errors in total_err."""
    data = {"jobs": [{"error": 5, "total_err": 7, "read": {"total_ios": 3}, "write": {}},
                     {"error": 0, "total_err": 0, "read": {"total_ios": 3}, "write": {}}]}
    assert workload.parse_fio(json.dumps(data)).errors == 7


def _job(w: scenario.WorkloadCfg, device: str = "/dev/xvdb") -> dict[str, str]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(workload.fio_job(w, device))
    assert cp.sections() == ["global", "lab"]
    return dict(cp["global"])


def test_fio_job_of_the_default_preset_shall_be_what_fio_echoed_in_the_captured_run() -> None:
    """fio writes the job's global options back into its JSON: the job rendered for
    the default preset now shall be the one that produced the captured result."""
    (w,) = scenario.load("default").workloads
    assert _job(w) == json.loads(FIO.read_text())["global options"]


def test_fio_job_shall_hold_the_workload_settings() -> None:
    w = scenario.WorkloadCfg(guest="g", disk="xvdc", iodepth=8, numjobs=3, bssplit="4k/100", rwmixread=70,
                             runtime=scenario.Duration(90.7), ioengine="io_uring")
    job = _job(w, "/dev/xvdc")
    assert job["filename"] == "/dev/xvdc"
    assert (job["iodepth"], job["numjobs"], job["bssplit"]) == ("8", "3", "4k/100")
    assert job["direct"] == "1" and job["rwmixread"] == "70" and job["ioengine"] == "io_uring"
    assert job["runtime"] == "90s" and job["time_based"] == "1"
    assert "size" not in job
    job = _job(replace(w, direct=False, size="100M", extra={"verify": "crc32c", "iodepth": "2"}))
    assert job["direct"] == "0" and job["size"] == "100M" and job["verify"] == "crc32c"
    assert job["iodepth"] == "2", "extra options override the defaults"


def test_fio_argv_shall_ask_for_json_in_a_file() -> None:
    assert workload.fio_argv("/run/lab/fio-0.job", "/run/lab/fio-0.json") == [
        "fio", "--output-format=json", "--output=/run/lab/fio-0.json", "--eta=never", "/run/lab/fio-0.job"]


# ------------------------------------------------------------ guest: /sys/block/X/stat
def test_parse_block_stat_shall_follow_the_kernel_field_layout_on_every_sample() -> None:
    samples = sample_values("samples-lin1-default.jsonl")
    assert len(samples) == 33
    for _, v in samples:
        (text,) = v
        f = dict(zip(BLOCK_STAT_FIELDS, map(int, text.split()), strict=True))
        got = guest.parse_block_stat(text)
        assert got == {
            "reads": f["read_ios"], "writes": f["write_ios"], "discards": f["discard_ios"],
            "flushes": f["flush_ios"], "inflight": f["in_flight"],
            "completed": f["read_ios"] + f["write_ios"] + f["discard_ios"] + f["flush_ios"],
            "sectors_read": f["read_sectors"], "sectors_written": f["write_sectors"],
        }


def test_parse_block_stat_shall_give_the_counters_csv_series() -> None:
    """The i-th guest sample is the i-th guest row of the run's counters.csv."""
    rows = [r for r in csv_rows("counters-default-pass.csv") if r["source"] == "guest"]
    samples = sample_values("samples-lin1-default.jsonl")
    assert len(rows) == len(samples)
    for r, (t, v) in zip(rows, samples, strict=True):
        got = guest.parse_block_stat(v[0])
        assert got is not None
        assert (got["completed"], got["inflight"]) == (int(r["completed"]), int(r["inflight"]))
        assert abs(float(r["t"]) - t) < 0.01


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 2 3 4 5 6 7 8 9 10 11", {"reads": 1, "writes": 5, "discards": 0, "flushes": 0, "completed": 6,
                                     "inflight": 9, "sectors_read": 3, "sectors_written": 7}),  # before 4.18
        ("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", {"reads": 1, "writes": 5, "discards": 12, "flushes": 0,
                                                 "completed": 18, "inflight": 9, "sectors_read": 3,
                                                 "sectors_written": 7}),
        ("  1 0 7 0  2 0 8 0 3 0 0  4 0 0 0  5 0 \n", {"reads": 1, "writes": 2, "discards": 4, "flushes": 5,
                                                     "completed": 12, "inflight": 3, "sectors_read": 7,
                                                     "sectors_written": 8}),
    ],
)
def test_parse_block_stat_shall_read_older_and_newer_layouts(text: str, expected: dict) -> None:
    assert guest.parse_block_stat(text) == expected


@pytest.mark.parametrize("text", [None, "", "1 2 3", "1 2 3 4 5 6 7 8 9 10", "1 2 3 4 5 6 7 8 -9 10 11",
                                  "a b c d e f g h i j k", "cat: /sys/block/xvdb/stat: No such file"])
def test_parse_block_stat_shall_give_none_for_a_missing_or_bad_sample(text: str | None) -> None:
    assert guest.parse_block_stat(text) is None


# ------------------------------------------------------------ dom0: blkback statistics
def test_parse_vbd_sample_shall_name_each_value_on_every_sample() -> None:
    samples = sample_values("samples-dom0-default.jsonl")
    assert len(samples) == 33
    for _, v in samples:
        assert len(v) == 8
        named = dict(zip(("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect"),
                         (int(x) for x in v[:7]), strict=True))
        reads_inflight, writes_inflight = (int(x) for x in v[7].split())  # /sys/block/dm-N/inflight
        got = dom0.parse_vbd_sample(v)
        assert got == {**named, "backing_inflight": reads_inflight + writes_inflight,
                       "taken": named["rd_req"] + named["wr_req"] + named["f_req"] + named["ds_req"]}


def test_parse_vbd_sample_shall_give_the_counters_csv_series() -> None:
    rows = [r for r in csv_rows("counters-default-pass.csv") if r["source"] == "dom0"]
    samples = sample_values("samples-dom0-default.jsonl")
    assert len(rows) == len(samples)
    for r, (_, v) in zip(rows, samples, strict=True):
        got = dom0.parse_vbd_sample(v)
        assert got is not None
        assert {k: str(n) for k, n in got.items()} == {k: r[k] for k in got}


def test_backend_and_guest_shall_agree_once_drained() -> None:
    """At the end of a healthy run blkback took exactly what the guest completed,
    per direction, sectors included."""
    (_, gv), (_, dv) = sample_values("samples-lin1-default.jsonl")[-1], sample_values("samples-dom0-default.jsonl")[-1]
    g = dict(zip(BLOCK_STAT_FIELDS, map(int, gv[0].split()), strict=True))
    b = dom0.parse_vbd_sample(dv)
    p = guest.parse_block_stat(gv[0])
    assert b is not None and p is not None
    assert (b["rd_req"], b["wr_req"]) == (g["read_ios"], g["write_ios"])
    assert (b["rd_sect"], b["wr_sect"]) == (g["read_sectors"], g["write_sectors"])
    assert b["taken"] == p["completed"] and b["backing_inflight"] == 0 == p["inflight"]


GOOD = ["0 ", "54 ", "0 ", "0 ", "0 ", "2112 ", "0 ", "       3        4 "]


@pytest.mark.parametrize(
    "values",
    [
        [None, *GOOD[1:]],
        [*GOOD[:-1], None],
        GOOD[:-1],  # 7: the inflight file missing
        [*GOOD, "0 "],  # 9
        [],
        ["x", *GOOD[1:]],
        [*GOOD[:-1], "3"],  # inflight needs reads and writes
        [*GOOD[:-1], ""],
    ],
)
def test_parse_vbd_sample_shall_give_none_on_nulls_wrong_lengths_or_junk(values: list[str | None]) -> None:
    assert dom0.parse_vbd_sample(values) is None


def test_parse_vbd_sample_shall_sum_taken_and_backing_inflight() -> None:
    got = dom0.parse_vbd_sample(["1", "10", "20", "3", "4", "80", "160", "5 6"])
    assert got is not None
    assert got["taken"] == 10 + 20 + 3 + 4
    assert got["backing_inflight"] == 11
    assert got["oo_req"] == 1, "oo_req is not a request taken"


def test_parse_key_values_shall_keep_key_equals_value_lines() -> None:
    text = "kernel=6.1.0-56-amd64\nmodule_path=\nparam.max_ring_page_order= 4 \nno equals sign\n=orphan\nk=a=b\n"
    assert dom0.parse_key_values(text) == {
        "kernel": "6.1.0-56-amd64", "module_path": "", "param.max_ring_page_order": "4", "k": "a=b"}


# ------------------------------------------------------------ dom0 / guest over a fake runner
def test_stat_paths_shall_line_up_with_parse_vbd_sample() -> None:
    b = platform.Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-0")
    paths = dom0.LinuxDom0(FakeRunner(), timeout=5).stat_paths("vbd-1-51728", b)
    assert len(paths) == len(dom0.VBD_STATS) + 1
    assert [p.rsplit("/", 1)[-1] for p in paths[:-1]] == list(dom0.VBD_STATS)
    # through the link named after the backing device, which point_vbd moves
    assert all(p.startswith("/run/lab/vbd/lab-lin1-xvdb/statistics/") for p in paths[:-1])
    assert paths[-1] == "/sys/block/dm-0/inflight"


def test_the_dom0_sampler_shall_link_each_disk_then_read_through_the_links() -> None:
    b = platform.Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-0")
    v = xen.VbdInfo(1, 51728, "xvdb", "vbd", "phy", "", "", "4", "4", 0, 1, 0, False)
    r = FakeRunner()
    d = dom0.LinuxDom0(r, timeout=5)
    argv = d.sample_argv("0.5", [(v, b)])
    assert argv[:2] == ["sh", "-c"]
    assert argv[2].startswith("mkdir -p /run/lab/vbd && ln -sfn /sys/bus/xen-backend/devices/vbd-1-51728 "
                              "/run/lab/vbd/lab-lin1-xvdb && exec lab-sample 0.5 /run/lab/vbd/lab-lin1-xvdb/")
    d.point_vbd(b, "vbd-4-51728")  # after a save-restore the disk is domain 4's
    assert "ln -sfn /sys/bus/xen-backend/devices/vbd-4-51728 /run/lab/vbd/lab-lin1-xvdb" in " ".join(r.calls[-1])


def test_disk_by_serial_shall_need_exactly_one_match() -> None:
    assert dom0.LinuxDom0(FakeRunner("/sys/block/vdc\n"), timeout=5).disk_by_serial("lab-lin1-xvdb") == "/dev/vdc"
    for out in ("", "/sys/block/vdb\n/sys/block/vdc\n"):
        with pytest.raises(LabError) as e:
            dom0.LinuxDom0(FakeRunner(out), timeout=5).disk_by_serial("s")
        assert e.value.stage == "guest:disk"


def test_make_backing_shall_name_the_dm_device_by_its_minor() -> None:
    r = FakeRunner("minor=7\n")
    b = dom0.LinuxDom0(r, timeout=5).make_backing("lab-lin1-xvdb", "/dev/vdc")
    assert b == platform.Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-7")
    (argv,) = r.calls
    assert argv[:2] == ["sh", "-c"] and "dmsetup create --noudevsync lab-lin1-xvdb" in argv[2]


def test_dom0_shell_failure_shall_raise_with_the_stage() -> None:
    with pytest.raises(LabError) as e:
        dom0.LinuxDom0(FakeRunner(rc=1), timeout=5).make_backing("x", "/dev/vdc")
    assert e.value.stage == "guest:disk"


def test_remove_backing_shall_resume_then_remove() -> None:
    r = FakeRunner()
    dom0.LinuxDom0(r, timeout=5).remove_backing(platform.Backing("d", "/dev/mapper/d", "/dev/vdc", "dm-0"))
    assert r.calls == [["dmsetup", "resume", "--noudevsync", "d"], ["dmsetup", "remove", "--noudevsync", "d"]]


def test_linux_guest_shall_read_its_disk_and_blkfront_parameters() -> None:
    g = guest.LinuxGuest()
    assert g.disk_device("xvdb") == "/dev/xvdb"
    assert g.stat_argv("1.0", ["xvdb", "xvdc"]) == ["lab-sample", "1.0", "/sys/block/xvdb/stat", "/sys/block/xvdc/stat"]
    r = FakeRunner("max_queues:1\nmax_ring_page_order:0\nmax_indirect_segments:32\n")
    assert g.blkfront_params(r, timeout=5) == {"max_queues": "1", "max_ring_page_order": "0",
                                               "max_indirect_segments": "32"}


@pytest.mark.parametrize(("order", "queues", "line"), [
    (0, 1, "modprobe -r xen_blkfront 2>/dev/null; modprobe xen_blkfront max_ring_page_order=0 max_queues=1"),
    (-1, 2, "modprobe -r xen_blkfront 2>/dev/null; modprobe xen_blkfront max_queues=2"),
    (-1, -1, "modprobe -r xen_blkfront 2>/dev/null; modprobe xen_blkfront"),
])
def test_linux_guest_shall_reload_blkfront_with_the_scenario_limits(order: int, queues: int, line: str) -> None:
    g = scenario.GuestCfg(name="lin1", max_ring_page_order=order, max_queues=queues)
    # and, only if the load worked, what it took (read back in the same round trip)
    assert guest.LinuxGuest.frontend_argv(g) == ["sh", "-c", f"{line} && {guest.BLKFRONT_PARAMS}"]
    # captured from a real guest after that command (scenario default: order 0, 1 queue)
    took = "max_indirect_segments:32\nmax_queues:1\nmax_ring_page_order:0\nfeature_persistent:Y\n"
    assert guest.LinuxGuest.parse_blkfront_params(took) == {
        "max_indirect_segments": "32", "max_queues": "1", "max_ring_page_order": "0", "feature_persistent": "1"}


def test_os_tables_shall_map_linux() -> None:
    assert type(platforms.dom0_platform("linux")).__name__ == "LinuxPlatform"
    assert isinstance(platforms.guest_platform("linux"), guest.LinuxGuest)


def test_teardown_leftovers_shall_name_nodes_threads_and_open_devices() -> None:
    """`backend_leftovers`' output, constructed in the format its script prints
    (xenstore-ls -f lines, ps comm names, dmsetup open counts). The ring thread's
    name is as `ps -eo comm=` printed it in a real dom0 (lab ssh dom0 of a kept
    ring-reconnect run, 2026-11-30: `1.xvdb-0`, among `vif1.0-q0-guest-rx`,
    `kdmflush/253:0` and the like, which must not count)."""
    text = ("xs:/local/domain/0/backend/vbd/1/51728/state = \"6\"\n"
            "xs:/local/domain/0/backend/vbd/1/51728/params = \"/dev/mapper/lab-lin1-xvdb\"\n"
            "xs:/local/domain/0/backend/vbd/7/51728/state = \"4\"\n"  # another domain: not ours
            "thread:1.xvdb-0\nthread:7.xvdb-0\n"  # domain 7's ring thread: not ours
            "open:lab-lin1-xvdb:1\nopen:lab-lin1-xvdc:0\n")
    assert dom0.parse_leftovers(text, [1]) == [
        "/local/domain/0/backend/vbd/1/51728 still in xenstore",
        "blkback ring thread 1.xvdb-0 still running",
        "backing device lab-lin1-xvdb still held open (1 opener(s)): blkback did not release it",
    ]
    assert dom0.parse_leftovers("open:lab-lin1-xvdb:0\n", [1]) == []


def test_boot_files_under_a_path_with_a_space_shall_be_linked_from_one_without(tmp_path: Path) -> None:
    """QEMU's -initrd cannot say a module path with a space; a LAB_CACHE with one
    gets its Xen, kernel and initrd linked from a private directory."""
    from lab.platform.linux.platform import space_free

    spaced = tmp_path / "lab cache $x"
    spaced.mkdir()
    files = [spaced / n for n in ("xen", "vmlinuz", "initrd.img")]
    for f in files:
        f.write_bytes(f.name.encode())
    d = space_free(*files)
    try:
        assert d is not None and " " not in str(d)
        assert [(d / n).read_bytes() for n in ("xen", "vmlinuz", "initrd.img")] == [b"xen", b"vmlinuz", b"initrd.img"]
    finally:
        if d is not None:
            import shutil

            shutil.rmtree(d)
    assert space_free(*(tmp_path / n for n in ("a", "b", "c"))) is None


def test_backing_by_serial_shall_find_the_disk_and_make_the_dm_device_in_one_round_trip() -> None:
    r = FakeRunner("lower=/dev/vdc\nminor=7\n")
    b = dom0.LinuxDom0(r, timeout=5).backing_by_serial("lab-lin1-xvdb")
    assert b == platform.Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-7")
    (argv,) = r.calls
    assert argv[:2] == ["sh", "-c"] and "dmsetup create --noudevsync lab-lin1-xvdb" in argv[2]
    assert subprocess.run(["sh", "-n", "-c", argv[2]]).returncode == 0


@pytest.mark.parametrize("out", ["", "lower=/dev/vdc\nminor=\n"])
def test_backing_by_serial_that_made_nothing_shall_be_the_labs_failure(out: str) -> None:
    with pytest.raises(LabError) as e:
        dom0.LinuxDom0(FakeRunner(out), timeout=5).backing_by_serial("lab-lin1-xvdb")
    assert e.value.stage == "guest:disk" and "lab-lin1-xvdb" in str(e.value)
