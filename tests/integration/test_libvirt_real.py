"""lab/libvirt.py against a REAL libvirtd (qemu:///system), with a tiny VM and no
Xen: SeaBIOS on one empty qcow2 overlay, 64 MiB, user networking with the SSH
forward. The driver shall start a transient domain that runs the spec's VM (the
same disks, CPU, translation cache and restricted network the qemu driver would
give it), answer QMP through libvirt, leave no domain after `stop()`, save and
restore it onto a new overlay, and find the domains of a dead lab.

libvirtd and virtlogd are started by `ensure_daemons` if none answers, and the
ones it started are stopped at the end (LAB_KEEP_LIBVIRTD=1 leaves them up).
Skipped, saying why, without the libvirt packages, libvirt-python or root.
Every domain and file is removed even when a test fails. About 10 s of VM time."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from lab import l0, l1state, libvirt_host, orphans, qemu
from lab import libvirt as lv
from lab.boot import Where
from lab.errors import LabError, StateBusy
from lab.runner import CommandLog, LocalRunner
from lab.timing import Deadline

URI = "qemu:///system"
LOGS = Path("/var/log/libvirt/qemu")


def _why_skip() -> str | None:
    if shutil.which("libvirtd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) is None:
        return ("the libvirt packages are missing (libvirt-daemon-system libvirt-daemon-driver-qemu "
                "libvirt-clients; `make deps`)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not importable (`make deps`, then pip install -e '.[libvirt]': it builds against libvirt-dev)"
    if os.geteuid() != 0:
        return "qemu:///system and its daemons need root"
    if shutil.which("qemu-img") is None:
        return "qemu-img is missing (qemu-utils)"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict]:
    record = libvirt_host.ensure_daemons(URI, deadline=Deadline(120))
    print("\nensure_daemons:", json.dumps(record))
    yield record
    if os.environ.get("LAB_KEEP_LIBVIRTD") != "1":
        print("\nstop_daemons:", libvirt_host.stop_daemons(record))


@pytest.fixture(scope="module")
def conn(daemons: dict) -> Iterator[Any]:
    t = time.monotonic()
    c = lv.connect(URI)
    print(f"\nfirst connection: {time.monotonic() - t:.2f} s")
    yield c
    c.close()


@pytest.fixture()
def work(conn: Any) -> Iterator[Path]:
    """A directory libvirt's QEMU user can traverse (/tmp/pytest-* under /root's
    tmp would not do: check_readable says so), and every domain this test made
    destroyed afterwards, whatever happened."""
    d = Path(tempfile.mkdtemp(prefix="lab-libvirt-test-", dir="/var/tmp"))
    d.chmod(0o755)
    before = {dom.name() for dom in conn.listAllDomains(0)}
    logs = set(LOGS.glob(f"{lv.PREFIX}*.log"))
    try:
        yield d
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name() not in before and dom.name().startswith(lv.PREFIX):
                dom.destroy()
        shutil.rmtree(d, ignore_errors=True)
        for log in set(LOGS.glob(f"{lv.PREFIX}*.log")) - logs:  # libvirt's logs of this test's domains
            log.unlink(missing_ok=True)


def _img(*argv: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *argv], check=True, timeout=30)


def _spec(work: Path, disk: Path, *, console: str = "console.log") -> qemu.VmSpec:
    return qemu.VmSpec(accel="tcg", cpus=2, memory_mib=64, xen=None, xen_cmdline="", modules=[],
                       drives=[qemu.Drive(disk, "lab-test", boot=True)], ssh_port=qemu.free_port(),
                       console_log=work / console, qmp_sock=None)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _block_file(vm: lv.LibvirtVm, alias: str = "ua-d0") -> str:
    blocks = vm.qmp("query-block")
    assert isinstance(blocks, list)
    return next(str(b["inserted"]["file"]) for b in blocks if f"/{alias}/" in str(b.get("qdev")))


def test_a_transient_domain_shall_run_the_spec_answer_qmp_and_leave_nothing(conn: Any, work: Path) -> None:
    _img(str(work / "base.qcow2"), "16M")
    _img("-F", "qcow2", "-b", str(work / "base.qcow2"), str(work / "top.qcow2"))
    spec = _spec(work, work / "top.qcow2")
    with ExitStack() as stack:
        t = time.monotonic()
        vm = lv.start(spec, uri=URI, stderr_path=work / "qemu.log", owner=stack)
        print(f"\nstart: {time.monotonic() - t:.2f} s, domain {vm.name}, QEMU pid {vm.pid}")
        assert vm.alive() and vm.pid > 0
        argv = _cmdline(vm.pid)
        # the same VM the qemu driver would start: TCG with its translation cache, its
        # CPU model, the restricted user network with the SSH forward, as libvirt-qemu
        assert argv[argv.index("-accel") + 1] == "tcg,tb-size=256"
        assert argv[argv.index("-cpu") + 1] == "qemu64,svm=on,npt=on"
        assert f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22" in argv
        assert Path(f"/proc/{vm.pid}").stat().st_uid == libvirt_host.account("libvirt-qemu").uid  # type: ignore[union-attr]
        threads = sorted(p.read_text().strip() for p in Path(f"/proc/{vm.pid}/task").glob("*/comm"))
        print("QEMU threads:", threads)
        assert {"CPU 0/TCG", "CPU 1/TCG"} <= set(threads)  # thread=multi without saying so
        with socket.create_connection(("127.0.0.1", spec.ssh_port), timeout=5):
            pass  # QEMU's slirp listens on the forward
        live = lv.parse_domain_xml(conn.lookupByName(vm.name).XMLDesc(0))
        assert [(d["path"], d["serial"], d["cache"], d["readonly"], d["slot"]) for d in live["disks"]] == [
            (str(work / "top.qcow2"), "lab-test", "unsafe", False, 2)]
        assert live["passthrough"] == lv.passthrough(spec) and live["cpus"] == 2 and live["memory_mib"] == 64
        assert live["owner"]["pid"] == os.getpid()

        assert vm.qmp("query-status") == {"status": "running", "singlestep": False, "running": True}
        assert vm.status() == "running"
        with pytest.raises(RuntimeError, match="CommandNotFound"):
            vm.qmp("no-such-command")
        with pytest.raises(RuntimeError, match="spawn=deny"):
            vm.qmp("migrate", uri="exec:cat > /dev/null")
        vm.qmp("stop")
        assert vm.status() == "paused"
        vm.qmp("cont")
        vm.pause()  # the pause-l1 fault: libvirt's suspend and resume
        assert vm.status() == "paused" and conn.lookupByName(vm.name).state()[0] == 3  # VIR_DOMAIN_PAUSED
        vm.resume()
        assert vm.status() == "running"
        # a run's QEMU under libvirt is proven by this run's files in its -blockdev JSON
        # (lab/orphans.py: the sweep of dead runs, `lab ssh`, `lab down`)
        assert orphans.lab_qemu_problem(vm.pid, [str(work)]) is None
        assert orphans.lab_qemu_problem(vm.pid, [str(work / "elsewhere")]) is not None
        assert lv.running(conn, vm.uuid) == vm.name and re.fullmatch(r"\d+\.\d+\.\d+", lv.version(conn))
        # the qemu driver's blockdev-snapshot-sync device=d0 reaches libvirt's node
        # name; QEMU (libvirt-qemu) creates the file, so its directory must let it
        snap = work / "snap"
        snap.mkdir()
        shutil.chown(snap, "libvirt-qemu")
        vm.qmp("blockdev-snapshot-sync", device="d0", **{"snapshot-file": str(snap / "s.qcow2"), "format": "qcow2"})
        assert _block_file(vm) == str(snap / "s.qcow2")

        vm.stop()
        vm.stop()  # safe twice
        assert not vm.alive()
        assert vm.name not in [d.name() for d in conn.listAllDomains(0)]
        assert "starting up libvirt version" in (work / "qemu.log").read_text()
        print("domain log kept:", (work / "qemu.log").read_text().splitlines()[-1])
    # the owner's callback ran again: still nothing
    assert [d.name() for d in conn.listAllDomains(0) if d.name() == vm.name] == []


def test_save_then_restore_onto_a_new_overlay_shall_resume_the_same_domain(conn: Any, work: Path) -> None:
    _img(str(work / "disk.qcow2"), "16M")
    spec = _spec(work, work / "disk.qcow2")
    state = work / "l1.state"
    with ExitStack() as stack:
        vm = lv.start(spec, uri=URI, stderr_path=work / "qemu1.log", owner=stack)
        save_s = lv.save(vm, state)
        assert vm.name not in [d.name() for d in conn.listAllDomains(0)]  # virDomainSave stops it
        vm.stop()
    print(f"\nsave: {save_s:.2f} s, {state.stat().st_size} bytes for {spec.memory_mib} MiB")
    # the saved disk is frozen from now on: the next run writes a new overlay on it
    _img("-F", "qcow2", "-b", str(work / "disk.qcow2"), str(work / "run2.qcow2"))
    spec2 = dataclasses.replace(spec, drives=[dataclasses.replace(spec.drives[0], path=work / "run2.qcow2")],
                                ssh_port=qemu.free_port(), console_log=work / "console2.log")
    with ExitStack() as stack:
        vm2, restore_s = lv.restore(conn, state, spec2, stderr_path=work / "qemu2.log", owner=stack)
        print(f"restore: {restore_s:.2f} s")
        assert (vm2.name, vm2.uuid) == (vm.name, vm.uuid)  # libvirt keeps both
        assert vm2.alive() and vm2.status() == "running"
        assert _block_file(vm2) == str(work / "run2.qcow2")
        live = lv.parse_domain_xml(conn.lookupByName(vm2.name).XMLDesc(0))
        assert live["disks"][0]["path"] == str(work / "run2.qcow2") and live["owner"]["pid"] == os.getpid()
        assert f"hostfwd=tcp:127.0.0.1:{spec2.ssh_port}-:22" in " ".join(_cmdline(vm2.pid))
        # one saved state runs once at a time: a second restore is refused, clearly
        with pytest.raises(LabError, match="already runs"):
            lv.restore(conn, state, spec2, stderr_path=work / "qemu3.log", owner=stack)
        assert vm2.alive()
    assert vm2.name not in [d.name() for d in conn.listAllDomains(0)]


def test_a_dead_labs_domain_shall_be_a_leftover_and_a_live_ones_not(conn: Any, work: Path) -> None:
    _img(str(work / "a.qcow2"), "16M")
    _img(str(work / "b.qcow2"), "16M")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid with no process (reaped)
    orphan_spec = dataclasses.replace(_spec(work, work / "a.qcow2"), network=False)
    xml = lv.render_domain_xml(orphan_spec, name=lv.domain_name(dead.pid), uuid=str(__import__("uuid").uuid4()),
                               owner=(dead.pid, 1))
    orphan = conn.createXML(xml, 0)
    with ExitStack() as stack:
        # not the orphan's console: virtlogd refuses a second writer ("Device or resource busy")
        mine = lv.start(dataclasses.replace(_spec(work, work / "b.qcow2", console="mine.log"), network=False), uri=URI,
                        stderr_path=work / "qemu.log", owner=stack)
        found = lv.leftovers(conn)
        print("\nleftovers:", found)
        assert orphan.name() in found and mine.name not in found
        assert lv.sweep(conn) == [orphan.name()]
        assert orphan.name() not in [d.name() for d in conn.listAllDomains(0)]
        assert mine.alive()
        # `lab run --keep`: the lab may exit, a sweep leaves the domain to `lab down`
        lv.mark_kept(mine)
        assert lv.parse_domain_xml(conn.lookupByName(mine.name).XMLDesc(0))["owner"]["kept"] is True
        # `lab down`: only the proven domain, through libvirt
        with pytest.raises(LabError, match="uses no file of"):
            lv.end_kept(conn, mine.uuid, name=mine.name, prove=lambda pid: orphans.lab_qemu_problem(pid, ["/nope"]))
        assert mine.alive()
        done = lv.end_kept(conn, mine.uuid, name=mine.name,
                           prove=lambda pid: orphans.lab_qemu_problem(pid, [str(work)]))
        assert done.startswith(f"domain {mine.name} destroyed") and not mine.alive()
        assert lv.running(conn, mine.uuid) is None


def test_start_shall_name_the_directory_libvirt_qemu_cannot_enter(conn: Any, work: Path) -> None:
    private = work / "private"
    private.mkdir(mode=0o700)
    _img(str(private / "d.qcow2"), "16M")
    before = len(conn.listAllDomains(0))
    with pytest.raises(LabError, match=f"cannot enter {private} .drwx------ root:root.") as e:
        lv.start(_spec(work, private / "d.qcow2"), uri=URI, stderr_path=work / "qemu.log")
    print("\n" + str(e.value))
    assert len(conn.listAllDomains(0)) == before  # refused before libvirt was asked


def test_the_libvirt_drivers_warm_start_shall_go_on_in_a_restored_domain_and_restore_once_at_a_time(
    conn: Any, work: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lab/l0.py's LibvirtDriver as boot.py drives it: a start through the run's
    work directory (0700, let through for libvirt-qemu), a save that stops the
    domain and goes on at once in one restored onto a new overlay in the work
    directory (same name, uuid and SSH port), the state sealed; a second restore
    of that state while it runs is refused as busy; once it is gone, a later
    run's restore onto its own overlay."""
    monkeypatch.setenv("LAB_CACHE", str(work / "cache"))
    runs = work / "cache" / "runs"
    runs.mkdir(parents=True)
    results = work / "results"
    results.mkdir()

    def where() -> Where:
        return Where(results, Path(tempfile.mkdtemp(prefix="run-", dir=runs)), CommandLog(None),
                     LocalRunner(CommandLog(None)))

    slot = l1state.Slot("d", "lab-test", size=16 << 20)
    state = l1state.begin("e" * 20)
    _img(str(state.disk(slot)), "16M")
    spec = _spec(work, state.disk(slot))
    driver = l0.LibvirtDriver(URI)
    driver.prepare()
    with ExitStack() as stack:
        w1 = where()
        vm, spec = driver.start(spec, w1, stack)
        assert (results / "domain.xml").is_file() and driver.record["domain"]["name"] == vm.name  # type: ignore[attr-defined]
        saved = driver.save(vm, state, [slot], w1, stack, inputs={"driver": "libvirt"})
        print(f"\nsave and restore: {saved.detail}")
        new = saved.vm
        assert saved.restarted and new.alive() and not vm.alive()
        assert (new.name, new.uuid) == (vm.name, vm.uuid)  # type: ignore[attr-defined]
        assert saved.spec.ssh_port == spec.ssh_port and _block_file(new) == str(w1.work / "d.qcow2")  # type: ignore[arg-type]
        assert (state.dir / "meta.json").is_file() and state.file.stat().st_mode & 0o777 == 0o400
        with pytest.raises(StateBusy, match="one run at a time"):
            driver.restore(spec, state, where(), stack)
        new.stop()
        w2 = where()
        _img("-F", "qcow2", "-b", str(state.disk(slot)), str(w2.work / "d.qcow2"))
        later = dataclasses.replace(spec, drives=[dataclasses.replace(spec.drives[0], path=w2.work / "d.qcow2")],
                                    ssh_port=qemu.free_port())
        vm3, _, took = driver.restore(later, state, w2, stack)
        print(f"restore of a later run: {took:.2f} s")
        assert vm3.alive() and _block_file(vm3) == str(w2.work / "d.qcow2")  # type: ignore[arg-type]
    assert vm.uuid not in [d.UUIDString() for d in conn.listAllDomains(0)]  # type: ignore[attr-defined]
