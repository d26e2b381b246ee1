"""The L0 driver seam: how the Xen VM (L1) runs on this machine, one driver per
name from a table (`[lab] driver`, `lab run --driver`):

  qemu     QEMU as the lab's child (lab/qemu.py): the default, no daemon
  libvirt  a transient libvirt domain rendered from the same VmSpec (lab/libvirt.py)

lab/boot.py asks a driver to start a VM, to restore a saved L1 state into one and
to save one; what it gets back has one interface (`Vm`) whatever the driver.
The rest of what differs lives here too: what joins the state key, what a run
sweeps when it starts, `--keep` and `lab down`.

The two warm starts differ in kind. The qemu driver pauses QEMU, moves its disks
onto per-run overlays (blockdev-snapshot-sync) and migrates to a file: the VM
runs on. Under libvirt a QMP `migrate` to an exec: URI kills QEMU (its sandbox
denies spawning), so the libvirt driver saves the domain through libvirt (the
domain stops), then restores it at once from that file with an XML whose
writable disks are new overlays on the state's (now frozen) disks: the run goes
on in a new QEMU process, and its SSH sessions must be opened again
(`Saved.restarted`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import re
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lab import l1state, libvirt_host, qemu
from lab import libvirt as lv
from lab.errors import LabError, ScenarioError, StateBusy
from lab.orphans import lab_qemu_problem
from lab.timing import Deadline

if TYPE_CHECKING:
    from lab.boot import Where

log = logging.getLogger("lab.l0")
DEFAULT_URI = "qemu:///system"
# a local libvirtd only: dom0's SSH is a port forward on this machine's 127.0.0.1
_LOCAL_URI = re.compile(r"qemu(\+unix)?:///(system|session)(\?.*)?")


class Vm(Protocol):
    """A running L1, whatever runs it (qemu.Vm, libvirt.LibvirtVm)."""

    spec: qemu.VmSpec
    argv: list[str]
    stderr_path: Path

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def alive(self) -> bool: ...
    def stderr_tail(self, n: int = 20) -> str: ...
    def qmp(self, name: str, **args: object) -> object: ...
    def status(self) -> str: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def stop(self, timeout: float = 10) -> None: ...


@dataclass(frozen=True)
class Saved:
    """What `Driver.save` leaves running: the same VM (qemu), or a new process
    restored from the state just saved (libvirt), whose SSH sessions died with
    the old one (`restarted`)."""

    vm: Vm
    spec: qemu.VmSpec
    paused_s: float  # how long L1 stood still
    restarted: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


class Driver(Protocol):
    name: str
    record: dict[str, Any]  # record.json's "l0", filled as the run goes

    def prepare(self) -> dict[str, Any]:
        """At run start: what the driver needs up, and what dead labs left (what it
        swept, for record.json's "swept")."""
        ...

    def key_inputs(self) -> dict[str, Any]:
        """What joins the L1 state key (lab/l1state.py key_inputs)."""
        ...

    def start(self, spec: qemu.VmSpec, where: Where, stack: ExitStack) -> tuple[Vm, qemu.VmSpec]: ...

    def restore(self, spec: qemu.VmSpec, state: l1state.State, where: Where,
                stack: ExitStack) -> tuple[Vm, qemu.VmSpec, float]:
        """L1 from a saved state, running; the seconds its load took."""
        ...

    def save(self, vm: Vm, state: l1state.State, slots: list[l1state.Slot], where: Where, stack: ExitStack, *,
             inputs: dict[str, Any]) -> Saved: ...

    def keep(self, vm: Vm) -> dict[str, Any]:
        """--keep: the VM outlives the lab; what lab.json must say for `lab down`."""
        ...

    def down(self, info: dict[str, Any], works: list[str]) -> str | None:
        """`lab down`: end the kept VM the driver's way, or None (the lab kills
        the proven QEMU pid itself)."""
        ...


def _port_taken(e: LabError) -> bool:
    """QEMU could not bind the SSH forward: the port was taken between choosing
    and binding it (QEMU's error quotes the -netdev argument)."""
    return "hostfwd" in e.tail or "hostfwd" in e.message


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


# ------------------------------------------------------------ qemu
class QemuDriver:
    """QEMU as the lab's child: started in its own process group, dying with the
    lab (parent-death signal) unless kept. Its code and timing are those the lab
    had before there was a choice."""

    name = "qemu"

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"driver": "qemu"}

    def prepare(self) -> dict[str, Any]:
        return {}  # dead runs' QEMUs go with lab/orphans.py, for both drivers

    def key_inputs(self) -> dict[str, Any]:
        return {}  # the keys of states saved before there was a choice stay valid

    def start(self, spec: qemu.VmSpec, where: Where, stack: ExitStack) -> tuple[Vm, qemu.VmSpec]:
        for attempt in (1, 2):  # the port may be taken between choosing and binding it
            (where.results / "qemu-argv.json").write_text(json.dumps(qemu.build_argv(spec), indent=1) + "\n")
            try:
                # owned by `stack` before it returns
                vm = qemu.start(spec, where.results / "qemu-stderr.log", owner=stack, die_with_lab=not where.keep)
                return vm, spec
            except LabError as e:
                if attempt == 2 or "hostfwd" not in e.tail:
                    raise
                spec = dataclasses.replace(spec, ssh_port=qemu.free_port())
        raise AssertionError("unreachable")

    def restore(self, spec: qemu.VmSpec, state: l1state.State, where: Where,
                stack: ExitStack) -> tuple[Vm, qemu.VmSpec, float]:
        spec = dataclasses.replace(spec, extra=[*spec.extra, "-incoming", l1state.load_uri(state.file)])
        vm, spec = self.start(spec, where, stack)
        assert isinstance(vm, qemu.Vm)
        return vm, spec, l1state.wait_restored(vm, timeout=120)

    def save(self, vm: Vm, state: l1state.State, slots: list[l1state.Slot], where: Where, stack: ExitStack, *,
             inputs: dict[str, Any]) -> Saved:
        assert isinstance(vm, qemu.Vm)
        return Saved(vm, vm.spec, l1state.save(vm, state, slots, where.work, inputs=inputs))

    def keep(self, vm: Vm) -> dict[str, Any]:
        return {}

    def down(self, info: dict[str, Any], works: list[str]) -> str | None:
        return None


# ------------------------------------------------------------ libvirt
class LibvirtDriver:
    """L1 as a transient libvirt domain on a local libvirtd (`uri`). QEMU is
    libvirtd's child, not the lab's: what a lab killed with SIGKILL leaves runs
    until a later run's `prepare` sweeps it (or the QEMU pid sweep of
    lab/orphans.py, which proves it by this run's files on its command line)."""

    name = "libvirt"

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self.record: dict[str, Any] = {"driver": "libvirt", "uri": uri}

    def prepare(self) -> dict[str, Any]:
        """virtlogd and libvirtd up (started when none answers: the record says
        so), then the domains of dead labs destroyed. Any failure is the lab's."""
        t = time.monotonic()
        self.record["daemons"] = libvirt_host.ensure_daemons(self.uri, deadline=Deadline(120))
        conn = lv.connect(self.uri)
        try:
            self.record["libvirt_version"] = lv.version(conn)
            swept = lv.sweep(conn)
        finally:
            conn.close()
        self.record["prepare_s"] = round(time.monotonic() - t, 2)
        return {"domains": swept}

    def key_inputs(self) -> dict[str, Any]:
        # libvirtd writes the save image (a header with the domain XML, then QEMU's
        # stream): its version joins QEMU's
        return {"driver": "libvirt", "libvirt_version": self.record.get("libvirt_version", "unknown")}

    def start(self, spec: qemu.VmSpec, where: Where, stack: ExitStack) -> tuple[Vm, qemu.VmSpec]:
        spec = self._reachable(spec, where)

        def go(s: qemu.VmSpec) -> lv.LibvirtVm:
            return lv.start(s, uri=self.uri, stderr_path=where.results / "qemu-stderr.log", owner=stack)

        vm, spec = _with_free_port(go, spec)
        self._started(vm, where, xml="domain.xml", argv="qemu-argv.json")
        return vm, spec

    def restore(self, spec: qemu.VmSpec, state: l1state.State, where: Where,
                stack: ExitStack) -> tuple[Vm, qemu.VmSpec, float]:
        spec = self._reachable(spec, where)
        vm, spec, took = self._restore(spec, state, where, stack, stderr="qemu-stderr.log")
        self._started(vm, where, xml="domain.xml", argv="qemu-argv.json")
        return vm, spec, took

    def _restore(self, spec: qemu.VmSpec, state: l1state.State, where: Where, stack: ExitStack, *,
                 stderr: str, log_offset: int | None = None) -> tuple[lv.LibvirtVm, qemu.VmSpec, float]:
        conn = lv.connect(self.uri)
        try:
            name, uuid = lv.saved_identity(conn, state.file)
            if lv.running(conn, uuid):
                raise StateBusy("boot:restore", f"L1 state {state.key} runs now as libvirt domain {name} (another "
                                "run's, or a kept lab's): libvirt restores a saved state only under its saved "
                                "name and uuid, so one run at a time")

            def go(s: qemu.VmSpec) -> tuple[lv.LibvirtVm, float]:
                return lv.restore(conn, state.file, s, stderr_path=where.results / stderr, owner=stack,
                                  log_offset=log_offset)

            (vm, took), spec = _with_free_port(go, spec)
        finally:
            conn.close()
        return vm, spec, took

    def save(self, vm: Vm, state: l1state.State, slots: list[l1state.Slot], where: Where, stack: ExitStack, *,
             inputs: dict[str, Any]) -> Saved:
        """virDomainSave to the state's file (the domain stops: its disks, the
        state's, are frozen from here on), the state sealed, then restored at once
        onto new per-run overlays over them, with the same SSH port if it is
        still free. libvirt's log of the domain goes on (a restore keeps the name),
        so the restored VM keeps it from where the first one began."""
        assert isinstance(vm, lv.LibvirtVm)
        t = time.monotonic()
        save_s = lv.save(vm, state.file)
        offset = vm.log_offset
        vm.stop()  # gone already: this keeps libvirt's log so far and closes its connection
        l1state.seal(state, slots, inputs=inputs)
        disks = l1state.restore_overlays(state, slots, where.work)
        n = len(slots)
        spec = dataclasses.replace(vm.spec, drives=[
            *(dataclasses.replace(d, path=p) for d, p in zip(vm.spec.drives[:n], disks, strict=True)),
            *vm.spec.drives[n:]])
        new, spec, restore_s = self._restore(spec, state, where, stack, stderr="qemu-stderr.log", log_offset=offset)
        self._started(new, where, xml="domain-restored.xml", argv="qemu-argv-restored.json", first=False)
        detail = {"save_s": round(save_s, 2), "restore_s": round(restore_s, 2), "qemu_pid": new.pid,
                  "ssh_port": spec.ssh_port, "domain_xml": "domain-restored.xml"}
        self.record["restarted"] = detail
        return Saved(new, spec, time.monotonic() - t, restarted=True, detail=detail)

    def keep(self, vm: Vm) -> dict[str, Any]:
        assert isinstance(vm, lv.LibvirtVm)
        info: dict[str, Any] = {"driver": "libvirt", "uri": self.uri, "domain": vm.name, "uuid": vm.uuid}
        try:
            lv.mark_kept(vm)
        except LabError as e:
            log.warning("%s", e.message)
            info["kept_mark"] = e.message
        return info

    def down(self, info: dict[str, Any], works: list[str]) -> str | None:
        conn = lv.connect(self.uri)
        try:
            return lv.end_kept(conn, str(info["uuid"]), name=str(info["domain"]),
                               prove=lambda pid: lab_qemu_problem(pid, works))
        finally:
            conn.close()

    # -------------------------------------------------------- what libvirt's QEMU user must reach
    def _reachable(self, spec: qemu.VmSpec, where: Where) -> qemu.VmSpec:
        """libvirt runs QEMU as its own user (Debian: libvirt-qemu). The run's work
        directory (0700 from mkdtemp) lets that user through; a multiboot file it
        cannot read (the lab's images are root's: the dom0 image's initrd.img is
        0400) is copied into the work directory for it, since libvirt does not
        chown what goes through <qemu:commandline>. Everything else is checked
        when the domain starts (lab/libvirt.py), naming the first path out of
        reach and the fix. Nothing of the host outside this run is changed."""
        if not libvirt_host.is_local_system(self.uri):
            return spec  # a session daemon runs QEMU as this user
        user = libvirt_host.qemu_user()
        if spec.accel == "kvm" and (why := libvirt_host.kvm_warning(user=user)):
            # the lab's KVM probe ran QEMU as root; libvirt's runs as `user`
            raise LabError("boot:libvirt", f"the accelerator is KVM, but libvirt's QEMU cannot use it: {why}")
        work = Path(os.path.abspath(where.work))
        # before anything is copied: a LAB_CACHE under /root fails here, naming /root
        libvirt_host.check_readable([libvirt_host.Need(work.parent, "the lab's runs directory (LAB_CACHE/runs)",
                                                       False)], user=user)
        libvirt_host.let_through(work, user=user)
        staged: list[dict[str, str]] = self.record.setdefault("staged", [])

        def reach(p: Path) -> Path:
            p = Path(os.path.abspath(p))
            if libvirt_host.readable_by(p, user=user):
                return p
            d = work / "l0"
            if not d.exists():
                d.mkdir()
                libvirt_host.let_through(d, user=user)
            dst = d / f"{len(list(d.iterdir()))}-{p.name}"
            if any(c.isspace() for c in str(dst)):
                raise LabError("boot:libvirt", f"{dst}: a multiboot module's path ends at the first space; "
                               "use a LAB_CACHE without whitespace with the libvirt driver")
            shutil.copyfile(p, dst)
            os.chown(dst, pwd.getpwnam(user).pw_uid, -1)
            dst.chmod(0o400)
            staged.append({"file": str(p), "copy": str(dst), "why": f"{user} cannot read it"})
            return dst

        return dataclasses.replace(spec, xen=reach(spec.xen) if spec.xen is not None else None,
                                   modules=[(reach(p), args) for p, args in spec.modules])

    def _started(self, vm: lv.LibvirtVm, where: Where, *, xml: str, argv: str, first: bool = True) -> None:
        """The domain XML given to libvirt and QEMU's command line as libvirt
        built it, into the results; the record's facts of the domain."""
        (where.results / xml).write_text(vm.xml)
        (where.results / argv).write_text(json.dumps(_cmdline(vm.pid) or vm.argv, indent=1) + "\n")
        if first:
            self.record.update(domain={"name": vm.name, "uuid": vm.uuid}, qemu_pid=vm.pid, domain_xml=xml,
                               passthrough=lv.passthrough(vm.spec))


def _with_free_port(start: Callable[[qemu.VmSpec], Any], spec: qemu.VmSpec) -> tuple[Any, qemu.VmSpec]:
    """`start(spec)`, once more on a new SSH port if QEMU could not bind it."""
    for attempt in (1, 2):
        try:
            return start(spec), spec
        except LabError as e:
            if attempt == 2 or not _port_taken(e):
                raise
            spec = dataclasses.replace(spec, ssh_port=qemu.free_port())
    raise AssertionError("unreachable")


# ------------------------------------------------------------ the table
DRIVERS: dict[str, Callable[[str], Driver]] = {
    "qemu": lambda uri: QemuDriver(),
    "libvirt": lambda uri: LibvirtDriver(uri),
}


def local_uri(uri: str) -> bool:
    """A libvirt URI the lab can use: a local daemon (dom0's SSH is a port
    forward on this machine's 127.0.0.1)."""
    return _LOCAL_URI.fullmatch(uri) is not None


def check_uri(uri: str) -> str:
    """`uri` if `local_uri`; else ScenarioError (a usage error)."""
    if not local_uri(uri):
        raise ScenarioError(f"--libvirt-uri: expected a local libvirt URI (qemu:///system, qemu:///session): "
                            f"dom0's SSH is forwarded on this machine's 127.0.0.1; got {uri!r}")
    return uri


def kept_problem(info: dict[str, Any]) -> tuple[str, str] | None:
    """What is wrong with the driver's part of a kept lab's lab.json (`lab down`
    acts on it): (key, why), or None. A qemu lab has none."""
    name = info.get("driver", "qemu")
    if name == "qemu":
        return None
    if name != "libvirt":
        return "driver", f"is {name!r}, not an L0 driver of the lab"
    uri, dom, uuid = info.get("uri"), info.get("domain"), info.get("uuid")
    if not isinstance(uri, str) or not local_uri(uri):
        return "uri", f"is {uri!r}, not a local libvirt URI"
    if not isinstance(dom, str) or not dom.startswith(lv.PREFIX):
        return "domain", f"is {dom!r}, not a lab's domain ({lv.PREFIX}...)"
    if not isinstance(uuid, str) or not re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", uuid):
        return "uuid", f"is {uuid!r}, not a domain uuid"
    return None


def driver(name: str, *, uri: str | None = None) -> Driver:
    """The driver called `name` (a scenario's `[lab] driver`, or `--driver`);
    `uri`: libvirt's, default qemu:///system."""
    if name not in DRIVERS:
        raise ScenarioError(f"L0 driver: expected one of {', '.join(map(repr, DRIVERS))}, got {name!r}")
    if uri is not None and name != "libvirt":
        raise ScenarioError(f"--libvirt-uri {uri!r} is for the libvirt driver; this run's driver is {name!r} "
                            "(lab run --driver libvirt, or [lab] driver = \"libvirt\")")
    return DRIVERS[name](check_uri(DEFAULT_URI if uri is None else uri))
