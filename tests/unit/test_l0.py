"""The L0 driver seam (lab/l0.py) and its wiring: the driver table and how a run
picks a driver (scenario key, `lab run --driver/--libvirt-uri`, a bad value a
clear usage error), the state key that never lets the two drivers share a
state, the libvirt driver's warm start (save, seal, restore onto new overlays,
SSH sessions opened again), its record, the run-start sweep, `--keep` and `lab
down`, and a libvirt failure that is the lab's ERROR. No libvirtd and no
libvirt-python: stand-ins take the connection's place."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import tempfile
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab import boot, cli, guests, l0, l1state, libvirt_host, orphans, pipeline, qemu, scenario
from lab import libvirt as lv
from lab.errors import LabError, ScenarioError, StateBusy
from lab.runner import CommandLog, LocalRunner

UUID = "6f1c1d5e-8a3e-4f0e-9d1e-2a3b4c5d6e7f"
NAME = "xen-blklab-4242-0a1b2c3d"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE", str(cache))
    return cache


def _where(tmp_path: Path) -> boot.Where:
    results, work = tmp_path / "results" / "r", tmp_path / "cache" / "runs" / "run-x"
    results.mkdir(parents=True)
    work.mkdir(parents=True)
    return boot.Where(results, work, CommandLog(None), LocalRunner(CommandLog(None)))


def _spec(tmp_path: Path, *, port: int = 40022, accel: str = "tcg") -> qemu.VmSpec:
    return qemu.VmSpec(
        accel=accel, cpus=2, memory_mib=1536, xen=tmp_path / "img" / "xen", xen_cmdline="console=com1",
        modules=[(tmp_path / "img" / "vmlinuz", "console=hvc0"), (tmp_path / "img" / "initrd.img", "")],
        drives=[qemu.Drive(tmp_path / "st" / "dom0-root.qcow2", "lab-dom0-root"),
                qemu.Drive(tmp_path / "st" / "lin1-xvdb.qcow2", "lab-lin1-xvdb"),
                qemu.Drive(tmp_path / "st" / "boot.img", "lab-boot", fmt="raw", readonly=True)],
        ssh_port=port, console_log=tmp_path / "results" / "r" / "console-xen.log", qmp_sock=None)


# ------------------------------------------------------------ the table, the scenario key, the CLI
def test_the_table_shall_hold_one_driver_per_scenario_value() -> None:
    field = next(f for f in dataclasses.fields(scenario.LabCfg) if f.name == "driver")
    assert set(l0.DRIVERS) == set(typing.get_args(typing.get_type_hints(scenario.LabCfg)["driver"]))
    assert field.default == "qemu"
    q = l0.driver("qemu")
    assert isinstance(q, l0.QemuDriver) and q.record == {"driver": "qemu"} and q.key_inputs() == {}
    assert q.prepare() == {} and q.down({}, []) is None
    v = l0.driver("libvirt")
    assert isinstance(v, l0.LibvirtDriver) and v.record == {"driver": "libvirt", "uri": "qemu:///system"}
    assert l0.driver("libvirt", uri="qemu:///session").uri == "qemu:///session"


@pytest.mark.parametrize(("name", "uri", "needle"), [
    ("xen", None, "expected one of 'qemu', 'libvirt', got 'xen'"),
    ("qemu", "qemu:///system", "is for the libvirt driver; this run's driver is 'qemu'"),
    ("libvirt", "qemu+ssh://host/system", "expected a local libvirt URI"),
    ("libvirt", "xen:///system", "expected a local libvirt URI"),
    ("libvirt", "", "expected a local libvirt URI"),
])
def test_a_bad_driver_or_uri_shall_be_a_usage_error(name: str, uri: str | None, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        l0.driver(name, uri=uri)


def test_the_scenario_key_shall_take_qemu_or_libvirt_and_name_file_key_and_choices(tmp_path: Path) -> None:
    assert scenario.load("default").lab.driver == "qemu"
    sc = scenario.from_dict({"name": "x", "lab": {"driver": "libvirt"}}, str(tmp_path / "x.toml"))
    assert sc.lab.driver == "libvirt"
    assert 'driver = "libvirt"' in scenario.to_toml(sc)
    f = tmp_path / "bad.toml"
    f.write_text('[lab]\ndriver = "virtualbox"\n')
    with pytest.raises(ScenarioError) as e:
        scenario.load(f)
    assert str(f) in e.value.message and "'lab.driver'" in e.value.message
    assert "expected one of 'qemu', 'libvirt', got 'virtualbox'" in e.value.message


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[pipeline.Options]:
    """pipeline.run replaced: what `lab run` would have run with, and a PASS."""
    seen: list[pipeline.Options] = []

    def run(sc: scenario.Scenario, opts: pipeline.Options) -> dict[str, Any]:
        seen.append(opts)
        return {"scenario": sc.name, "verdict": "PASS", "exit_code": 0, "bisect_code": 0, "results_dir": "r",
                "summary": "", "wall_s": 1}

    monkeypatch.setattr(pipeline, "run", run)
    return seen


def test_lab_run_shall_pass_driver_and_uri_to_the_run(captured: list[pipeline.Options]) -> None:
    assert cli.main(["run", "default", "--driver", "libvirt", "--libvirt-uri", "qemu:///session"]) == 0
    assert (captured[0].driver, captured[0].libvirt_uri) == ("libvirt", "qemu:///session")
    assert cli.main(["run", "default"]) == 0
    assert (captured[1].driver, captured[1].libvirt_uri) == (None, None)  # the scenario's [lab] driver decides


@pytest.mark.parametrize(("argv", "needle"), [
    (["--libvirt-uri", "qemu+ssh://h/system", "--driver", "libvirt"], "expected a local libvirt URI"),
    (["--libvirt-uri", "qemu:///system"], "is for the libvirt driver; this run's driver is 'qemu'"),
])
def test_lab_run_with_a_bad_uri_shall_exit_4_and_start_nothing(
    argv: list[str], needle: str, captured: list[pipeline.Options], capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["run", "default", *argv]) == 4
    assert needle in capsys.readouterr().err and captured == []


def test_lab_run_with_an_unknown_driver_shall_exit_4(captured: list[pipeline.Options],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "default", "--driver", "virtualbox"])
    assert e.value.code == 4 and "invalid choice: 'virtualbox'" in capsys.readouterr().err and captured == []


# ------------------------------------------------------------ the state key
def test_the_state_key_shall_differ_by_driver_and_stay_as_it_was_for_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu, "qemu_version", lambda: "QEMU emulator version 7.2.0 (test)")
    monkeypatch.setattr(l1state.shutil, "which", lambda name: str(tmp_path / "qemu-bin"))
    (tmp_path / "qemu-bin").write_bytes(b"qemu")
    for name in ("xen", "vmlinuz", "initrd.img"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(name.encode())
    spec = _spec(tmp_path)
    slots = [l1state.Slot("lin1-xvdb", "lab-lin1-xvdb", size=1 << 30)]

    def key(d: l0.Driver | None) -> str:
        return l1state.state_key(l1state.key_inputs(spec, slots, None, d.key_inputs() if d else None))

    lib = l0.LibvirtDriver()
    lib.record["libvirt_version"] = "9.0.0"
    newer = l0.LibvirtDriver()
    newer.record["libvirt_version"] = "9.1.0"
    assert key(l0.QemuDriver()) == key(None)  # states saved before there was a choice still load
    assert len({key(l0.QemuDriver()), key(lib), key(newer)}) == 3
    assert l1state.key_inputs(spec, slots, None, lib.key_inputs())["driver"] == "libvirt"


def test_states_list_shall_say_which_driver_saved_each(tmp_path: Path) -> None:
    for key, inputs in (("a" * 20, {}), ("b" * 20, {"driver": "libvirt"})):
        d = l1state.states_dir() / key
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"created": 1, "inputs": inputs}))
    assert [(s["key"][0], s["driver"]) for s in l1state.list_states()] == [("a", "qemu"), ("b", "libvirt")]


# ------------------------------------------------------------ the libvirt driver, with stand-ins
class _Dom:
    def __init__(self, name: str = NAME, uuid: str = UUID) -> None:
        self._name, self._uuid, self.calls = name, uuid, []

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:  # noqa: N802 (libvirt's name)
        return self._uuid

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")


class _Conn:
    closed = 0

    def getURI(self) -> str:  # noqa: N802
        return "qemu:///session"

    def close(self) -> None:
        _Conn.closed += 1


def _vm(spec: qemu.VmSpec, tmp_path: Path, *, offset: int = 0) -> lv.LibvirtVm:
    vm = lv.LibvirtVm(spec, xml=f"<domain><name>{NAME}</name><uuid>{UUID}</uuid></domain>", dom=_Dom(),
                      conn=_Conn(), stderr_path=tmp_path / "qemu-stderr.log", log_offset=offset)
    vm.stop = lambda timeout=10: None  # type: ignore[method-assign]  # no libvirt here
    return vm


def _state(tmp_path: Path, slots: list[l1state.Slot]) -> l1state.State:
    state = l1state.begin("c" * 20)
    for s in slots:
        state.disk(s).write_bytes(b"disk")
    state.boot_disk.write_bytes(b"boot")
    return state


def test_the_libvirt_save_shall_seal_the_state_and_restore_onto_new_overlays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """virDomainSave stops the domain; the state is sealed (meta.json, read-only
    files); the run goes on in a domain restored from it whose writable disks are
    new overlays in the run's work directory over the state's, with the same boot
    disk, SSH port and console, keeping libvirt's log from where it began."""
    where = _where(tmp_path)
    slots = [l1state.Slot("dom0-root", "lab-dom0-root", base=tmp_path / "root.img"),
             l1state.Slot("lin1-xvdb", "lab-lin1-xvdb", size=1 << 30)]
    state = _state(tmp_path, slots)
    spec = dataclasses.replace(_spec(tmp_path), drives=[
        qemu.Drive(state.disk(slots[0]), "lab-dom0-root"), qemu.Drive(state.disk(slots[1]), "lab-lin1-xvdb"),
        qemu.Drive(state.boot_disk, "lab-boot", fmt="raw", readonly=True)])
    old = _vm(spec, tmp_path, offset=123)
    calls: dict[str, Any] = {}

    def save(vm: lv.LibvirtVm, path: Path) -> float:
        path.write_bytes(b"libvirt save image")
        calls["saved"] = vm
        return 1.5

    def restore(conn: Any, path: Path, spec: qemu.VmSpec, *, stderr_path: Path, owner: Any = None,
                paused: bool = False, log_offset: int | None = None) -> tuple[lv.LibvirtVm, float]:
        calls.update(restore_path=path, restore_spec=spec, log_offset=log_offset, owner=owner)
        return _vm(spec, tmp_path, offset=log_offset or 0), 2.25

    monkeypatch.setattr(lv, "save", save)
    monkeypatch.setattr(lv, "restore", restore)
    monkeypatch.setattr(lv, "connect", lambda uri: _Conn())
    monkeypatch.setattr(lv, "saved_identity", lambda conn, path: (NAME, UUID))
    monkeypatch.setattr(lv, "running", lambda conn, uuid: None)
    monkeypatch.setattr(qemu, "create_overlay", lambda base, overlay, base_fmt="raw": overlay.write_bytes(b"ov"))
    driver = l0.LibvirtDriver("qemu:///session")
    with contextlib.ExitStack() as stack:
        saved = driver.save(old, state, slots, where, stack, inputs={"driver": "libvirt"})
    assert calls["saved"] is old and calls["restore_path"] == state.file and calls["owner"] is stack
    assert saved.restarted and saved.vm is not old and saved.detail["save_s"] == 1.5
    assert saved.detail["restore_s"] == 2.25 and saved.paused_s >= 0
    new = calls["restore_spec"]
    assert [d.path for d in new.drives] == [where.work / "dom0-root.qcow2", where.work / "lin1-xvdb.qcow2",
                                            state.boot_disk]
    assert [d.serial for d in new.drives] == [d.serial for d in spec.drives]
    assert (new.ssh_port, new.console_log) == (spec.ssh_port, spec.console_log)
    assert calls["log_offset"] == 123
    # sealed: a state promote may keep, read-only
    assert json.loads((state.dir / "meta.json").read_text())["inputs"] == {"driver": "libvirt"}
    for f in (state.file, state.boot_disk, *(state.disk(s) for s in slots)):
        assert stat.S_IMODE(f.stat().st_mode) == 0o400, f
    assert driver.record["restarted"]["domain_xml"] == "domain-restored.xml"
    assert (where.results / "domain-restored.xml").is_file() and (where.results / "qemu-argv-restored.json").is_file()


def test_a_state_another_run_has_shall_be_busy_and_not_restored(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    where = _where(tmp_path)
    state = _state(tmp_path, [])
    monkeypatch.setattr(lv, "connect", lambda uri: _Conn())
    monkeypatch.setattr(lv, "saved_identity", lambda conn, path: (NAME, UUID))
    monkeypatch.setattr(lv, "running", lambda conn, uuid: NAME)
    monkeypatch.setattr(lv, "restore", lambda *a, **k: pytest.fail("restored a state that runs"))
    with contextlib.ExitStack() as stack, pytest.raises(StateBusy, match="one run at a time"):
        l0.LibvirtDriver("qemu:///session").restore(_spec(tmp_path), state, where, stack)


def test_a_start_shall_record_the_domain_and_keep_its_xml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """record.json's l0 says the domain's name and uuid and what went through the
    passthrough; domain.xml and QEMU's argv as libvirt built it are kept. A port
    taken meanwhile is tried once more on another."""
    where = _where(tmp_path)
    tries: list[int] = []

    def start(spec: qemu.VmSpec, *, uri: str, stderr_path: Path, owner: Any = None) -> lv.LibvirtVm:
        tries.append(spec.ssh_port)
        if len(tries) == 1:
            raise LabError("boot:qemu", "domain ended at once", tail="-netdev user,hostfwd=...: Could not set up")
        return _vm(spec, tmp_path)

    monkeypatch.setattr(lv, "start", start)
    monkeypatch.setattr(qemu, "free_port", lambda: 50000)
    driver = l0.LibvirtDriver("qemu:///session")
    with contextlib.ExitStack() as stack:
        vm, spec = driver.start(_spec(tmp_path), where, stack)
    assert tries == [40022, 50000] and spec.ssh_port == 50000
    rec = driver.record
    assert rec["domain"] == {"name": NAME, "uuid": UUID} and rec["domain_xml"] == "domain.xml"
    assert rec["passthrough"][:2] == ["-kernel", str(tmp_path / "img" / "xen")]
    assert "-initrd" in rec["passthrough"] and any("restrict=on" in a for a in rec["passthrough"])
    assert (where.results / "domain.xml").read_text() == vm.xml  # type: ignore[attr-defined]
    assert json.loads((where.results / "qemu-argv.json").read_text())  # QEMU's argv, or libvirt's words for it


def test_prepare_shall_start_the_daemons_and_sweep_dead_labs_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    daemons = {"uri": "qemu:///system", "managed": True, "warnings": [],
               "daemons": [{"name": "virtlogd", "action": "started", "pid": 7, "start": 1}]}
    monkeypatch.setattr(libvirt_host, "ensure_daemons", lambda uri, deadline=None: daemons)
    monkeypatch.setattr(lv, "connect", lambda uri: _Conn())
    monkeypatch.setattr(lv, "version", lambda conn: "9.0.0")
    monkeypatch.setattr(lv, "sweep", lambda conn: ["xen-blklab-1-dead"])
    driver = l0.LibvirtDriver()
    assert driver.prepare() == {"domains": ["xen-blklab-1-dead"]}
    assert driver.record["daemons"] is daemons and driver.record["libvirt_version"] == "9.0.0"
    assert driver.key_inputs() == {"driver": "libvirt", "libvirt_version": "9.0.0"}


def test_a_libvirt_failure_at_run_start_shall_be_the_labs_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libvirt that cannot be reached is ERROR at boot:libvirt with the driver's
    record, before any image is built or anything is booted."""
    class Broken(l0.LibvirtDriver):
        def prepare(self) -> dict[str, Any]:
            raise LabError("boot:libvirt", "cannot connect to libvirt at qemu:///system: no daemon")

    monkeypatch.setitem(l0.DRIVERS, "libvirt", lambda uri: Broken(uri))
    monkeypatch.setattr(pipeline, "dom0_platform",
                        lambda os_: SimpleNamespace(media=lambda *a, **k: pytest.fail("images after a libvirt error")))
    sc = dataclasses.replace(scenario.load("default"), lab=dataclasses.replace(scenario.LabCfg(), driver="libvirt"))
    rec = pipeline.run(sc, pipeline.Options(results_root=tmp_path / "results"))
    assert (rec["verdict"], rec["stage"], rec["exit_code"], rec["bisect_code"]) == ("ERROR", "boot:libvirt", 4, 125)
    assert "no daemon" in rec["error"] and rec["l0"]["driver"] == "libvirt"
    assert json.loads((Path(rec["results_dir"]) / "record.json").read_text())["l0"]["uri"] == "qemu:///system"
    assert not list(pipeline.runs_dir().glob("run-*"))  # the work directory went with the run


def test_pause_l1_shall_go_through_libvirts_suspend_and_its_failure_be_the_labs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    class LibvirtError(Exception):
        def get_error_code(self) -> int:
            return 1

    monkeypatch.setattr(lv, "_libvirt", lambda module="libvirt": SimpleNamespace(libvirtError=LibvirtError))
    vm = _vm(_spec(tmp_path), tmp_path)
    vm.pause()
    vm.resume()
    assert vm._dom.calls == ["suspend", "resume"] and vm.returncode is None

    def refuse() -> None:
        raise LibvirtError("Requested operation is not valid: domain is not running")

    vm._dom.suspend = refuse
    with pytest.raises(LabError, match="libvirt could not suspend domain") as e:
        vm.pause()
    assert e.value.stage == "l0"


# ------------------------------------------------------------ boot.save_state and the reconnects
class _Runner:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def reconnect(self, deadline: Any, *, stage: str, connect: Any = None) -> float:
        self.calls.append(("reconnect", stage, connect is not None))
        return 0.1

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Any:
        self.calls.append(("run", argv[0]))
        return SimpleNamespace(check=lambda stage: None)


class _Saving:
    """A stand-in driver whose save leaves a new VM (libvirt) or the same (qemu)."""

    name = "stand-in"

    def __init__(self, restarted: bool) -> None:
        self.restarted = restarted
        self.record: dict[str, Any] = {}

    def save(self, vm: Any, state: Any, slots: Any, where: Any, stack: Any, *, inputs: Any) -> l0.Saved:
        if not self.restarted:
            return l0.Saved(vm, vm.spec, 0.5)
        new = SimpleNamespace(pid=777, spec=dataclasses.replace(vm.spec, ssh_port=50001))
        return l0.Saved(new, new.spec, 3.0, restarted=True, detail={"save_s": 1.0})  # type: ignore[arg-type]


@pytest.mark.parametrize("restarted", [False, True])
def test_save_state_shall_reconnect_dom0_only_when_l1_went_on_in_a_new_process(
    tmp_path: Path, restarted: bool,
) -> None:
    where = _where(tmp_path)
    state = l1state.begin("d" * 20)
    con = tmp_path / "results" / "r" / "console-xen.log"
    con.write_text("Xen\n")
    dom0, clock = _Runner(), []
    old = SimpleNamespace(pid=555, spec=_spec(tmp_path))
    l1 = boot.L1(old, old.spec, dom0, SimpleNamespace(set_clock=clock.append),  # type: ignore[arg-type]
                 SimpleNamespace(path=con), [], {}, {}, _Saving(restarted),  # type: ignore[arg-type]
                 pending_state=state, pending_inputs={"guests": [{"name": "lin1"}]})
    with contextlib.ExitStack() as stack:
        went_on = boot.save_state(l1, where, stack, ["x"], deadline=boot.Deadline(60))
    assert went_on is restarted and (state.dir / "console-boot.log").read_text() == "Xen\n"
    assert l1.record["saved_guests"] == ["lin1"]
    if restarted:
        assert l1.vm.pid == 777 and l1.spec.ssh_port == 50001 and l1.record["save_restarted"] == {"save_s": 1.0}
        assert dom0.calls == [("reconnect", "boot:save", True)] and len(clock) == 1
        assert json.loads((where.work / "owner.json").read_text())["qemu_pid"] == 777
    else:
        assert l1.vm is old and dom0.calls == [] and clock == [] and l1.record["save_paused_s"] == 0.5


def test_guests_shall_reconnect_and_set_their_clocks(tmp_path: Path) -> None:
    runners = [_Runner(), _Runner()]
    gs = [guests.Guest(scenario.GuestCfg(name=f"g{i}"), f"10.99.0.{10 + i}", i + 1, r,  # type: ignore[arg-type]
                       SimpleNamespace(set_clock_argv=lambda t: ["date", f"@{t}"]))  # type: ignore[arg-type]
          for i, r in enumerate(runners)]
    guests.reconnect(scenario.load("default"), gs, deadline=boot.Deadline(60))
    assert all(r.calls == [("reconnect", "boot:save", False), ("run", "date")] for r in runners)


# ------------------------------------------------------------ what libvirt's QEMU user must reach
@pytest.mark.skipif(os.geteuid() != 0, reason="let_through and the staged copies chown: root only")
def test_the_work_directory_shall_let_qemus_user_through_and_unreadable_modules_be_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lab's images are root's (the dom0 initrd 0400); libvirt does not chown
    what goes through <qemu:commandline>: such a file is copied into the run's
    work directory for QEMU's user; the work directory lets that user in (not
    list). `nobody` stands in for libvirt-qemu."""
    top = Path(tempfile.mkdtemp(prefix="lab-l0-test-", dir="/tmp"))
    try:
        top.chmod(0o755)
        img, runs = top / "img", top / "runs"
        img.mkdir(mode=0o755)
        runs.mkdir(mode=0o755)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=runs))  # 0700, as the pipeline's
        for name, mode in (("xen", 0o444), ("vmlinuz", 0o444), ("initrd.img", 0o400)):
            (img / name).write_bytes(name.encode())
            (img / name).chmod(mode)
        monkeypatch.setattr(libvirt_host, "qemu_user", lambda conf=None: "nobody")
        spec = dataclasses.replace(_spec(top), xen=img / "xen",
                                   modules=[(img / "vmlinuz", "x"), (img / "initrd.img", "")])
        driver = l0.LibvirtDriver()
        out = driver._reachable(spec, boot.Where(top, work, CommandLog(None), LocalRunner(CommandLog(None))))
        assert out.xen == img / "xen" and out.modules[0] == (img / "vmlinuz", "x")
        copy = out.modules[1][0]
        assert copy.parent == work / "l0" and copy.read_bytes() == b"initrd.img" and out.modules[1][1] == ""
        st = copy.stat()
        assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o400
        assert stat.S_IMODE(work.stat().st_mode) == 0o710 and work.stat().st_gid == 65534
        assert driver.record["staged"] == [{"file": str(img / "initrd.img"), "copy": str(copy),
                                            "why": "nobody cannot read it"}]
        assert libvirt_host.readable_by(copy, user="nobody")
    finally:
        import shutil

        shutil.rmtree(top, ignore_errors=True)


def test_a_cache_qemus_user_cannot_enter_shall_be_refused_naming_it_before_anything_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    where = _where(tmp_path)
    blocked = tmp_path / "cache"
    blocked.chmod(0o700)
    monkeypatch.setattr(libvirt_host, "qemu_user", lambda conf=None: "nobody")
    # the first directory on the way that nobody may enter (pytest's own tmp may block before `blocked`)
    with pytest.raises(LabError, match=r"cannot enter \S+ \(drwx------ .*LAB_CACHE/runs.*LAB_CACHE=/var/cache") as e:
        l0.LibvirtDriver()._reachable(_spec(tmp_path), where)
    assert e.value.stage == "boot:libvirt" and not (where.work / "l0").exists()


def test_kvm_that_libvirts_qemu_cannot_open_shall_be_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirt_host, "kvm_warning", lambda user: "/dev/kvm (crw------- root:root) exists but ...")
    with pytest.raises(LabError, match="the accelerator is KVM, but libvirt's QEMU cannot use it: /dev/kvm"):
        l0.LibvirtDriver()._reachable(_spec(tmp_path, accel="kvm"), _where(tmp_path))


# ------------------------------------------------------------ the sweep's proof, --keep, lab down
def test_libvirts_qemu_shall_be_proven_a_runs_by_its_blockdev_json(monkeypatch: pytest.MonkeyPatch) -> None:
    work = "/var/cache/xen-blklab/runs/run-1"
    argv = ["/usr/bin/qemu-system-x86_64", "-name", f"guest={NAME},debug-threads=on", "-blockdev",
            f'{{"driver":"file","filename":"{work}/dom0-root.qcow2","node-name":"libvirt-3-storage"}}']
    monkeypatch.setattr(orphans, "_argv", lambda pid: argv)
    assert orphans.lab_qemu_problem(1234, [work]) is None
    assert "uses no file of" in str(orphans.lab_qemu_problem(1234, ["/var/cache/xen-blklab/runs/run-2"]))
    assert "uses no file of" in str(orphans.lab_qemu_problem(1234, ["/var/cache/xen-blklab/runs/run"]))


class _Destroyable(_Dom):
    def __init__(self, name: str, *, active: bool = True) -> None:
        super().__init__(name)
        self.active = active

    def isActive(self) -> bool:  # noqa: N802
        return self.active

    def destroy(self) -> None:
        self.calls.append("destroy")


@pytest.mark.parametrize(("name", "prove", "done"), [
    (NAME, None, f"domain {NAME} destroyed (QEMU pid 4321)"),
    ("someone-elses", None, "not the lab's"),
    (NAME, "process 4321 is a QEMU that uses no file of /w", "uses no file of /w: nothing was destroyed"),
])
def test_lab_down_shall_destroy_only_the_proven_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, prove: str | None, done: str,
) -> None:
    dom = _Destroyable(name)
    conn = SimpleNamespace(lookupByUUIDString=lambda uuid: dom, getURI=lambda: "qemu:///session")
    monkeypatch.setattr(lv, "_libvirt", lambda module="libvirt": SimpleNamespace(libvirtError=RuntimeError,
                                                                                VIR_ERR_NO_DOMAIN=42))
    monkeypatch.setattr(lv, "run_paths", lambda uri, n: (tmp_path / "pid", tmp_path / "log"))
    (tmp_path / "pid").write_text("4321\n")
    if prove is None and name == NAME:
        assert lv.end_kept(conn, UUID, name=NAME, prove=lambda pid: prove) == done
        assert dom.calls == ["destroy"]
    else:
        with pytest.raises(LabError, match=done):
            lv.end_kept(conn, UUID, name=NAME, prove=lambda pid: prove)
        assert dom.calls == []


def _kept_libvirt_lab(tmp_path: Path, cache: Path, **info: object) -> tuple[Path, Path]:
    work = cache / "runs" / "run-20250101T000000Z-abc"
    work.mkdir(parents=True)
    (work / "dom0-root.qcow2").write_bytes(b"x")
    lab = tmp_path / "results" / "kept"
    lab.mkdir(parents=True)
    data = {"qemu_pid": 1 << 22, "ssh_port": 2222, "work": str(work), "socket_dirs": [],
            "keys": str(cache / "keys"), "guests": {}, "driver": "libvirt", "uri": "qemu:///system",
            "domain": NAME, "uuid": UUID} | info
    (lab / "lab.json").write_text(json.dumps(data))
    return lab, work


def test_lab_down_of_a_kept_libvirt_lab_shall_go_through_libvirt(
    tmp_path: Path, _isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    lab, work = _kept_libvirt_lab(tmp_path, _isolated)
    seen = []

    def down(self: l0.LibvirtDriver, info: dict[str, Any], works: list[str]) -> str:
        seen.append((self.uri, info["domain"], info["uuid"], works))
        return f"domain {NAME} destroyed (QEMU pid 9)"

    monkeypatch.setattr(l0.LibvirtDriver, "down", down)
    assert cli.main(["down", str(lab)]) == 0
    assert seen == [("qemu:///system", NAME, UUID, [str(work)])]
    assert not work.exists() and (lab / "lab.json.down").exists()
    assert f"domain {NAME} destroyed" in capsys.readouterr().out


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("uri", "qemu+ssh://elsewhere/system", "'uri' is 'qemu+ssh://elsewhere/system', not a local libvirt URI"),
    ("domain", "production-db", "'domain' is 'production-db', not a lab's domain"),
    ("uuid", "x; reboot", "'uuid' is 'x; reboot', not a domain uuid"),
    ("driver", "vmware", "'driver' is 'vmware', not an L0 driver"),
])
def test_lab_down_shall_refuse_a_libvirt_lab_json_the_lab_did_not_write(
    tmp_path: Path, _isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    field: str, value: str, needle: str,
) -> None:
    lab, work = _kept_libvirt_lab(tmp_path, _isolated, **{field: value})
    monkeypatch.setattr(l0.LibvirtDriver, "down", lambda *a: pytest.fail("acted on a lab.json it refused"))
    assert cli.main(["down", str(lab)]) == 4
    err = capsys.readouterr().err
    assert needle in err and "nothing was killed or deleted" in err, err
    assert work.exists() and (lab / "lab.json").exists()


def test_keep_shall_mark_the_domain_and_say_how_to_reach_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marked = []
    monkeypatch.setattr(lv, "mark_kept", marked.append)
    vm = _vm(_spec(tmp_path), tmp_path)
    info = l0.LibvirtDriver().keep(vm)
    assert marked == [vm] and info == {"driver": "libvirt", "uri": "qemu:///system", "domain": NAME, "uuid": UUID}

    def refuse(vm: lv.LibvirtVm) -> None:
        raise LabError("keep", "libvirt could not mark domain: gone")

    monkeypatch.setattr(lv, "mark_kept", refuse)
    assert l0.LibvirtDriver().keep(vm)["kept_mark"] == "libvirt could not mark domain: gone"
    assert l0.QemuDriver().keep(vm) == {}  # lab.json of a qemu lab stays as it was


def test_the_summary_shall_name_the_domain_under_libvirt_and_stay_as_it_was_under_qemu() -> None:
    from lab import report

    rec = {"verdict": "PASS", "scenario": "default", "wall_s": 90, "accel": "tcg", "results_dir": "r"}
    assert report.summary_lines(rec | {"l0": {"driver": "qemu"}})[0] == "PASS  default  (90s, accel tcg)"
    line = report.summary_lines(rec | {"l0": {"driver": "libvirt", "domain": {"name": NAME, "uuid": UUID}}})[0]
    assert line == f"PASS  default  (90s, accel tcg, libvirt domain {NAME})"
