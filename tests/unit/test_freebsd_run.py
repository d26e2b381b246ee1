"""A FreeBSD dom0 in the run: the platform's rules, the dom0 ops (disks, gnop, kernel check), the
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

from lab import qemu, scenario
from lab.errors import LabError, ScenarioError
from lab.platform import Dom0Ops, Finding
from lab.platform.freebsd import FreeBsdPlatform, kernel, media, render, steps, vm, xbbd
from lab.platform.freebsd.dom0 import FreeBsdDom0
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
    argv = FreeBsdDom0(FakeRunner(), timeout=5).sample_argv("0.1", [(vbd(*w), None) for w in wanted])
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
    units = xbbd.parse_xbbd(text)
    assert values[1] is None  # no unit serves domain 7
    got = [xbbd.parse_xbbd(v) for v in (values[0], values[2])]  # type: ignore[arg-type]
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
            st = FreeBsdDom0.parse_sample(v, 1)[0]
            assert st is not None
            pts.append((t, st))
        res = xbbd.xbbd_check(pts, stall_window=15)
        assert (res["hang"] is not None) is hangs, (name, res)
        if hangs:
            assert "reqs_queued_for_completion" in res["hang"]["cause"]


def test_xbbd_stats_shall_give_the_common_watchdog_its_two_numbers() -> None:
    st = xbbd.xbbd_stats("dev.xbbd.0.reqs_received: 100\ndev.xbbd.0.reqs_completed: 90\n"
                         "dev.xbbd.0.reqs_queued_for_completion: 4\ndev.xbbd.0.max_requests: 32\n")
    assert st is not None and st["taken"] == 100 and st["backing_inflight"] == 6
    # a kernel before the 2014 fix has no queued counter: in flight = received - completed
    old = xbbd.xbbd_stats("dev.xbbd.3.reqs_received: 10\ndev.xbbd.3.reqs_completed: 7\n")
    assert old is not None and old["backing_inflight"] == 3 and "reqs_queued_for_completion" not in old
    assert xbbd.xbbd_stats(None) is None
    assert xbbd.xbbd_stats("dev.xbbd.0.xenstore_path: backend/vbd/1/51728\n") is None  # not connected
    two = "dev.xbbd.0.reqs_received: 1\ndev.xbbd.0.reqs_completed: 1\ndev.xbbd.1.reqs_received: 1\n"
    assert xbbd.xbbd_stats(two) is None


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
    assert FreeBsdDom0(r, timeout=5).disk_by_serial("lab-lin1-xvdb") == "/dev/vtbd2"
    assert "diskinfo -s" in r.calls[0][2] and "lab-lin1-xvdb" in r.calls[0][2]
    for out in ("", "/dev/vtbd1\n/dev/vtbd2\n"):
        with pytest.raises(LabError, match="virtio disks with serial"):
            FreeBsdDom0(FakeRunner(out), timeout=5).disk_by_serial("x")


def test_backing_shall_be_a_gnop_provider_that_faults_reconfigure() -> None:
    r = FakeRunner()
    d = FreeBsdDom0(r, timeout=5)
    b = d.make_backing("lab-lin1-xvdb", "/dev/vtbd2")
    assert r.calls[0] == ["sh", "-c", "gnop create /dev/vtbd2"]
    assert (b.path, b.lower) == ("/dev/vtbd2.nop", "/dev/vtbd2")
    assert d.fault_script("delay", b, delay_ms=100) == "gnop configure -d 100 -q 100 -x 100 /dev/vtbd2.nop"
    assert d.fault_script("error", b) == "gnop configure -e 5 -r 100 -w 100 /dev/vtbd2.nop"
    assert d.release_scripts("delay", b) == ["gnop configure -q 0 -x 0 -r 0 -w 0 /dev/vtbd2.nop"]
    with pytest.raises(LabError, match="cannot inject 'stall'"):
        d.fault_script("stall", b)
    with pytest.raises(LabError):
        FreeBsdDom0(FakeRunner(rc=1), timeout=5).make_backing("x", "/dev/vtbd2")


def test_freebsd_dom0_shall_answer_the_questions_of_the_dom0_ops_protocol() -> None:
    """The pipeline calls these on whichever ops the platform table gives it."""
    names = ("disk_by_serial", "make_backing", "remove_backing", "set_clock", "sample_argv", "parse_sample",
             "fault_script", "release_scripts", "evidence_commands", "backend_module", "mount_boot_disk")
    protocol = {n for n in vars(Dom0Ops) if not n.startswith("_")} - {"os"}
    assert set(names) <= protocol  # the list above is the protocol's, not a private one
    for name in sorted(protocol):
        assert callable(getattr(FreeBsdDom0, name)), name
    ops = FreeBsdPlatform().ops(FakeRunner(), timeout=5)
    assert isinstance(ops, FreeBsdDom0) and ops.os == "freebsd" and ops.timeout == 5
    labels = [label for label, _ in FreeBsdDom0(FakeRunner(), timeout=5).evidence_commands()]
    assert "dom0-xbbd" in labels and "dom0-kernel-stacks" in labels
    assert type(FreeBsdDom0(FakeRunner(), timeout=5).make_backing("b", "/dev/vtbd2")).__module__ == "lab.platform"


def test_check_kernel_shall_refuse_a_dom0_that_booted_another_kernel() -> None:
    info = "uname_v=FreeBSD 14.3-RELEASE GENERIC\nident=GENERIC\nlab_build_id={}\n"
    assert FreeBsdDom0(FakeRunner(info.format("abc123")), timeout=5).check_kernel("abc123")["ident"] == "GENERIC"
    with pytest.raises(LabError, match="not the kernel built from the tree with id abc123") as e:
        FreeBsdDom0(FakeRunner(info.format("")), timeout=5).check_kernel("abc123")
    assert e.value.stage == "backend"
    with pytest.raises(LabError, match="not the release's kernel"):
        FreeBsdDom0(FakeRunner(info.format("abc123")), timeout=5).check_kernel(None)
    assert FreeBsdDom0(FakeRunner(info.format("")), timeout=5).check_kernel(None)["lab_build_id"] == ""


def test_set_clock_shall_use_each_systems_date() -> None:
    r = FakeRunner()
    FreeBsdDom0(r, timeout=5).set_clock(1790000000)
    from lab.platform.linux.dom0 import LinuxDom0  # moves with the Linux platform

    LinuxDom0(r, timeout=5).set_clock(1790000000)
    assert r.calls == [["date", "-u", "-f", "%s", "1790000000"], ["date", "-u", "-s", "@1790000000"]]


# ------------------------------------------------------------ the VMs
def test_vm_spec_shall_boot_the_disk_and_give_offline_vms_no_nic(tmp_path: Path) -> None:
    drives = [qemu.Drive(tmp_path / "root.qcow2", "lab-root"), qemu.Drive(tmp_path / "c.iso", "lab-cidata", "raw", True)]
    off = qemu.build_argv(vm.vm_spec(drives, console_log=tmp_path / "c.log", qmp_sock=tmp_path / "q", accel="tcg",
                                          cpus=2, memory_mib=3072, ssh_port=None))
    assert "-kernel" not in off and "-initrd" not in off
    assert not any(a.startswith(("user,", "virtio-net")) for a in off) and "-netdev" not in off
    devs = [off[i + 1] for i, a in enumerate(off) if a == "-device"]
    assert devs[0].endswith("serial=lab-root,bootindex=0") and "bootindex" not in devs[1]
    on = qemu.build_argv(vm.vm_spec(drives, console_log=tmp_path / "c.log", qmp_sock=tmp_path / "q",
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

    got = vm.nested_kvm_problem(read)
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
    h = kernel.source_hash(src, [], "GENERIC")
    assert kernel.source_hash(src, [], "GENERIC") == h
    assert kernel.source_hash(src, [patch], "GENERIC") != h
    assert kernel.source_hash(src, [], "LAB") != h
    (src / "bin/ls.c").write_text("b\n")  # outside sys/: the kernel does not change
    assert kernel.source_hash(src, [], "GENERIC") == h
    c.write_text("int y;\n")
    assert kernel.source_hash(src, [], "GENERIC") != h
    with pytest.raises(LabError, match="blkback.c"):
        kernel.source_hash(tmp_path / "nothing", [], "GENERIC")
    with pytest.raises(LabError, match="not a file"):
        kernel.source_hash(src, [tmp_path / "absent.patch"], "GENERIC")


def test_source_hash_of_a_git_tree_shall_see_uncommitted_changes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    c = src / "sys/dev/xen/blkback/blkback.c"
    c.parent.mkdir(parents=True)
    c.write_text("int x;\n")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    h = kernel.source_hash(src, [], "GENERIC")
    c.write_text("int y;\n")
    assert kernel.source_hash(src, [], "GENERIC") != h
    c.write_text("int x;\n")
    assert kernel.source_hash(src, [], "GENERIC") == h
    (c.parent / "new.c").write_text("z\n")  # untracked under sys/
    assert kernel.source_hash(src, [], "GENERIC") != h


def test_build_script_shall_unpack_a_release_src_txz_at_the_root() -> None:
    tree = render.build_script(patches=[], ident="abc", src_root="/usr/src")
    txz = render.build_script(patches=[], ident="abc", src_root="/")
    assert any('tar -xf "$src" -C /usr/src' in line for line in tree)
    assert any('tar -xf "$src" -C / ' in line for line in txz)
    with pytest.raises(LabError):
        render.build_script(patches=[], ident="abc", src_root="/tmp")


# ------------------------------------------------------------ media on L0
@pytest.mark.skipif(not shutil.which("genisoimage") or not shutil.which("isoinfo"),
                    reason="genisoimage (Debian package genisoimage) is not installed: `make deps`")
def test_cidata_iso_shall_carry_the_label_and_files_nuageinit_reads(tmp_path: Path) -> None:
    from lab.runner import LocalRunner

    pkg = tmp_path / "pkg-2.1.2.pkg"
    pkg.write_bytes(b"x" * 100)
    steps.stage_cidata(tmp_path / "stage", user_data="#cloud-config\n{}\n", instance_id="i-1",
                          files=[(pkg, "packages/pkg-2.1.2.pkg")], texts={"packages/ORDER": "pkg-2.1.2.pkg\n"})
    iso = tmp_path / "cidata.iso"
    steps.make_cidata(tmp_path / "stage", iso, LocalRunner())
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
    out = media.decompress_image(user / "img.qcow2.xz", out_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "img.qcow2" and out.read_bytes() == b"disk" * 1000
    assert out.stat().st_mode & 0o222 == 0
    assert sorted(p.name for p in user.iterdir()) == before


# ------------------------------------------------------------ the platform's verdict rules
def tracks_with(name: str) -> list[Track]:
    """One track holding the constructed series, unit 0, as the sampler would
    have parsed it."""
    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    for t, text in xbbd_samples(name):
        unit0 = "\n".join(line for line in text.splitlines() if line.startswith("dev.xbbd.0."))
        st = xbbd.xbbd_stats(unit0)
        if st is not None:
            tr.backend_pts.append(BackendPoint(t, st))
    return [tr]


def scenario_with(**freebsd_cfg: object) -> scenario.Scenario:
    import dataclasses

    sc = scenario.load("freebsd-dom0")
    return dataclasses.replace(sc, freebsd=dataclasses.replace(sc.freebsd, **freebsd_cfg))


def live(name: str, **cfg: object) -> tuple[Finding, ...]:
    return FreeBsdPlatform().rules(scenario_with(**cfg), tracks_with(name), final=False).findings


def test_run_shall_hang_on_responses_queued_and_never_pushed() -> None:
    assert live("xbbd-healthy.txt") == ()
    found = live("xbbd-hung-queued.txt")
    assert len(found) == 1 and found[0].verdict == "HANG" and found[0].disk == "lin1/xvdb"
    h = found[0].detail
    assert h is not None and h["disk"] == "lin1/xvdb" and "never pushed" in h["cause"]
    assert h["side_stopped_first"] == "backend" and h["detected_at_s"] > h["last_progress_at_s"]
    assert found[0].message == h["cause"]
    # the keys the record's "hang" has always had
    assert {"disk", "cause", "detected_at_s", "last_progress_at_s", "side_stopped_first", "since_t", "detected_t",
            "stalled_s", "completed", "inflight", "queued_for_completion"} <= set(h)
    assert h["stalled_s"] >= scenario_with().watchdog.stall_window


def test_live_rules_shall_leave_a_stall_without_a_stuck_queue_to_the_common_rule() -> None:
    """pre2014 hangs by xbbd_check (completions stopped, 32 in flight), but the
    common watchdog sees that through backing_inflight: no second finding."""
    sc = scenario_with()
    tracks = tracks_with("xbbd-pre2014.txt")
    samples = [(p.t, p.stats) for p in tracks[0].backend_pts]
    assert xbbd.xbbd_check(samples, stall_window=sc.watchdog.stall_window)["hang"] is not None
    assert FreeBsdPlatform().rules(sc, tracks, final=False).findings == ()
    assert FreeBsdPlatform().rules(sc, [], final=False).findings == ()


def final(name: str, **cfg: object):  # type: ignore[no-untyped-def]
    r = FreeBsdPlatform().rules(scenario_with(**cfg), tracks_with(name), final=True)
    return [f.message for f in r.findings], r


def test_run_findings_shall_fail_errors_and_invariants_and_report_the_rest() -> None:
    found, healthy = final("xbbd-healthy.txt")
    assert found == []
    rep = healthy.record["xbbd"]["lin1/xvdb"]
    assert rep["missing"] == [] and rep["errors"] == 0 and "note" not in rep
    assert set(healthy.record) == {"xbbd"}
    bad, r = final("xbbd-invariant.txt")
    assert len(bad) == 1 and "more requests in flight than max_requests" in bad[0] and "40 > 32" in bad[0]
    assert [(f.verdict, f.disk) for f in r.findings] == [("FAIL", "lin1/xvdb")]
    assert bad[0].startswith("lin1/xvdb: 1 sample(s)")  # the summary names the disk, as every error does
    found, old = final("xbbd-pre2014.txt")
    assert found == []  # shortages are reported, not failed, by default
    rep = old.record["xbbd"]["lin1/xvdb"]
    assert rep["shortages"]["request_shortages"] > 0
    assert set(rep["missing"]) == {"reqs_queued_for_completion", "reqs_completed_with_error"}
    assert "lacks" in rep["note"]
    strict, r = final("xbbd-pre2014.txt", fail_on_request_shortages=True)
    assert len(strict) == 1 and "ran out of request structures" in strict[0]
    assert r.findings[0].verdict == "FAIL" and r.findings[0].detail["request_shortages"] > 0
    # the final rules never call a hang: that is the live rules' and the drain's job
    found, r = final("xbbd-hung-queued.txt")
    assert found == [] and all(f.verdict == "FAIL" for f in r.findings)


def test_final_rules_shall_fail_errors_completed_by_the_backend() -> None:
    tr = Track("lin1", "xvdb", "vbd-1-51728", 32)
    for t, err in ((0, 0), (1, 3)):
        tr.backend_pts.append(BackendPoint(float(t), {"reqs_received": 10 + t, "reqs_completed": 10 + t,
                                               "reqs_queued_for_completion": 0, "reqs_completed_with_error": err,
                                               "request_shortages": 0, "kva_shortages": 0, "max_requests": 32}))
    r = FreeBsdPlatform().rules(scenario_with(), [tr], final=True)
    assert [(f.verdict, f.disk) for f in r.findings] == [("FAIL", "lin1/xvdb")]
    assert r.findings[0].message.startswith("lin1/xvdb: blkback completed 3 request(s) with an error")
    assert r.record["xbbd"]["lin1/xvdb"]["errors"] == 3


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
        out = media.decompress_image(d / "img.qcow2.xz", out_dir=cache)
        assert out.read_bytes() == body
    t = out.stat().st_mtime_ns
    assert media.decompress_image(tmp_path / "user1" / "img.qcow2.xz", out_dir=cache).stat().st_mtime_ns == t


# ------------------------------------------------------------ the platform's boot, backend and plan
def test_boot_steps_shall_be_the_dom0_milestones_in_order_with_their_deadlines() -> None:
    sc = scenario_with()
    dl = sc.deadlines
    got = FreeBsdPlatform().boot_steps(sc)
    assert [s.milestone for s in got] == list(vm.DOM0_BOOT)
    assert [s.name for s in got] == [m.what for m in vm.DOM0_BOOT]
    assert [s.seconds for s in got] == [dl.xen_banner, dl.xen_banner, dl.dom0_kernel, dl.dom0_kernel, dl.dom0_ssh]
    assert got[0].milestone is vm.FREEBSD_LOADER and got[-1].name == "dom0's init to report ready"
    assert len({s.name for s in got}) == len(got)  # each a distinct key of record.json's "boot"


def test_platform_shall_say_what_it_is() -> None:
    p = FreeBsdPlatform()
    assert (p.os, p.warm_start, p.direct_boot) == ("freebsd", False, False)


def test_vm_spec_shall_refuse_kvm_without_nested_and_boot_the_disk(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import lab.platform.freebsd as fbp

    sc = scenario_with()
    drives = [qemu.Drive(tmp_path / "dom0.qcow2", "lab-dom0-root"), qemu.Drive(tmp_path / "b.img", "lab-boot", "raw",
                                                                               True)]
    kw = {"drives": drives, "console_log": tmp_path / "c.log", "qmp_sock": tmp_path / "q", "ssh_port": 2222}
    monkeypatch.setattr(fbp, "nested_kvm_problem", lambda: "nested virtualisation is disabled")
    with pytest.raises(LabError, match="nested virtualisation is disabled") as e:
        FreeBsdPlatform().vm_spec(sc, None, accel="kvm", **kw)  # type: ignore[arg-type]
    assert e.value.stage == "boot:qemu"
    spec = FreeBsdPlatform().vm_spec(sc, None, accel="tcg", extra=["-S"], **kw)  # type: ignore[arg-type]
    argv = qemu.build_argv(spec)
    assert "-kernel" not in argv and argv[-1] == "-S" and spec.xen is None
    assert (spec.cpus, spec.memory_mib) == (sc.lab.cpus, sc.lab.memory.mib)
    assert spec.drives[0].boot and not spec.drives[1].boot and "hostfwd=tcp:127.0.0.1:2222-:22" in " ".join(argv)
    monkeypatch.setattr(fbp, "nested_kvm_problem", lambda: None)
    assert FreeBsdPlatform().vm_spec(sc, None, accel="kvm", **kw).accel == "kvm"  # type: ignore[arg-type]


def test_choose_accel_shall_keep_a_forced_choice() -> None:
    import lab.platform.freebsd as fbp

    assert fbp.choose_accel("tcg") == ("tcg", "requested (tcg)")
    assert fbp.choose_accel("kvm") == ("kvm", "requested (kvm)")


def backend_ctx(kid: str | None, info: str):  # type: ignore[no-untyped-def]
    from lab.platform import BackendCtx, Media
    from lab.platform.freebsd.provision import Dom0Image

    img = Dom0Image(Path("/cache/dom0.qcow2"), "k", "14.3", kid,
                    {"commit": "abc+dirty", "patches": ["/p/x.patch"], "kernconf": "GENERIC"} if kid else {})
    media_ = Media(dom0_root=(img.path, "qcow2"), guest=None, keys=None, record={}, accel="tcg",  # type: ignore[arg-type]
                   accel_reason="", private=img)
    return BackendCtx(sc=scenario_with(), media=media_, ops=FreeBsdDom0(FakeRunner(info), timeout=5), l0=None,  # type: ignore[arg-type]
                      results=Path("/r"), put=lambda src, dst: None)


def test_install_backend_shall_record_the_kernel_and_prove_it_booted() -> None:
    info = "uname_v=FreeBSD 14.3-RELEASE GENERIC\nident=GENERIC\nlab_build_id={}\n"
    rec = FreeBsdPlatform().install_backend(backend_ctx("abc123", info.format("abc123")))
    assert {k: rec[k] for k in ("kind", "os", "tree_hash", "commit", "patches", "kernconf")} == {
        "kind": "built", "os": "freebsd", "tree_hash": "abc123", "commit": "abc+dirty", "patches": ["/p/x.patch"],
        "kernconf": "GENERIC"}
    assert rec["loaded"]["lab_build_id"] == "abc123"
    stock = FreeBsdPlatform().install_backend(backend_ctx(None, info.format("")))
    assert stock["kind"] == "stock" and stock["tree_hash"] is None and stock["patches"] == []
    with pytest.raises(LabError, match="not the kernel built") as e:
        FreeBsdPlatform().install_backend(backend_ctx("abc123", info.format("")))
    assert e.value.stage == "backend"


def test_media_or_error_shall_name_what_is_missing_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(LabError) as e:
        media.media_or_error(scenario_with(version="14.3"), cache_dir=tmp_path, reachable=lambda url: False)
    assert e.value.stage == "image" and "FreeBSD 14.3 dom0 (from the scenario)" in e.value.message
    assert "[freebsd] image" in e.value.message and "[freebsd] packages" in e.value.message
    assert "--plan" in e.value.message
    assert media.media_or_error(scenario_with(version="14.3"), cache_dir=tmp_path,
                                reachable=lambda url: True) == ("14.3", "from the scenario")


def test_freebsd_version_offline_shall_assume_the_latest_known() -> None:
    assert media.freebsd_version(scenario_with(version="13.5"), online=False) == ("13.5", "from the scenario")
    v, how = media.freebsd_version(scenario_with(), online=False)
    assert v == media.FALLBACK_VERSION and "unreachable" in how


def test_platform_plan_shall_name_the_release_then_every_step() -> None:
    sc = scenario_with(version="14.3", src="/src/freebsd", patches=("/p/revert-2014.patch",))
    got = FreeBsdPlatform().plan(sc)
    assert got[0] == {"step": "release", "what": "FreeBSD 14.3 dom0 (from the scenario)", "version": "14.3",
                      "chosen": "from the scenario"}
    names = [s["step"] for s in got]
    for a, b in (("checksum", "image"), ("image", "decompress"), ("cidata", "provision"), ("provision", "check"),
                 ("source", "build"), ("build", "kernel-check"), ("kernel-check", "boot"), ("boot", "sample")):
        assert names.index(a) < names.index(b), (a, b)
    by = {s["step"]: s for s in got}
    assert any("0000-revert-2014.patch" in line for line in by["build"]["script"])
    assert by["boot"]["milestones"] == [m.what for m in vm.DOM0_BOOT] + ["dom0 SSH"]
    boot = by["boot"]["command"]
    assert boot[boot.index("-smp") + 1] == str(sc.lab.cpus) and boot[boot.index("-m") + 1] == f"{sc.lab.memory.mib}M"
    # work directories are lab.cache's, so its sweep finds what a killed build left
    assert ".{key}.building-{pid}-{token}/provision.qcow2" in " ".join(by["overlay"]["command"])
    assert ".{key}-k{hash}.building-{pid}-{token}/src.tar" in " ".join(by["source"]["command"])
    assert all(isinstance(s["what"], str) and s["what"] for s in got)


# ------------------------------------------------------------ the step lists: plan == run
def run_recorded(make, monkeypatch: pytest.MonkeyPatch, module: str, info: str):  # type: ignore[no-untyped-def]
    """Execute a step list with a recording runner and run_vm stood in for:
    (the plan's dicts, the argvs the runner ran, the specs the VMs got)."""
    specs: list[qemu.VmSpec] = []

    def fake_run_vm(name, spec, results, milestones, *, stage):  # type: ignore[no-untyped-def]
        specs.append(spec)
        return {m.what: 1.0 for m, _ in milestones}

    monkeypatch.setattr(f"lab.platform.freebsd.{module}.run_vm", fake_run_vm)

    class Runner(FakeRunner):
        def run(self, argv: list[str], *, timeout: float, input: str | None = None):  # type: ignore[no-untyped-def]
            self.outputs = [info] if argv[:2] == ["qemu-img", "info"] else []
            return super().run(argv, timeout=timeout, input=input)

    r = Runner()
    st = make(r)
    steps.run_steps(st, runner=r, stage="image")
    steps.run_steps(st, runner=r, stage="image", phase="verify")
    return steps.plan(st), r.calls, specs


def shown_commands(planned: list[dict]) -> list[list[str]]:
    out = []
    for s in planned:
        for k in ("command", "then"):
            if isinstance(s.get(k), list) and s["step"] not in ("provision", "build"):
                out.append(s[k])
    return out


def test_provisioning_shall_run_exactly_the_commands_its_plan_shows(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.platform.freebsd.provision import Provision, VmJob, provision_steps

    base = tmp_path / "FreeBSD-14.3.qcow2"
    base.write_bytes(b"")
    work = tmp_path / ".k.building-1-x"
    info = json.dumps({"format": "qcow2"})
    planned, ran, specs = run_recorded(
        lambda r: provision_steps(Provision(base, work, 600, "#cloud-config\n{}\n", "i-1", (), {"format": 1}),
                                  VmJob("tcg", 2, r, tmp_path, 15)), monkeypatch, "provision", info)
    assert ran == shown_commands(planned)
    assert [a[:2] for a in ran] == [["genisoimage", "-quiet"], ["qemu-img", "create"], ["qemu-img", "resize"],
                                    ["qemu-img", "convert"], ["chmod", "0444"], ["qemu-img", "info"]]
    prov = next(s for s in planned if s["step"] == "provision")
    assert len(specs) == 1 and qemu.build_argv(specs[0]) == prov["command"]
    assert "-netdev" not in prov["command"]
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["milestones"]["the provisioning script to finish"] == 1.0
    assert next(s for s in planned if s["step"] == "check")["command"] == ran[-1]


def test_kernel_build_shall_run_exactly_the_commands_its_plan_shows(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.platform.freebsd.kernel import KernelBuild, kernel_steps
    from lab.platform.freebsd.provision import Dom0Image, VmJob

    src = tmp_path / "src"
    (src / "sys").mkdir(parents=True)
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a\n+++ b\n")
    img = Dom0Image(tmp_path / "dom0.qcow2", "key", "14.3", None, {"image": "x"})
    work = tmp_path / ".key-kabc.building-1-x"
    planned, ran, specs = run_recorded(
        lambda r: kernel_steps(KernelBuild(img, src, [patch], "GENERIC", "abc", tmp_path / "base.qcow2", work, 600),
                               VmJob("tcg", 2, r, tmp_path, 15)), monkeypatch, "kernel", json.dumps({"format": "qcow2"}))
    assert ran == shown_commands(planned)
    assert ran[0][:3] == ["tar", "-C", str(src)] and ["qemu-img", "resize", "-q", str(work / "builder.qcow2"), "40G"] in ran
    build = next(s for s in planned if s["step"] == "build")
    assert len(specs) == 1 and qemu.build_argv(specs[0]) == build["command"]
    assert (work / "cidata").exists() is False and json.loads((work / "manifest.json").read_text())["kernel_id"] == "abc"


def test_a_flattened_image_with_a_backing_file_shall_not_enter_the_cache(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    r = FakeRunner(json.dumps({"format": "qcow2", "backing-filename": "/tmp/x/provision.qcow2"}))
    with pytest.raises(LabError, match="not a standalone qcow2") as e:
        steps.run_steps([steps.qcow2_check(r, tmp_path / "dom0.qcow2", "image")], runner=r, stage="image",
                        phase="verify")
    assert e.value.stage == "image"


# ------------------------------------------------------------ the cache, one convention
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_built_entries_shall_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "dom0" / "key"
    seen: list[Path] = []

    def make(work: Path) -> list[steps.Step]:
        seen.append(work)
        return [steps.Step("a", "make", action=lambda: (work.mkdir(), (work / "dom0.qcow2").write_text("x"))),
                steps.Step("b", "fail", action=lambda: (_ for _ in ()).throw(LabError("image", "boom")))]

    with pytest.raises(LabError, match="boom"):
        steps.put_built(final, make, runner=FakeRunner(), stage="image")
    assert not final.exists() and not seen[0].exists()
    assert seen[0].parent == final.parent and seen[0].name.startswith(f".key.building-{os.getpid()}-")
    assert [p.name for p in final.parent.iterdir()] == [".key.lock"]  # only lab.cache's empty lock file
    checked: list[str] = []

    def good(work: Path) -> list[steps.Step]:
        return [steps.Step("a", "make", action=lambda: (work.mkdir(), (work / "m").write_text("x"))),
                steps.Step("check", "verify", action=lambda: checked.append("verify"), phase="verify")]

    assert steps.put_built(final, good, runner=FakeRunner(), stage="image") == final
    assert (final / "m").read_text() == "x" and checked == ["verify"]
    assert steps.put_built(final, make, runner=FakeRunner(), stage="image") == final  # cached: not rebuilt


def test_decompress_shall_sweep_what_a_killed_unpacking_left(tmp_path: Path) -> None:
    """The FreeBSD temporaries follow lab.cache's naming, so its sweep finds them."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    stale = cache_dir / f".img.qcow2.building-{dead_pid()}-0123abcd"
    stale.write_bytes(b"half")
    (tmp_path / "img.qcow2").write_bytes(b"disk" * 100)
    subprocess.run(["xz", "-0", str(tmp_path / "img.qcow2")], check=True)
    out = media.decompress_image(tmp_path / "img.qcow2.xz", out_dir=cache_dir)
    assert out.read_bytes() == b"disk" * 100 and not stale.exists()
    assert not [p for p in cache_dir.iterdir() if ".building-" in p.name]
