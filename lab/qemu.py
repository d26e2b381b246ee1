"""The `qemu` L0 driver: QEMU as a subprocess.

The command line is a list built by small pure functions, one per concern
(machine, accelerator + CPU, kernel + modules, drives, network, serial, monitor),
each tested with a table of cases. `Vm` owns the process: it is started in its own
process group and killed with it, whatever happens: Ctrl-C, SIGTERM or SIGHUP
while it starts (`start`), or the lab's own death (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lab.errors import LabError
from lab.runner import die_with_parent, kill_group, signals_held

log = logging.getLogger("lab.qemu")
QEMU = "qemu-system-x86_64"


# ------------------------------------------------------------ argv builders
def machine_args(machine: str = "pc") -> list[str]:
    # -nodefaults: no stray devices (the default NIC would bypass restrict=on).
    return ["-machine", machine, "-nodefaults", "-display", "none", "-no-reboot"]


def accel_args(accel: str, cpu_model: str = "") -> list[str]:
    """TCG: `qemu64,+svm,+npt` is the one CPU model whose Xen PV dom0 was stable
    (facts/xen-under-qemu.md: `max` crashes dom0 through SMAP emulation, `max,-smap`
    made dom0 userspace flaky). tb-size=256 keeps QEMU's RSS near 2 GB.
    KVM: the host CPU, so nested VMX/SVM reaches Xen."""
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", cpu_model or "qemu64,+svm,+npt"]
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", cpu_model or "host"]
    raise ValueError(f"unknown accelerator {accel!r}")


def smp_mem_args(cpus: int, memory_mib: int) -> list[str]:
    return ["-smp", str(cpus), "-m", f"{memory_mib}M"]


def multiboot_args(*, xen: Path, xen_cmdline: str, modules: list[tuple[Path, str]]) -> list[str]:
    """Xen as a multiboot kernel; dom0's kernel and initrd as modules.

    QEMU separates modules with ',' and a module's own command line follows its
    path after a space, so a literal ',' must be doubled."""
    mods = []
    for path, args in modules:
        text = f"{path} {args}".strip() if args else str(path)
        mods.append(text.replace(",", ",,"))
    argv = ["-kernel", str(xen), "-append", xen_cmdline]
    if mods:
        argv += ["-initrd", ",".join(mods)]
    return argv


@dataclass(frozen=True)
class Drive:
    path: Path
    serial: str  # how dom0 finds the disk: /sys/block/vdX/serial
    fmt: str = "qcow2"
    readonly: bool = False
    boot: bool = False  # the firmware boots this disk (a FreeBSD dom0: its loader starts Xen)


def drive_args(drives: list[Drive]) -> list[str]:
    """virtio-blk disks, one per drive. cache=unsafe: every writable layer is a
    throwaway overlay, so flushes to the host buy nothing."""
    argv: list[str] = []
    for i, d in enumerate(drives):
        ro = ",readonly=on" if d.readonly else ""
        boot = ",bootindex=0" if d.boot else ""
        argv += [
            "-drive", f"file={d.path},if=none,id=d{i},format={d.fmt},cache=unsafe,discard=unmap{ro}",
            "-device", f"virtio-blk-pci,drive=d{i},serial={d.serial}{boot}",
        ]
    return argv


def net_args(ssh_port: int) -> list[str]:
    """User networking with restrict=on: the VM reaches nothing outside QEMU; the
    only way in is the SSH forward, bound to 127.0.0.1."""
    return [
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
    ]


def serial_args(console_log: Path) -> list[str]:
    return ["-serial", f"file:{console_log}"]


def qmp_args(sock: Path) -> list[str]:
    return ["-qmp", f"unix:{sock},server=on,wait=off"]


@dataclass(frozen=True)
class VmSpec:
    accel: str
    cpus: int
    memory_mib: int
    xen: Path | None  # None: no -kernel, the firmware boots the Drive marked `boot`
    xen_cmdline: str
    modules: list[tuple[Path, str]]
    drives: list[Drive]
    ssh_port: int
    console_log: Path
    qmp_sock: Path | None  # None: no monitor (the offline FreeBSD provisioning/build VMs need none)
    cpu_model: str = ""
    extra: list[str] = field(default_factory=list)
    network: bool = True  # False: no NIC at all (FreeBSD's provisioning and kernel-build VMs)


def build_argv(spec: VmSpec) -> list[str]:
    return [
        QEMU,
        *machine_args(),
        *accel_args(spec.accel, spec.cpu_model),
        *smp_mem_args(spec.cpus, spec.memory_mib),
        *(multiboot_args(xen=spec.xen, xen_cmdline=spec.xen_cmdline, modules=spec.modules) if spec.xen else []),
        *drive_args(spec.drives),
        *(net_args(spec.ssh_port) if spec.network else []),
        *serial_args(spec.console_log),
        *(qmp_args(spec.qmp_sock) if spec.qmp_sock else []),
        *spec.extra,
    ]


# ------------------------------------------------------------ helpers
def free_port() -> int:
    """A free TCP port on 127.0.0.1, chosen now. QEMU binds it a moment later; if
    something else took it meanwhile QEMU fails at once and the caller retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_img(argv: list[str], *, stage: str = "boot:qemu", timeout: float = 60) -> str:
    """qemu-img, whose failure is the lab's (ERROR at `stage`), never an exception
    of another kind that could be read as a verdict. Returns its stdout."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(stage, f"`{' '.join(argv)}` failed: {e}") from None
    if res.returncode != 0:
        raise LabError(stage, f"`{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()[-500:]}")
    return res.stdout


# A run's writable layers take the workloads' small random writes and are
# deleted at the run's end. With qcow2's default 64 KiB clusters a 4 KiB write
# allocates 64 KiB: fio's 30 s filled a 1 GiB test disk's overlay to about
# 800 MiB, and unlinking it took 2.8 s on a host whose filesystem is mounted
# with `discard` (it is here), most of a warm run's teardown on L0. With 4 KiB
# clusters the same writes fill about 100 MiB and the unlink takes 0.05 s.
RUN_LAYER_OPTS = ["-o", "cluster_size=4096"]


def create_overlay(base: Path, overlay: Path, *, base_fmt: str = "raw") -> None:
    qemu_img(["qemu-img", "create", "-q", "-f", "qcow2", *RUN_LAYER_OPTS, "-F", base_fmt, "-b", str(base),
              str(overlay)])


def create_disk(path: Path, size: int) -> None:
    qemu_img(["qemu-img", "create", "-q", "-f", "qcow2", *RUN_LAYER_OPTS, str(path), str(size)])


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.splitlines()[0] if out else "unknown"


class Qmp:
    """A minimal QMP client (one command at a time, each with a deadline)."""

    def __init__(self, path: Path, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            # asynchronous events are skipped

    def close(self) -> None:
        self.sock.close()


def run_state(qmp: Callable[[str], object]) -> str:
    """A VM's run state through its QMP (either driver's), for evidence only."""
    try:
        st = qmp("query-status")
        return str(st.get("status")) if isinstance(st, dict) else str(st)
    except (OSError, RuntimeError, ConnectionError) as e:
        return f"unknown ({e})"


class Vm:
    """A running QEMU. `stop()` kills its whole process group; safe to call twice."""

    def __init__(self, spec: VmSpec, argv: list[str], stderr_path: Path, *, die_with_lab: bool = True) -> None:
        self.spec = spec
        self.argv = argv
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                start_new_session=True,  # a deadline kills its group
                # and the lab's death kills it (no orphan TCG guest), unless it is
                # to outlive the run (--keep: the user asked for a lab left up)
                preexec_fn=die_with_parent() if die_with_lab else None,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.started = time.monotonic()
        log.info("QEMU pid %d, ssh on 127.0.0.1:%d", self.proc.pid, spec.ssh_port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def qmp(self, name: str, **args: object) -> object:
        if self.spec.qmp_sock is None:
            raise RuntimeError("this VM has no QMP monitor")
        q = Qmp(self.spec.qmp_sock)
        try:
            return q.cmd(name, **args)
        finally:
            q.close()

    def status(self) -> str:
        """QEMU's run state, for evidence only: the hang decision never reads it."""
        return run_state(self.qmp)

    def pause(self) -> None:
        """Freeze the whole VM (the `pause-l1` fault): QMP `stop`."""
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.error("QEMU pid %d did not die after SIGKILL", self.proc.pid)
        self._stderr.close()
        if self.spec.qmp_sock is not None:
            self.spec.qmp_sock.unlink(missing_ok=True)


class _Started(Protocol):
    def alive(self) -> bool: ...
    def stderr_tail(self, n: int = 20) -> str: ...
    def stop(self, timeout: float = 10) -> None: ...


def check_started(vm: _Started, stage: str, why: Callable[[], str], *, seconds: float = 0.5) -> None:
    """A VM just started (either driver's) that is gone within `seconds` failed at
    once (a bad argument, a taken port): stop it and raise with its stderr's tail."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and vm.alive():
        time.sleep(0.1)
    if not vm.alive():
        tail = vm.stderr_tail()
        vm.stop()
        raise LabError(stage, why(), tail=tail)


def start(spec: VmSpec, stderr_path: Path, *, owner: ExitStack | None = None, die_with_lab: bool = True) -> Vm:
    """Start QEMU and check it did not exit at once. There is no moment in which a
    started QEMU is nobody's: a signal that arrives while Popen returns is held
    until `vm` is bound and `owner` (the caller's exit stack) has `vm.stop`; one
    that arrives during the start check stops QEMU here before it propagates."""
    argv = build_argv(spec)
    vm: Vm | None = None
    try:
        with signals_held():
            vm = Vm(spec, argv, stderr_path, die_with_lab=die_with_lab)
            if owner is not None:
                owner.callback(vm.stop)
        # QEMU fails at once on a bad argument or a taken port; say so now.
        proc = vm.proc
        check_started(vm, "boot:qemu", lambda: f"QEMU exited at once (rc {proc.returncode})")
        return vm
    except BaseException:
        if vm is not None:
            vm.stop()  # safe twice: the owner's callback finds it stopped
        raise


def kvm_usable_quick() -> str | None:
    """Why KVM is certainly unusable, or None if only a real probe can tell."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None
