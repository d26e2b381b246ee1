"""The `libvirt` L0 driver: the VM of a `qemu.VmSpec` as a transient libvirt domain,
with `qemu.Vm`'s interface (`LibvirtVm`), its warm start (`save`, `restore`) and
the sweep of domains a dead lab left (`leftovers`, `sweep`). The domain XML is
lab/libvirt_xml.py (pure); the daemons and access checks lab/libvirt_host.py.

Measured with libvirt 9.0 + QEMU 7.2 (Debian 12), which the code relies on:
- libvirt starts QEMU with `-sandbox ...,spawn=deny`: a QMP `migrate` to an exec:
  URI kills QEMU (libvirt logs "reason=crashed"). The warm start goes through
  virDomainSave/virDomainRestoreFlags instead.
- a restore keeps the saved domain's name and uuid ("Target domain name ... does
  not match source"): one saved state runs as one domain at a time, and the run
  that owns a domain is written in its <metadata>, never only in its name.
- libvirt's block nodes are `libvirt-<N>-format`, not the qemu driver's `d<i>`:
  `LibvirtVm.qmp` maps `blockdev-snapshot-sync device=d<i>` to the node under
  the disk whose alias is `ua-d<i>`.
- virtlogd writes the serial console file (qemu.conf stdio_handler="logd"): it
  rolls the file over at its max_size (2 MiB by default), and refuses a second
  domain on the same file ("Device or resource busy").

`import libvirt` happens inside the functions that talk to libvirtd: the pure
parts import and test without libvirt-python."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lab import qemu
from lab.errors import LabError, StateBusy
from lab.libvirt_host import access_needs, check_readable, process_start, qemu_user, run_paths, stdio_handler
from lab.libvirt_xml import (
    FIRST_SLOT,
    OWNER_NS,
    PREFIX,
    absolute,
    cpu_xml,
    nic_args,
    parse_domain_xml,
    passthrough,
    render_domain_xml,
    tb_cache_mib,
)
from lab.runner import signals_held

# the pure half, re-exported: `lab.libvirt` is the driver's one public face
__all__ = [
    "FIRST_SLOT", "PREFIX", "LibvirtVm", "absolute", "connect", "cpu_xml", "domain_name", "is_leftover",
    "leftovers", "mark_kept", "nic_args", "owner_alive", "parse_domain_xml", "passthrough", "process_start",
    "render_domain_xml", "restore", "running", "end_kept", "save", "saved_identity", "snapshot_node", "start",
    "sweep", "tb_cache_mib", "version",
]
log = logging.getLogger("lab.libvirt")


def _libvirt(module: str = "libvirt") -> Any:
    """libvirt-python (`libvirt`, `libvirt_qemu`), imported on first use: the pure
    parts import and test without it, and mypy checks lab/ the same whether it is
    installed or not (it has no stubs). A directory named `libvirt` in the working
    directory would shadow it (facts/xen-under-qemu.md)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise LabError("boot:libvirt", f"the libvirt driver needs libvirt-python ({e}): "
                       "pip install -e '.[libvirt]' after `make deps` (it builds against libvirt-dev)") from None
    if module == "libvirt":
        # libvirt's default handler also prints every error on stderr ("libvirt: QEMU
        # Driver error : Domain not found"), even those this module expects and
        # handles; each one still reaches the caller as a libvirtError
        mod.registerErrorHandler(lambda ctx, err: None, None)
    return mod


# ------------------------------------------------------------ owners and leftovers
def owner_alive(pid: int, start: int | None) -> bool:
    return (now := process_start(pid)) is not None and (start in (None, 0) or now == start)


def domain_name(pid: int | None = None) -> str:
    """`xen-blklab-<lab pid>-<token>`: unique, and readable in `virsh list`. The
    owner that counts is in the metadata (a restored domain keeps its saved name)."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def is_leftover(name: str, owner: dict[str, Any] | None, *, prefix: str = PREFIX,
                alive: Callable[[int, int | None], bool] = owner_alive) -> bool:
    """A lab's domain whose lab process is gone (SIGKILL, power cut of the lab).
    The owner comes from the metadata, else from the name; a domain that proves
    no owner, or one kept on purpose (`lab run --keep`), is never a leftover."""
    if not name.startswith(prefix):
        return False
    if owner is not None:
        return not owner.get("kept") and not alive(int(owner["pid"]), owner.get("start"))
    m = re.match(r"(\d+)-", name[len(prefix):])
    return m is not None and not alive(int(m.group(1)), None)


def leftovers(conn: Any, prefix: str = PREFIX) -> list[str]:
    """Names of the domains a dead lab left (see is_leftover)."""
    libvirt = _libvirt()

    out = []
    for dom in conn.listAllDomains(0):
        try:
            owner = parse_domain_xml(dom.XMLDesc(0))["owner"]
        except (libvirt.libvirtError, ET.ParseError, ValueError) as e:  # gone meanwhile, or not ours to judge
            log.debug("domain %s: %s", dom.name(), e)
            continue
        if is_leftover(dom.name(), owner, prefix=prefix):
            out.append(dom.name())
    return out


def sweep(conn: Any, prefix: str = PREFIX) -> list[str]:
    """Destroy (and undefine, if someone defined it) every leftover domain."""
    libvirt = _libvirt()

    done = []
    for name in leftovers(conn, prefix):
        try:
            dom = conn.lookupByName(name)
            persistent = dom.isPersistent()  # asked first: a destroyed transient domain is gone
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()
            done.append(name)
            log.info("destroyed leftover domain %s", name)
        except libvirt.libvirtError as e:
            log.warning("leftover domain %s: %s", name, e)
    return done


# ------------------------------------------------------------ the running domain
def snapshot_node(query_block: Any, drive: str) -> str:
    """The node `blockdev-snapshot-sync` must name for the qemu driver's drive
    `d<i>`: the top node of the disk whose alias is `ua-d<i>` (libvirt's nodes are
    `libvirt-<N>-format`; QEMU 7.2 refuses a qdev id as `device`)."""
    for b in query_block if isinstance(query_block, list) else []:
        if str(b.get("qdev", "")).startswith(f"/machine/peripheral/ua-{drive}/") and b.get("inserted"):
            return str(b["inserted"]["node-name"])
    raise RuntimeError(f"no disk with alias ua-{drive} in query-block")


class LibvirtVm:
    """A running transient domain with `qemu.Vm`'s interface. It owns `conn` (its
    own connection, closed by `stop`). `stop()` destroys it; safe to call twice."""

    def __init__(self, spec: qemu.VmSpec, *, xml: str, dom: Any, conn: Any, stderr_path: Path,
                 log_offset: int) -> None:
        self.spec, self.xml, self._dom, self._conn = spec, xml, dom, conn
        self.name: str = dom.name()
        self.uuid: str = dom.UUIDString()
        self.stderr_path = stderr_path
        self.pidfile, self.log_path = run_paths(conn.getURI(), self.name)
        self.log_offset = log_offset  # libvirt appends every domain of this name to one log
        self._stopped = False
        self.started = time.monotonic()
        try:
            self._pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            self._pid = -1
        self.argv = ["<libvirt>", conn.getURI(), self.name]  # the record keeps `xml`; the argv is libvirt's
        log.info("libvirt domain %s, QEMU pid %d, ssh on 127.0.0.1:%d", self.name, self._pid, spec.ssh_port)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        """libvirt does not hand QEMU's exit status on: how the domain ended is in
        its log (`stderr_tail`: "shutting down, reason=...")."""
        return None

    def alive(self) -> bool:
        libvirt = _libvirt()

        if self._stopped:
            return False
        try:
            state = self._dom.state()[0]
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            # libvirtd itself is gone or stuck: QEMU may still run, ask the kernel
            return self._pid > 0 and process_start(self._pid) is not None
        return state not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)

    def _log_text(self) -> str:
        return _read_log(self.log_path, self.log_offset)

    def stderr_tail(self, n: int = 20) -> str:
        """The end of libvirt's log of this domain: QEMU's stderr, after libvirt's
        own lines (the command line, "shutting down, reason=...")."""
        return "\n".join(self._log_text().splitlines()[-n:])

    def qmp(self, name: str, **args: object) -> object:
        """One QMP command through libvirt's monitor; the "return" part, or
        RuntimeError on an "error" reply (as qemu.Qmp)."""
        libvirt, libvirt_qemu = _libvirt(), _libvirt("libvirt_qemu")

        if name == "migrate" and str(args.get("uri", "")).startswith("exec:"):
            raise RuntimeError("QMP migrate to an exec: URI kills QEMU under libvirt (-sandbox spawn=deny): "
                               "save the state with lab.libvirt.save")
        if name == "blockdev-snapshot-sync" and isinstance(args.get("device"), str):
            # by node, QEMU wants the new node's name too. The file is created by
            # QEMU, i.e. by libvirt's QEMU user (its directory must let that user
            # write), and libvirt's view of the disk does not follow: its XML keeps
            # the old file. The warm start through libvirt is `save` + `restore`.
            drive = str(args["device"])
            args = {k: v for k, v in args.items() if k != "device"} | {
                "node-name": snapshot_node(self.qmp("query-block"), drive),
                "snapshot-node-name": args.get("snapshot-node-name") or f"lab-{drive}-{secrets.token_hex(3)}"}
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps(msg), 0))
        except libvirt.libvirtError as e:
            # what a closed QMP socket is for qemu.Vm: callers catch ConnectionError
            raise ConnectionError(f"QMP {name} through libvirt: {e}") from None
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def status(self) -> str:
        """QEMU's run state, for evidence only: the hang decision never reads it."""
        return qemu.run_state(self.qmp)

    def pause(self) -> None:
        """Freeze the whole VM (the `pause-l1` fault) through libvirt
        (virDomainSuspend), so libvirt's view of the domain stays true."""
        self._lifecycle("suspend", self._dom.suspend)

    def resume(self) -> None:
        self._lifecycle("resume", self._dom.resume)

    def _lifecycle(self, what: str, call: Callable[[], Any]) -> None:
        libvirt = _libvirt()

        try:
            call()
        except libvirt.libvirtError as e:  # libvirt's failure is the lab's, never a verdict on the backend
            raise LabError("l0", f"libvirt could not {what} domain {self.name}: {e}") from None

    def stop(self, timeout: float = 10) -> None:
        """Destroy the domain (libvirt: SIGTERM, then SIGKILL), undefine it if
        someone made it persistent, keep libvirt's log of it as `stderr_path`.
        Errors are logged, never raised: this runs in teardown."""
        libvirt = _libvirt()

        if self._stopped:
            return
        self._stopped = True
        t = time.monotonic()
        try:
            persistent = self._dom.isPersistent()  # asked first: a destroyed transient domain is gone
            if self._dom.isActive():
                self._dom.destroy()
            if persistent:
                self._dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                log.error("domain %s may still run (a later run sweeps it): %s", self.name, e)
        if time.monotonic() - t > timeout:
            log.warning("destroying domain %s took %.1f s", self.name, time.monotonic() - t)
        try:
            self.stderr_path.write_text(self._log_text())
        except OSError as e:
            log.warning("could not keep libvirt's log of %s: %s", self.name, e)
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass


def _read_log(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def connect(uri: str) -> Any:
    libvirt = _libvirt()

    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LabError("boot:libvirt", f"cannot connect to libvirt at {uri}: {e}") from None


def version(conn: Any) -> str:
    """libvirtd's version, "9.0.0" (its save images are its own format)."""
    v = int(conn.getLibVersion())
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _log_size(uri: str, name: str) -> int:
    try:
        return run_paths(uri, name)[1].stat().st_size
    except OSError:
        return 0


def _check_access(uri: str, spec: qemu.VmSpec) -> None:
    if uri.startswith(("qemu:///system", "qemu+unix:///system")):
        # the console's directory matters only where QEMU opens the file itself
        check_readable(access_needs(absolute(spec), console=stdio_handler() == "file"), user=qemu_user())


def _adopt(spec: qemu.VmSpec, xml: str, conn: Any, create: Callable[[], Any], *, stage: str,
           stderr_path: Path, owner: ExitStack | None, log_offset: int | None = None) -> LibvirtVm:
    """Run `create` (which makes the domain and returns it) so that no moment
    exists in which the domain is nobody's: a signal that arrives meanwhile is held
    until `owner` (the caller's exit stack) has `vm.stop`; a failure after that
    stops it here. `log_offset`: where this run's part of libvirt's log of the
    domain begins (default: its end now)."""
    libvirt = _libvirt()

    name = parse_domain_xml(xml)["name"]
    offset = _log_size(conn.getURI(), name) if log_offset is None else log_offset
    vm: LibvirtVm | None = None
    try:
        with signals_held():
            try:
                dom = create()
            except libvirt.libvirtError as e:
                tail = "\n".join(_read_log(run_paths(conn.getURI(), name)[1], offset).splitlines()[-20:])
                raise LabError(stage, f"libvirt could not start domain {name}: {e}", tail=tail) from None
            vm = LibvirtVm(spec, xml=xml, dom=dom, conn=conn, stderr_path=stderr_path, log_offset=offset)
            if owner is not None:
                owner.callback(vm.stop)
        # QEMU fails at once on a bad passthrough argument or a taken port; say so now
        qemu.check_started(vm, stage, lambda: f"domain {name} ended at once")
        return vm
    except BaseException:
        if vm is not None:
            vm.stop()  # safe twice: the owner's callback finds it stopped
        else:
            conn.close()
        raise


def start(spec: qemu.VmSpec, *, uri: str, stderr_path: Path, owner: ExitStack | None = None,
          name: str | None = None) -> LibvirtVm:
    """Create a transient domain for `spec` (libvirt forgets it when it stops) on
    its own connection to `uri` (a local libvirtd: dom0's SSH is a port forward on
    this host's 127.0.0.1). Unlike the qemu driver's QEMU, the domain does not die
    with the lab (libvirtd is QEMU's parent): what a SIGKILLed lab leaves runs on
    until a later run's `sweep`."""
    _check_access(uri, spec)
    xml = render_domain_xml(spec, name=name or domain_name(), uuid=str(uuidlib.uuid4()))
    conn = connect(uri)
    return _adopt(spec, xml, conn, lambda: conn.createXML(xml, 0), stage="boot:qemu",
                  stderr_path=stderr_path, owner=owner)


def save(vm: LibvirtVm, path: Path) -> float:
    """virDomainSave: RAM and device state to `path`; the domain stops (a
    transient one is gone). Returns the seconds it took. The run that saved goes
    on with `restore` of this file onto new overlays over the frozen disks."""
    libvirt = _libvirt()

    t = time.monotonic()
    try:
        vm._dom.save(str(path))
    except libvirt.libvirtError as e:
        raise LabError("boot:save", f"libvirt could not save domain {vm.name}: {e}", tail=vm.stderr_tail()) from None
    return time.monotonic() - t


def saved_identity(conn: Any, path: Path) -> tuple[str, str]:
    """(name, uuid) of the domain saved at `path`: a restore must keep both."""
    facts = parse_domain_xml(conn.saveImageGetXMLDesc(str(path), 0))
    return str(facts["name"]), str(facts["uuid"])


def restore(conn: Any, path: Path, spec: qemu.VmSpec, *, stderr_path: Path, owner: ExitStack | None = None,
            paused: bool = False, log_offset: int | None = None) -> tuple[LibvirtVm, float]:
    """virDomainRestoreFlags with the XML of `spec` (the new run's overlays, console
    and SSH port; the same devices, or libvirt refuses it) under the saved name and
    uuid, owned by this process. The domain is transient and owned by `owner` as
    in `start`. Returns it and the seconds the restore took. `log_offset`: as
    `LibvirtVm.log_offset` of the domain this run saved, so that `stop` keeps
    its whole log (a restore keeps the name, so libvirt's log goes on)."""
    libvirt = _libvirt()

    name, uuid = saved_identity(conn, path)
    _check_access(conn.getURI(), spec)
    xml = render_domain_xml(spec, name=name, uuid=uuid)
    vconn = connect(conn.getURI())
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
    took: list[float] = []

    def create() -> Any:
        t = time.monotonic()
        try:
            vconn.restoreFlags(str(path), xml, flags)
            took.append(time.monotonic() - t)
        except libvirt.libvirtError as e:
            if "already active" in str(e) or "already exists" in str(e):
                raise StateBusy("boot:restore", f"domain {name} already runs: libvirt restores a saved state only "
                                "under its saved name and uuid, so one state runs once at a time "
                                "(a dead lab's domain goes with lab.libvirt.sweep)") from None
            raise
        return vconn.lookupByUUIDString(uuid)

    vm = _adopt(spec, xml, vconn, create, stage="boot:restore", stderr_path=stderr_path, owner=owner,
                log_offset=log_offset)
    return vm, took[0]


def mark_kept(vm: LibvirtVm) -> None:
    """The user asked for the lab to stay up (`--keep`): no sweep ends this domain
    once this process is gone (`lab down` does)."""
    libvirt = _libvirt()

    pid, start = os.getpid(), process_start(os.getpid()) or 0
    try:
        vm._dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            f'<owner pid="{pid}" start="{start}" kept="yes"/>', "lab", OWNER_NS,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise LabError("keep", f"libvirt could not mark domain {vm.name} as kept ({e}): a later run's sweep "
                       "may end it") from None


def running(conn: Any, uuid: str) -> str | None:
    """The name of the active domain with `uuid`, or None if there is none."""
    libvirt = _libvirt()

    try:
        dom = conn.lookupByUUIDString(uuid)
        return str(dom.name()) if dom.isActive() else None
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise LabError("boot:libvirt", f"libvirt: looking up domain {uuid}: {e}") from None


def end_kept(conn: Any, uuid: str, *, name: str, prove: Callable[[int], str | None]) -> str:
    """`lab down` of a kept lab's domain: destroy it through libvirt, only once it
    is proven the lab's: the same name and uuid as the lab recorded, a lab's
    name, and `prove(its QEMU pid)` finding nothing wrong (None). Returns what was
    done; LabError (nothing done) when the proof fails."""
    libvirt = _libvirt()

    try:
        dom = conn.lookupByUUIDString(uuid)
        actual = str(dom.name())
        if not dom.isActive():
            return f"domain {actual} was not running"
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return f"domain {name} is gone already"
        raise LabError("down", f"libvirt: looking up domain {name} ({uuid}): {e}") from None
    if actual != name or not actual.startswith(PREFIX):
        raise LabError("down", f"domain {uuid} is {actual!r}, not the lab's {name!r}: nothing was destroyed")
    try:
        pid = int(run_paths(conn.getURI(), actual)[0].read_text().strip())
    except (OSError, ValueError) as e:
        raise LabError("down", f"domain {actual}: no QEMU pid from libvirt ({e}): nothing was destroyed") from None
    problem = prove(pid)
    if problem:
        raise LabError("down", f"domain {actual}: {problem}: nothing was destroyed")
    try:
        dom.destroy()
    except libvirt.libvirtError as e:
        raise LabError("down", f"libvirt could not destroy domain {actual}: {e}") from None
    return f"domain {actual} destroyed (QEMU pid {pid})"
