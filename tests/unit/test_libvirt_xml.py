"""lab/libvirt.py and lab/libvirt_host.py, the pure parts: the domain XML shall be
the VM `qemu.build_argv` starts (the same drives in the same order with the same
serials and slots, the same CPU and translation cache, the same restricted
network and multiboot arguments through the passthrough), for every kind of spec
and every kind of path; access checks and daemon decisions shall follow from
stand-in stat and pid functions. Nothing here needs libvirtd or libvirt-python."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat as statmod
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lab import libvirt as lv
from lab import libvirt_host as host
from lab import qemu
from lab.errors import LabError
from lab.qemu import Drive, VmSpec
from lab.runner import Result
from lab.timing import Deadline

UUID = "6f1c1d5e-8a3e-4f0e-9d1e-2a3b4c5d6e7f"
OWNER = (4242, 99)


def _value(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _spec(**kw: Any) -> VmSpec:
    base: dict[str, Any] = dict(
        accel="tcg", cpus=2, memory_mib=1536, xen=Path("/c/xen"), xen_cmdline="console=com1 com1=115200,8n1",
        modules=[(Path("/c/vmlinuz"), "console=hvc0 root=/dev/vda"), (Path("/c/initrd.img"), "")],
        drives=[Drive(Path("/w/root.qcow2"), "lab-root"), Drive(Path("/w/boot.img"), "lab-boot", "raw", True)],
        ssh_port=40022, console_log=Path("/r/console-xen.log"), qmp_sock=Path("/tmp/lab-qmp-x/qmp.sock"))
    base.update(kw)
    return VmSpec(**base)


ODD = "/w/a dir/it's \"q\" & <b>"
CASES = {
    "tcg, Xen, QMP": _spec(),
    "tcg, Xen, no QMP": _spec(qmp_sock=None),
    "kvm": _spec(accel="kvm"),
    "kvm, named model": _spec(accel="kvm", cpu_model="EPYC"),
    "tcg, max without smap": _spec(cpu_model="max,-smap"),
    "commas in module command lines": _spec(modules=[(Path("/c/vmlinuz"), "a=1,2 b=x,,y"), (Path("/c,d/initrd"), "")],
                                            xen_cmdline="dom0_mem=512M,max:512M"),
    "boot drive, no Xen, no network (FreeBSD)": _spec(
        xen=None, xen_cmdline="", modules=[], network=False, qmp_sock=None,
        drives=[Drive(Path("/w/freebsd.qcow2"), "lab-root", boot=True), Drive(Path("/w/src.img"), "lab-src", "raw")]),
    "readonly drives only": _spec(drives=[Drive(Path("/b/a.img"), "s0", "raw", True), Drive(Path("/b/b.img"), "s1", "raw", True)]),
    "odd paths": _spec(xen=Path(f"{ODD}/xen"), modules=[(Path(f"{ODD}/vmlinuz"), "x='1' y=\"2\" & <"), (Path(f"{ODD}/init"), "")],
                       drives=[Drive(Path(f"{ODD}/root.qcow2"), "lab-root"), Drive(Path(f"{ODD}/r,o.img"), "lab-ro", "raw", True)],
                       console_log=Path(f"{ODD}/console.log")),
    "extra arguments": _spec(extra=["-d", "guest_errors"]),
    "no drives": _spec(drives=[]),
}


def _argv_drives(argv: list[str]) -> list[dict[str, Any]]:
    """The qemu driver's drives, from its argv (-drive file=<path>,if=none,id=d<i>,...;
    the path may itself hold commas, the rest is the driver's own fixed shape)."""
    out = []
    devices = [d for d in _value(argv, "-device") if d.startswith("virtio-blk-pci,")]
    for i, (drv, dev) in enumerate(zip(_value(argv, "-drive"), devices, strict=True)):
        path, sep, opts = drv.removeprefix("file=").partition(f",if=none,id=d{i},")
        assert sep, drv
        o = dict(kv.split("=", 1) for kv in opts.split(","))
        dv = dict(kv.split("=", 1) for kv in dev.split(",")[1:])
        out.append({"path": path, "format": o["format"], "cache": o["cache"], "discard": o["discard"],
                    "readonly": o.get("readonly") == "on", "serial": dv["serial"], "boot": "bootindex" in dv,
                    "slot": lv.FIRST_SLOT + i})
    return out


def _cpu_of(argv: list[str]) -> tuple[str, dict[str, str]]:
    model, *opts = _value(argv, "-cpu")[0].split(",")
    return model, {o[1:]: {"+": "require", "-": "disable"}[o[0]] for o in opts}


@pytest.mark.parametrize("case", list(CASES))
def test_the_domain_xml_shall_be_the_vm_build_argv_starts(case: str) -> None:
    spec = CASES[case]
    text = lv.render_domain_xml(spec, name="xen-blklab-1-ab", uuid=UUID, owner=OWNER)
    ET.fromstring(text)  # well-formed, whatever the paths hold
    x = lv.parse_domain_xml(text)
    argv = qemu.build_argv(spec)

    assert (x["name"], x["uuid"], x["owner"]) == ("xen-blklab-1-ab", UUID, {"pid": 4242, "start": 99, "kept": False})
    assert x["type"] == {"tcg": "qemu", "kvm": "kvm"}[spec.accel] and x["machine"] == "pc"
    assert (x["cpus"], x["memory_mib"]) == (int(_value(argv, "-smp")[0]), int(_value(argv, "-m")[0].rstrip("M")))
    model, features = _cpu_of(argv)
    if model == "host":
        assert x["cpu"]["mode"] == "host-passthrough"
    elif model == "max":
        assert (x["cpu"]["mode"], x["cpu"]["features"]) == ("maximum", features)
    else:
        assert (x["cpu"]["mode"], x["cpu"]["model"], x["cpu"]["features"]) == ("custom", model, features)
    tb = [o for o in _value(argv, "-accel")[0].split(",") if o.startswith("tb-size=")]
    assert x["tb_cache_mib"] == (int(tb[0].split("=")[1]) if tb else None)
    # -no-reboot; -nodefaults (no USB, no balloon, no display); QEMU's default ACPI
    assert "-no-reboot" in argv and (x["on_reboot"], x["on_poweroff"], x["on_crash"]) == ("destroy",) * 3
    assert (x["usb"], x["memballoon"], x["graphics"], x["interfaces"], x["acpi"]) == (["none"], ["none"], 0, 0, True)

    disks = [{k: d[k] for k in ("path", "format", "cache", "discard", "readonly", "serial", "slot")}
             | {"boot": d["boot_order"] is not None} for d in x["disks"]]
    assert disks == _argv_drives(argv), "the same drives in the same order, serials and PCI slots"
    assert [d["alias"] for d in x["disks"]] == [f"ua-d{i}" for i in range(len(spec.drives))]
    assert len({d["target"] for d in x["disks"]}) == len(spec.drives)
    # a pty `virsh console` can attach to, logged to the same file the qemu driver writes
    assert x["console"] == {"type": "pty", "path": _value(argv, "-serial")[0].removeprefix("file:"), "append": "on",
                            "virsh_console": True}

    # what libvirt cannot say: the multiboot triple and the netdev exactly as the
    # qemu driver's, the NIC with its slot; nothing else (never -qmp: libvirt owns the monitor)
    pt = x["passthrough"]
    assert pt == lv.passthrough(spec)
    for flag in ("-kernel", "-append", "-initrd", "-netdev"):
        assert _value(pt, flag) == _value(argv, flag), flag
    nic = [d for d in _value(argv, "-device") if d.startswith("virtio-net-pci")]
    assert [d for d in _value(pt, "-device")] == [f"{d},addr=0x{lv.FIRST_SLOT + len(spec.drives):02x}" for d in nic]
    assert "-qmp" not in pt and "-serial" not in pt and "-drive" not in pt
    if spec.extra:
        assert pt[-len(spec.extra):] == spec.extra


def test_paths_shall_reach_libvirt_escaped_and_come_back_intact() -> None:
    spec = CASES["odd paths"]
    text = lv.render_domain_xml(spec, name="n", uuid=UUID, owner=OWNER)
    assert "&amp;" in text and "&lt;b&gt;" in text and ODD not in text
    x = lv.parse_domain_xml(text)
    assert [d["path"] for d in x["disks"]] == [f"{ODD}/root.qcow2", f"{ODD}/r,o.img"]
    assert _value(x["passthrough"], "-initrd") == [f"{ODD}/vmlinuz x='1' y=\"2\" & <,{ODD}/init"]


def test_relative_paths_shall_reach_libvirt_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """libvirtd and its QEMU do not run in the lab's directory (a relative LAB_CACHE)."""
    monkeypatch.chdir(tmp_path)
    spec = _spec(xen=Path("c/xen"), modules=[(Path("c/k"), "")], drives=[Drive(Path("w/r.qcow2"), "s")],
                 console_log=Path("r/con.log"))
    x = lv.parse_domain_xml(lv.render_domain_xml(spec, name="n", uuid=UUID, owner=OWNER))
    assert x["disks"][0]["path"] == f"{tmp_path}/w/r.qcow2" and x["console"]["path"] == f"{tmp_path}/r/con.log"
    assert _value(x["passthrough"], "-kernel") == [f"{tmp_path}/c/xen"]
    assert _value(x["passthrough"], "-initrd") == [f"{tmp_path}/c/k"]


def test_kvm_shall_have_no_translation_cache_and_tcg_the_qemu_drivers() -> None:
    assert lv.tb_cache_mib("tcg") == 256 and lv.tb_cache_mib("kvm") is None
    assert "<tcg>" not in lv.render_domain_xml(CASES["kvm"], name="n", uuid=UUID, owner=OWNER)


@pytest.mark.parametrize(("accel", "model", "expected"), [
    ("tcg", "", {"mode": "custom", "model": "qemu64", "features": [
        {"policy": "require", "name": "svm"}, {"policy": "require", "name": "npt"}]}),
    ("tcg", "max,-smap", {"mode": "maximum", "model": "", "features": [{"policy": "disable", "name": "smap"}]}),
    ("tcg", "qemu64,svm=on,x2apic=off", {"mode": "custom", "model": "qemu64", "features": [
        {"policy": "require", "name": "svm"}, {"policy": "disable", "name": "x2apic"}]}),
    ("kvm", "", {"mode": "host-passthrough", "model": "", "features": []}),
])
def test_cpu_xml_shall_say_the_qemu_drivers_cpu(accel: str, model: str, expected: dict) -> None:
    assert lv.cpu_xml(accel, model) == expected


@pytest.mark.parametrize(("accel", "model"), [("tcg", "qemu64,phys-bits=40"), ("kvm", "host,-svm"), ("auto", "")])
def test_cpu_xml_shall_refuse_what_it_cannot_say(accel: str, model: str) -> None:
    with pytest.raises(ValueError):
        lv.cpu_xml(accel, model)


def test_devices_shall_fit_on_pci_bus_0() -> None:
    many = [Drive(Path(f"/w/{i}.img"), f"s{i}", "raw") for i in range(30)]
    with pytest.raises(ValueError, match="slot 32"):
        lv.render_domain_xml(_spec(drives=many), name="n", uuid=UUID, owner=OWNER)
    x = lv.parse_domain_xml(lv.render_domain_xml(_spec(drives=many[:29]), name="n", uuid=UUID, owner=OWNER))
    assert x["disks"][-1]["slot"] == 30 and _value(x["passthrough"], "-device")[0].endswith("addr=0x1f")
    assert [d["target"] for d in x["disks"]][25:27] == ["vdz", "vdaa"]


def test_parse_shall_read_libvirts_live_units() -> None:
    live = f"""<domain type='qemu' id='3'><name>n</name><uuid>{UUID}</uuid>
      <memory unit='KiB'>65536</memory><vcpu placement='static'>1</vcpu>
      <features><tcg><tb-cache unit='KiB'>262144</tb-cache></tcg></features></domain>"""
    x = lv.parse_domain_xml(live)
    assert (x["memory_mib"], x["tb_cache_mib"], x["owner"], x["passthrough"], x["disks"]) == (64, 256, None, [], [])


# ------------------------------------------------------------ owners and leftovers
def _alive(live: dict[int, int]) -> Any:
    return lambda pid, start: pid in live and start in (None, 0, live[pid])


@pytest.mark.parametrize(("name", "owner", "leftover"), [
    ("xen-blklab-10-aa", {"pid": 10, "start": 5}, False),  # its lab runs
    ("xen-blklab-10-aa", {"pid": 11, "start": 5}, True),  # its lab is gone
    ("xen-blklab-10-aa", {"pid": 10, "start": 6}, True),  # pid reused by another process
    ("xen-blklab-11-aa", {"pid": 11, "start": 5, "kept": True}, False),  # --keep: `lab down` ends it
    ("xen-blklab-10-aa", {"pid": 12, "start": 7}, False),  # restored: saved name, owner in metadata
    ("xen-blklab-11-aa", None, True),  # no metadata: the name's pid
    ("xen-blklab-10-aa", None, False),
    ("xen-blklab-weird", None, False),  # proves no owner: never touched
    ("someone-else-11", {"pid": 11, "start": 5}, False),
])
def test_a_leftover_shall_be_a_lab_domain_whose_lab_is_gone(name: str, owner: dict | None, leftover: bool) -> None:
    assert lv.is_leftover(name, owner, alive=_alive({10: 5, 12: 7})) is leftover


def test_domain_names_shall_carry_the_lab_pid_and_be_unique() -> None:
    a, b = lv.domain_name(), lv.domain_name()
    assert a != b and a.startswith(f"{lv.PREFIX}{os.getpid()}-")
    assert lv.owner_alive(os.getpid(), lv.process_start(os.getpid()))
    assert not lv.owner_alive(os.getpid(), (lv.process_start(os.getpid()) or 0) + 1)


def test_snapshot_node_shall_be_the_top_node_under_the_drives_alias() -> None:
    """query-block as libvirt 9.0's QEMU answered it (measured)."""
    qb = [{"device": "", "qdev": "/machine/peripheral/ua-d0/virtio-backend",
           "inserted": {"node-name": "libvirt-2-format", "file": "/w/top.qcow2"}},
          {"device": "", "qdev": "/machine/peripheral/ua-d1/virtio-backend",
           "inserted": {"node-name": "libvirt-1-format", "file": "/w/base.qcow2"}}]
    assert lv.snapshot_node(qb, "d0") == "libvirt-2-format" and lv.snapshot_node(qb, "d1") == "libvirt-1-format"
    with pytest.raises(RuntimeError, match="ua-d2"):
        lv.snapshot_node(qb, "d2")


# ------------------------------------------------------------ access
def _st(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


DIR, FILE = statmod.S_IFDIR, statmod.S_IFREG
QEMU_USER = host.Account("libvirt-qemu", 64055, frozenset({64055, 107}))


def _fs(tree: dict[str, os.stat_result]) -> Any:
    def stat(p: Path) -> os.stat_result:
        if str(p) not in tree:
            raise FileNotFoundError(2, "No such file or directory", str(p))
        return tree[str(p)]
    return stat


OPEN = {"/": _st(DIR | 0o755), "/c": _st(DIR | 0o755), "/c/xen": _st(FILE | 0o644),
        "/r": _st(DIR | 0o755), "/w": _st(DIR | 0o755), "/w/d.qcow2": _st(FILE | 0o600)}


@pytest.mark.parametrize(("changes", "error"), [
    ({}, None),  # a 0600 disk is fine: libvirt chowns it; the way is open
    ({"/c": _st(DIR | 0o700)}, r"cannot enter /c \(drwx------ root:root\), so it cannot reach the Xen kernel /c/xen"),
    ({"/c": _st(DIR | 0o750, gid=107)}, None),  # group kvm: libvirt-qemu is a member
    ({"/c": _st(DIR | 0o705, gid=107)}, r"cannot enter /c"),  # the group's bits decide for a member
    ({"/c/xen": _st(FILE | 0o600)}, r"cannot read the Xen kernel /c/xen .* <qemu:commandline>"),
    ({"/c/xen": _st(FILE | 0o600, uid=64055)}, None),
    ({"/w": _st(DIR | 0o744)}, r"cannot enter /w .*disk lab-root"),
    ({"/r": _st(DIR | 0o700)}, r"cannot enter /r .*the console log's directory"),
])
def test_check_readable_shall_name_the_first_path_libvirt_qemu_cannot_reach(changes: dict, error: str | None) -> None:
    spec = _spec(modules=[], drives=[Drive(Path("/w/d.qcow2"), "lab-root")], console_log=Path("/r/con.log"))
    needs = host.access_needs(spec, chain=lambda p: [])
    stat = _fs(OPEN | changes)
    if error is None:
        host.check_readable(needs, stat=stat, acct=QEMU_USER)
    else:
        with pytest.raises(LabError, match=error) as e:
            host.check_readable(needs, stat=stat, acct=QEMU_USER)
        assert e.value.stage == "boot:libvirt" and "LAB_CACHE" in e.value.message


def test_check_readable_shall_follow_the_backing_chain_and_say_what_is_missing() -> None:
    spec = _spec(xen=None, modules=[], drives=[Drive(Path("/w/d.qcow2"), "lab-root")], console_log=Path("/r/c.log"))
    needs = host.access_needs(spec, chain=lambda p: [Path("/root/.cache/base.img")])
    tree = OPEN | {"/root": _st(DIR | 0o700), "/root/.cache": _st(DIR | 0o755),
                   "/root/.cache/base.img": _st(FILE | 0o644)}
    with pytest.raises(LabError, match="cannot enter /root .*a backing layer of disk lab-root /root/.cache/base.img"):
        host.check_readable(needs, stat=_fs(tree), acct=QEMU_USER)
    with pytest.raises(LabError, match=r"the Xen kernel /c/nope: No such file"):
        host.check_readable([host.Need(Path("/c/nope"), "the Xen kernel", True)], stat=_fs(OPEN), acct=QEMU_USER)
    with pytest.raises(LabError, match="not an absolute path"):
        host.check_readable([host.Need(Path("c/xen"), "x", True)], stat=_fs(OPEN), acct=QEMU_USER)
    root = host.Account("root", 0, frozenset({0}))
    host.check_readable(needs, stat=_fs(tree), acct=root)  # QEMU as root: nothing to check


def test_backing_chain_shall_list_the_layers_under_an_image(tmp_path: Path) -> None:
    if subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0:
        pytest.skip("qemu-img is missing (qemu-utils)")
    qemu.create_disk(tmp_path / "base.qcow2", 1 << 20)
    qemu.create_overlay(tmp_path / "base.qcow2", tmp_path / "mid.qcow2", base_fmt="qcow2")
    qemu.create_overlay(tmp_path / "mid.qcow2", tmp_path / "top.qcow2", base_fmt="qcow2")
    assert host.backing_chain(tmp_path / "top.qcow2") == [tmp_path / "mid.qcow2", tmp_path / "base.qcow2"]
    assert host.backing_chain(tmp_path / "base.qcow2") == []


@pytest.mark.parametrize(("st", "warned"), [
    (_st(statmod.S_IFCHR | 0o600), True),  # no udev: root only, libvirt re-probes on every call
    (_st(statmod.S_IFCHR | 0o660, gid=107), False),  # udev's root:kvm 0660
    (None, False),  # no /dev/kvm: nothing to probe
])
def test_kvm_warning_shall_say_when_libvirt_would_reprobe_qemu_every_call(st: Any, warned: bool) -> None:
    stat = _fs({"/dev/kvm": st} if st else {})
    w = host.kvm_warning(user="libvirt-qemu", stat=stat, acct=QEMU_USER)
    assert (w is not None) is warned
    if w:
        assert "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm" in w


def test_qemu_user_and_run_paths(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "root"\n')
    assert host.qemu_user(conf) == "libvirt-qemu"
    conf.write_text('# comment\n  user = "qemu"\n')
    assert host.qemu_user(conf) == "qemu"
    assert host.run_paths("qemu:///system", "d") == (Path("/run/libvirt/qemu/d.pid"),
                                                      Path("/var/log/libvirt/qemu/d.log"))
    assert host.run_paths("qemu:///session", "d")[1].name == "d.log"


# ------------------------------------------------------------ daemons
D = host.Daemon("libvirtd", (Path("/s/libvirt-sock"), Path("/s/virtqemud-sock")), Path("/p/libvirtd.pid"),
                Path("/l/libvirtd.log"))


@pytest.mark.parametrize(("socks", "pid", "alive", "action"), [
    ({"/s/libvirt-sock"}, 77, True, host.RUNNING),
    ({"/s/virtqemud-sock"}, None, False, host.RUNNING),  # the modular daemon serves qemu:///system
    (set(), 77, True, host.STARTING),  # up, not listening yet: wait, never a second one
    (set(), 77, False, host.START),  # a stale pid file of a dead daemon
    (set(), None, False, host.START),
])
def test_decide_shall_start_a_daemon_only_when_none_answers_or_starts(
        socks: set[str], pid: int | None, alive: bool, action: str) -> None:
    assert host.decide(D, answers=lambda s: str(s) in socks, pid_in=lambda p: pid,
                       alive=lambda p: alive) == action


class _Runner:
    name = "l0"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        self.calls.append(argv)
        rc = 0 if Path(argv[0]).name == "true" else 1
        return Result(tuple(argv), rc, "", "cannot lock pidfile" if rc else "", 0.01)


def test_ensure_daemons_shall_leave_other_uris_alone() -> None:
    runner = _Runner()
    for uri in ("qemu:///session", "qemu+ssh://host/system", "test:///default"):
        rec = host.ensure_daemons(uri, runner=runner)
        assert rec["managed"] is False and rec["daemons"] == []
    assert runner.calls == []


def test_ensure_daemons_shall_use_an_answering_daemon_and_start_none(tmp_path: Path) -> None:
    sock = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        s.listen(1)
        (tmp_path / "pid").write_text(f"{os.getpid()}\n")
        runner = _Runner()
        rec = host.ensure_daemons("qemu:///system", runner=runner,
                                  daemons=(host.Daemon("true", (sock,), tmp_path / "pid", tmp_path / "log"),))
    assert runner.calls == []
    assert rec["daemons"] == [{"name": "true", "action": host.RUNNING, "pid": os.getpid(),
                               "start": lv.process_start(os.getpid())}]


def test_ensure_daemons_shall_fail_naming_what_it_waited_for_with_the_log(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("line 1\nerror: cannot bind\n")
    mute = host.Daemon("true", (tmp_path / "sock",), tmp_path / "pid", tmp_path / "log")
    runner = _Runner()
    with pytest.raises(LabError, match=r"waiting for true to answer on .*/sock") as e:
        host.ensure_daemons("qemu:///system", runner=runner, deadline=Deadline(0.3), daemons=(mute,))
    assert e.value.stage == "boot:libvirt" and "error: cannot bind" in e.value.tail
    assert [Path(c[0]).name for c in runner.calls] == ["true"] and runner.calls[0][1:] == ["-d"]
    failing = dataclasses.replace(mute, name="false")
    with pytest.raises(LabError, match=r"`false -d` exited 1: cannot lock pidfile") as e:
        host.ensure_daemons("qemu:///system", runner=_Runner(), deadline=Deadline(5), daemons=(failing,))
    assert "error: cannot bind" in e.value.tail


def test_stop_daemons_shall_stop_only_what_the_lab_started_and_still_is(tmp_path: Path) -> None:
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        started = {"name": "sleep", "action": host.START, "pid": procs[0].pid, "start": lv.process_start(procs[0].pid)}
        reused = {"name": "sleep", "action": host.START, "pid": procs[1].pid,
                  "start": (lv.process_start(procs[1].pid) or 0) - 1}  # the pid now names another process
        theirs = {"name": "sleep", "action": host.RUNNING, "pid": procs[2].pid,
                  "start": lv.process_start(procs[2].pid)}
        done = host.stop_daemons({"daemons": [started, reused, theirs]}, timeout=5)
        assert done[0].endswith("left alone") and done[1] == f"sleep pid {procs[0].pid}: stopped" and len(done) == 2
        assert procs[0].wait(5) == -15 and procs[1].poll() is None and procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()
