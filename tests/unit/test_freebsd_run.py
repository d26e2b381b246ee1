"""A FreeBSD dom0 in the run: the dom0 class (disks, gnop, kernel check), the
xbbd sampler script, the VM argv, the nested-KVM check, the kernel source hash
and the config-disk ISO.

The sampler runs for real under this machine's POSIX sh and awk, with a stand-in
`sysctl` on PATH printing the constructed `sysctl dev.xbbd` output of
tests/data/freebsd (no FreeBSD dom0 can run here: see its README); the ISO is made
by the real genisoimage and read back with isoinfo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from labdata import FakeRunner, xbbd_samples

from lab import dom0, freebsd, qemu, scenario
from lab.errors import LabError, ScenarioError
from lab.watchdog import BackendPoint, GuestPoint, Track, accounting_mismatches
from lab.xen import VbdInfo


def vbd(domid: int, devid: int) -> VbdInfo:
    return VbdInfo(domid=domid, devid=devid, vdev="xvdb", backend_kind="vbd", backend_type="phy", params="",
                   physical_device="", state_frontend="4", state_backend="4", ring_page_order=0, num_queues=1,
                   max_indirect_segments=0, persistent=True)


# ------------------------------------------------------------ the sampler script
def run_sampler(tmp_path: Path, text: str, wanted: list[str]) -> list[str | None]:
    """One line of the real sampler script, under sh and awk, its `sysctl` a
    stand-in printing `text`."""
    (tmp_path / "tree.txt").write_text(text)
    stub = tmp_path / "bin" / "sysctl"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\n[ "$1" = dev.xbbd ] || exit 1\ncat {tmp_path / "tree.txt"}\n')
    stub.chmod(0o755)
    argv = dom0.FreeBsdDom0(FakeRunner(), timeout=5).sample_argv("0.1", [(vbd(*w), None) for w in wanted])
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
    finally:
        p.kill()
        p.wait()
    return json.loads(line)["v"]


def test_sampler_shall_print_each_wanted_unit_by_its_xenstore_path(tmp_path: Path) -> None:
    t, text = xbbd_samples("xbbd-healthy.txt")[5]
    values = run_sampler(tmp_path, text, [(1, 51728), (7, 51712), (1, 51712)])
    units = freebsd.parse_xbbd(text)
    assert values[1] is None  # no unit serves domain 7
    got = [freebsd.parse_xbbd(v) for v in (values[0], values[2])]  # type: ignore[arg-type]
    for g in got:
        assert len(g) == 1
    u0, u1 = next(iter(got[0].items())), next(iter(got[1].items()))
    assert units[u0[0]]["xenstore_path"] == "backend/vbd/1/51728"
    assert units[u1[0]]["xenstore_path"] == "backend/vbd/1/51712"
    # every integer node came through, none of the string ones
    for u, g in (u0, u1):
        assert g == {k: v for k, v in units[u].items() if isinstance(v, int)}


def test_sampled_series_shall_reach_the_same_verdicts_as_the_rules(tmp_path: Path) -> None:
    """Script -> parse_sample -> xbbd_check: the queued-never-pushed series hangs,
    the healthy one does not."""
    for name, hangs in (("xbbd-hung-queued.txt", True), ("xbbd-healthy.txt", False)):
        pts = []
        for t, text in xbbd_samples(name):
            v = run_sampler(tmp_path, text, [(1, 51728)])
            st = dom0.FreeBsdDom0.parse_sample(v, 1)[0]
            assert st is not None
            pts.append((t, st))
        res = freebsd.xbbd_check(pts, stall_window=15)
        assert (res["hang"] is not None) is hangs, (name, res)
        if hangs:
            assert "reqs_queued_for_completion" in res["hang"]["cause"]


def test_xbbd_stats_shall_give_the_common_watchdog_its_two_numbers() -> None:
    st = dom0.xbbd_stats("dev.xbbd.0.reqs_received: 100\ndev.xbbd.0.reqs_completed: 90\n"
                         "dev.xbbd.0.reqs_queued_for_completion: 4\ndev.xbbd.0.max_requests: 32\n")
    assert st is not None and st["taken"] == 100 and st["backing_inflight"] == 6
    # a kernel before the 2014 fix has no queued counter: in flight = received - completed
    old = dom0.xbbd_stats("dev.xbbd.3.reqs_received: 10\ndev.xbbd.3.reqs_completed: 7\n")
    assert old is not None and old["backing_inflight"] == 3 and "reqs_queued_for_completion" not in old
    assert dom0.xbbd_stats(None) is None
    assert dom0.xbbd_stats("dev.xbbd.0.xenstore_path: backend/vbd/1/51728\n") is None  # not connected
    two = "dev.xbbd.0.reqs_received: 1\ndev.xbbd.0.reqs_completed: 1\ndev.xbbd.1.reqs_received: 1\n"
    assert dom0.xbbd_stats(two) is None


def test_freebsd_drain_shall_compare_totals_only_without_flushes() -> None:
    stat = {"reads": 10, "writes": 5, "discards": 0, "flushes": 0, "sectors_read": 80, "sectors_written": 40}
    b = {"reqs_received": 15, "reqs_completed": 15, "taken": 15, "backing_inflight": 0}
    assert accounting_mismatches(GuestPoint(1.0, 15, 0, 0, stat), b) == []
    assert accounting_mismatches(GuestPoint(1.0, 16, 0, 0, stat), b) == ["guest completed 16 != backend received 15"]
    # with flushes the totals cannot agree (an empty PREFLUSH never reaches the ring)
    assert accounting_mismatches(GuestPoint(1.0, 16, 0, 1, {**stat, "flushes": 1}), b) == []
    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    tr.backend_pts.append(BackendPoint(1.0, b))
    assert tr.backend_pts[0].taken == 15


# ------------------------------------------------------------ the dom0 class
def test_disk_by_serial_shall_need_exactly_one_disk() -> None:
    r = FakeRunner("/dev/vtbd2\n")
    assert dom0.FreeBsdDom0(r, timeout=5).disk_by_serial("lab-lin1-xvdb") == "/dev/vtbd2"
    assert "diskinfo -s" in r.calls[0][2] and "lab-lin1-xvdb" in r.calls[0][2]
    for out in ("", "/dev/vtbd1\n/dev/vtbd2\n"):
        with pytest.raises(LabError, match="virtio disks with serial"):
            dom0.FreeBsdDom0(FakeRunner(out), timeout=5).disk_by_serial("x")


def test_backing_shall_be_a_gnop_provider_that_faults_reconfigure() -> None:
    r = FakeRunner()
    d = dom0.FreeBsdDom0(r, timeout=5)
    b = d.make_backing("lab-lin1-xvdb", "/dev/vtbd2")
    assert r.calls[0] == ["sh", "-c", "gnop create /dev/vtbd2"]
    assert (b.path, b.lower) == ("/dev/vtbd2.nop", "/dev/vtbd2")
    assert d.fault_script("delay", b, delay_ms=100) == "gnop configure -d 100 -q 100 -x 100 /dev/vtbd2.nop"
    assert d.fault_script("error", b) == "gnop configure -e 5 -r 100 -w 100 /dev/vtbd2.nop"
    assert d.release_scripts("delay", b) == ["gnop configure -q 0 -x 0 -r 0 -w 0 /dev/vtbd2.nop"]
    with pytest.raises(LabError, match="cannot inject 'stall'"):
        d.fault_script("stall", b)
    with pytest.raises(LabError):
        dom0.FreeBsdDom0(FakeRunner(rc=1), timeout=5).make_backing("x", "/dev/vtbd2")


def test_linux_and_freebsd_dom0_shall_answer_the_same_questions() -> None:
    """The run calls these on whichever class the table gives it."""
    for name in ("disk_by_serial", "make_backing", "remove_backing", "set_clock", "sample_argv", "parse_sample",
                 "fault_script", "release_scripts", "evidence_commands", "backend_module", "mount_boot_disk"):
        for cls in dom0.DOM0_CLASSES.values():
            assert callable(getattr(cls, name)), (cls, name)
    assert dom0.DOM0_CLASSES["freebsd"] is dom0.FreeBsdDom0
    labels = [label for label, _ in dom0.FreeBsdDom0(FakeRunner(), timeout=5).evidence_commands()]
    assert "dom0-xbbd" in labels and "dom0-kernel-stacks" in labels


def test_check_kernel_shall_refuse_a_dom0_that_booted_another_kernel() -> None:
    info = "uname_v=FreeBSD 14.3-RELEASE GENERIC\nident=GENERIC\nlab_build_id={}\n"
    assert dom0.FreeBsdDom0(FakeRunner(info.format("abc123")), timeout=5).check_kernel("abc123")["ident"] == "GENERIC"
    with pytest.raises(LabError, match="not the kernel built from the tree with id abc123") as e:
        dom0.FreeBsdDom0(FakeRunner(info.format("")), timeout=5).check_kernel("abc123")
    assert e.value.stage == "backend"
    with pytest.raises(LabError, match="not the release's kernel"):
        dom0.FreeBsdDom0(FakeRunner(info.format("abc123")), timeout=5).check_kernel(None)
    assert dom0.FreeBsdDom0(FakeRunner(info.format("")), timeout=5).check_kernel(None)["lab_build_id"] == ""


def test_set_clock_shall_use_each_systems_date() -> None:
    r = FakeRunner()
    dom0.FreeBsdDom0(r, timeout=5).set_clock(1790000000)
    dom0.LinuxDom0(r, timeout=5).set_clock(1790000000)
    assert r.calls == [["date", "-u", "-f", "%s", "1790000000"], ["date", "-u", "-s", "@1790000000"]]


# ------------------------------------------------------------ the VMs
def test_vm_spec_shall_boot_the_disk_and_give_offline_vms_no_nic(tmp_path: Path) -> None:
    drives = [qemu.Drive(tmp_path / "root.qcow2", "lab-root"), qemu.Drive(tmp_path / "c.iso", "lab-cidata", "raw", True)]
    off = qemu.build_argv(freebsd.vm_spec(drives, console_log=tmp_path / "c.log", qmp_sock=tmp_path / "q", accel="tcg",
                                          cpus=2, memory_mib=3072, ssh_port=None))
    assert "-kernel" not in off and "-initrd" not in off
    assert not any(a.startswith(("user,", "virtio-net")) for a in off) and "-netdev" not in off
    devs = [off[i + 1] for i, a in enumerate(off) if a == "-device"]
    assert devs[0].endswith("serial=lab-root,bootindex=0") and "bootindex" not in devs[1]
    on = qemu.build_argv(freebsd.vm_spec(drives, console_log=tmp_path / "c.log", qmp_sock=tmp_path / "q",
                                         accel="tcg", cpus=2, memory_mib=2048, ssh_port=2222))
    net = on[on.index("-netdev") + 1]
    assert "restrict=on" in net and "hostfwd=tcp:127.0.0.1:2222-:22" in net
    assert on[on.index("-cpu") + 1] == "qemu64,+svm,+npt"  # SVM with nested paging for the PVH dom0


@pytest.mark.parametrize("params, expect", [
    ({"kvm_intel": "Y"}, None),
    ({"kvm_amd": "1"}, None),
    ({"kvm_intel": "N"}, "nested virtualisation is disabled"),
    ({"kvm_amd": "0"}, "nested virtualisation is disabled"),
    ({}, "KVM is not loaded"),
])
def test_nested_kvm_problem_shall_read_the_module_parameter(params: dict, expect: str | None) -> None:
    def read(path: str) -> str | None:
        m = re.fullmatch(r"/sys/module/(\w+)/parameters/nested", path)
        assert m
        return params.get(m[1])

    got = freebsd.nested_kvm_problem(read)
    assert (got is None) if expect is None else (got is not None and expect in got)


def test_scenario_shall_refuse_what_a_freebsd_dom0_cannot_do(tmp_path: Path) -> None:
    base = 'name = "t"\n[dom0]\nos = "freebsd"\n[[guests]]\nname = "lin1"\n[[workloads]]\nguest = "lin1"\n'
    cases = [
        ('[[faults]]\nkind = "stall"\nguest = "lin1"\ndisk = "xvdb"\n', "faults[0].kind", "cannot stall"),
        ('[backend]\nsource = "/src/linux"\n', "backend.source", "[freebsd] src"),
        ('[xen]\nbinary = "/x/xen.gz"\n', "xen.binary", "Linux-only"),
    ]
    for extra, key, words in cases:
        p = tmp_path / "s.toml"
        p.write_text(base + extra)
        with pytest.raises(ScenarioError, match=re.escape(key)) as e:
            scenario.load(p)
        assert words in str(e.value) and str(p) in str(e.value)
    p.write_text(base + '[[faults]]\nkind = "delay"\nguest = "lin1"\ndisk = "xvdb"\ndelay = "100ms"\n')
    assert scenario.load(p).faults[0].kind == "delay"
    p.write_text('name = "t"\n[freebsd]\nsrc = "/usr/src"\n')
    with pytest.raises(ScenarioError, match="freebsd.src"):
        scenario.load(p)


# ------------------------------------------------------------ kernel sources
def test_source_hash_shall_follow_sys_patches_and_kernconf(tmp_path: Path) -> None:
    src = tmp_path / "src"
    c = src / "sys/dev/xen/blkback/blkback.c"
    c.parent.mkdir(parents=True)
    c.write_text("int x;\n")
    (src / "bin").mkdir()
    (src / "bin/ls.c").write_text("a\n")
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a\n+++ b\n")
    h = freebsd.source_hash(src, [], "GENERIC")
    assert freebsd.source_hash(src, [], "GENERIC") == h
    assert freebsd.source_hash(src, [patch], "GENERIC") != h
    assert freebsd.source_hash(src, [], "LAB") != h
    (src / "bin/ls.c").write_text("b\n")  # outside sys/: the kernel does not change
    assert freebsd.source_hash(src, [], "GENERIC") == h
    c.write_text("int y;\n")
    assert freebsd.source_hash(src, [], "GENERIC") != h
    with pytest.raises(LabError, match="blkback.c"):
        freebsd.source_hash(tmp_path / "nothing", [], "GENERIC")
    with pytest.raises(LabError, match="not a file"):
        freebsd.source_hash(src, [tmp_path / "absent.patch"], "GENERIC")


def test_source_hash_of_a_git_tree_shall_see_uncommitted_changes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    c = src / "sys/dev/xen/blkback/blkback.c"
    c.parent.mkdir(parents=True)
    c.write_text("int x;\n")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    h = freebsd.source_hash(src, [], "GENERIC")
    c.write_text("int y;\n")
    assert freebsd.source_hash(src, [], "GENERIC") != h
    c.write_text("int x;\n")
    assert freebsd.source_hash(src, [], "GENERIC") == h
    (c.parent / "new.c").write_text("z\n")  # untracked under sys/
    assert freebsd.source_hash(src, [], "GENERIC") != h


def test_build_script_shall_unpack_a_release_src_txz_at_the_root() -> None:
    tree = freebsd.build_script(patches=[], ident="abc", src_root="/usr/src")
    txz = freebsd.build_script(patches=[], ident="abc", src_root="/")
    assert any('tar -xf "$src" -C /usr/src' in line for line in tree)
    assert any('tar -xf "$src" -C / ' in line for line in txz)
    with pytest.raises(LabError):
        freebsd.build_script(patches=[], ident="abc", src_root="/tmp")


# ------------------------------------------------------------ media on L0
@pytest.mark.skipif(not shutil.which("genisoimage") or not shutil.which("isoinfo"),
                    reason="genisoimage (Debian package genisoimage) is not installed: `make deps`")
def test_cidata_iso_shall_carry_the_label_and_files_nuageinit_reads(tmp_path: Path) -> None:
    from lab.runner import LocalRunner

    pkg = tmp_path / "pkg-2.1.2.pkg"
    pkg.write_bytes(b"x" * 100)
    freebsd._stage_cidata(tmp_path / "stage", user_data="#cloud-config\n{}\n", instance_id="i-1",
                          files=[(pkg, "packages/pkg-2.1.2.pkg")], texts={"packages/ORDER": "pkg-2.1.2.pkg\n"})
    iso = tmp_path / "cidata.iso"
    freebsd.make_cidata(tmp_path / "stage", iso, LocalRunner())
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^Volume id: cidata$", info, re.M)  # lower case: /dev/iso9660/cidata
    files = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert {"/user-data", "/meta-data", "/packages/ORDER", "/packages/pkg-2.1.2.pkg"} <= set(files.split())
    meta = subprocess.run(["isoinfo", "-R", "-x", "/meta-data", "-i", str(iso)], capture_output=True, text=True,
                          check=True).stdout
    assert 'instance-id: "i-1"' in meta


def test_decompress_image_shall_write_into_the_cache_read_only(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "img.qcow2").write_bytes(b"disk" * 1000)
    subprocess.run(["xz", "-0", str(user / "img.qcow2")], check=True)
    before = sorted(p.name for p in user.iterdir())
    out = freebsd.decompress_image(user / "img.qcow2.xz", out_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "img.qcow2" and out.read_bytes() == b"disk" * 1000
    assert out.stat().st_mode & 0o222 == 0
    assert sorted(p.name for p in user.iterdir()) == before


# ------------------------------------------------------------ the run's FreeBSD verdict
def labrun_with(tmp_path: Path, name: str, **freebsd_cfg: object):  # type: ignore[no-untyped-def]
    """A LabRun (never executed) whose one track holds the constructed series,
    unit 0, as the sampler would have parsed it."""
    import dataclasses

    from lab.run import LabRun

    sc = scenario.load("freebsd-dom0")
    sc = dataclasses.replace(sc, freebsd=dataclasses.replace(sc.freebsd, **freebsd_cfg))
    run = LabRun(sc, results_root=tmp_path)
    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    for t, text in xbbd_samples(name):
        unit0 = "\n".join(line for line in text.splitlines() if line.startswith("dev.xbbd.0."))
        st = dom0.xbbd_stats(unit0)
        if st is not None:
            tr.backend_pts.append(BackendPoint(t, st))
    run.tracks.append(tr)
    return run


def test_run_shall_hang_on_responses_queued_and_never_pushed(tmp_path: Path) -> None:
    assert labrun_with(tmp_path, "xbbd-healthy.txt")._xbbd_hang() is None
    h = labrun_with(tmp_path, "xbbd-hung-queued.txt")._xbbd_hang()
    assert h is not None and h["disk"] == "lin1/xvdb" and "never pushed" in h["cause"]
    assert h["side_stopped_first"] == "backend" and h["detected_at_s"] > h["last_progress_at_s"]


def test_run_findings_shall_fail_errors_and_invariants_and_report_the_rest(tmp_path: Path) -> None:
    healthy = labrun_with(tmp_path, "xbbd-healthy.txt")
    assert healthy._xbbd_findings() == []
    rep = healthy.record["xbbd"]["lin1/xvdb"]
    assert rep["missing"] == [] and rep["errors"] == 0 and "note" not in rep
    bad = labrun_with(tmp_path, "xbbd-invariant.txt")._xbbd_findings()
    assert len(bad) == 1 and "more requests in flight than max_requests" in bad[0] and "40 > 32" in bad[0]
    old = labrun_with(tmp_path, "xbbd-pre2014.txt")
    assert old._xbbd_findings() == []  # shortages are reported, not failed, by default
    rep = old.record["xbbd"]["lin1/xvdb"]
    assert rep["shortages"]["request_shortages"] > 0
    assert set(rep["missing"]) == {"reqs_queued_for_completion", "reqs_completed_with_error"}
    assert "lacks" in rep["note"]
    strict = labrun_with(tmp_path, "xbbd-pre2014.txt", fail_on_request_shortages=True)._xbbd_findings()
    assert len(strict) == 1 and "ran out of request structures" in strict[0]


def test_decompress_image_shall_not_mistake_another_file_of_the_same_name(tmp_path: Path) -> None:
    """A cached unpack is reused only for the very .xz it came from: a user's
    image of the same name (even one older than the cached copy) is unpacked again."""
    cache = tmp_path / "cache"
    for i, body in enumerate((b"first" * 500, b"second" * 500)):
        d = tmp_path / f"user{i}"
        d.mkdir()
        (d / "img.qcow2").write_bytes(body)
        subprocess.run(["xz", "-0", str(d / "img.qcow2")], check=True)
        os.utime(d / "img.qcow2.xz", (1_000_000 + i, 1_000_000 - i))  # the second is *older*
        out = freebsd.decompress_image(d / "img.qcow2.xz", out_dir=cache)
        assert out.read_bytes() == body
    t = out.stat().st_mtime_ns
    assert freebsd.decompress_image(tmp_path / "user1" / "img.qcow2.xz", out_dir=cache).stat().st_mtime_ns == t
