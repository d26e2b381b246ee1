"""`lab run`: the data flow of architecture.md, one phase after another, each with
its own deadline and its own stage name, and a teardown that always runs.

    images -> overlays -> QEMU -> console milestones -> dom0 SSH -> guests
    -> workload + watchdog -> drain -> evidence -> report -> teardown
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from lab import console, images, l1state, qemu, report, scenario, ssh, workload
from lab.dom0 import DOM0_CLASSES, Backing, FreeBsdDom0
from lab.errors import Interrupted, LabError
from lab.guest import GUEST_CLASSES, parse_block_stat
from lab.runner import CommandLog, LocalRunner
from lab.timing import Deadline
from lab.watchdog import BackendPoint, GuestPoint, Sampler, Track, check_drain, check_hang, longest_gap, peak
from lab.xen import VbdInfo, Xl, XlDisk, parse_xenstore_ls, render_xl_cfg, vbd_info

log = logging.getLogger("lab.run")
GUEST_NET = "10.99.0"
PROBE_SECONDS = 5.0  # dom0's liveness probe: `true` over SSH answers in well under 1 s under TCG  # dom0's xenbr0 is .1; guests from .10 (inside L1 only)


@dataclass
class GuestState:
    cfg: scenario.GuestCfg
    ip: str
    runner: ssh.SshRunner | None = None
    domid: int | None = None
    backings: dict[str, Backing] = field(default_factory=dict)
    vbds: dict[str, VbdInfo] = field(default_factory=dict)
    root_dev: str = ""


@dataclass
class Hooks:
    """For tests and users who script the lab: called with the LabRun."""

    workload_started: Callable[[LabRun], None] | None = None


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so teardown runs for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


FREEBSD_FALLBACK_VERSION = "14.3"  # the plan's version when the latest cannot be looked up


def freebsd_version(sc: scenario.Scenario, *, online: bool = True) -> tuple[str, str]:
    """(version, how it was chosen): the scenario's, else the latest 14.x RELEASE
    from the publisher's index, else a known release for a plan made offline."""
    from lab import freebsd

    if sc.freebsd.version:
        return sc.freebsd.version, "from the scenario"
    if online:
        import urllib.request

        try:
            with urllib.request.urlopen("https://download.freebsd.org/releases/VM-IMAGES/", timeout=5) as r:
                return freebsd.latest_release(r.read().decode(errors="replace"), 14), "latest 14.x RELEASE"
        except (OSError, ValueError, LabError):
            pass
    return FREEBSD_FALLBACK_VERSION, "download.freebsd.org unreachable: assumed the latest known 14.x"


def freebsd_media_or_error(sc: scenario.Scenario) -> tuple[str, str]:
    """A FreeBSD dom0 needs media that only the user's machine or the internet has.
    Say at once, in seconds and before anything starts, what is missing and how to
    supply it. Returns (version, how it was chosen)."""
    from lab import freebsd

    version, how = freebsd_version(sc)
    missing = freebsd.missing_media(
        image_file=sc.freebsd.image or None, packages_dir=sc.freebsd.packages or None,
        cache_dir=images.cache_dir(), version=version)
    if missing:
        raise LabError("image", f"FreeBSD {version} dom0 ({how}): media missing on this machine:\n  - "
                       + "\n  - ".join(missing)
                       + f"\nSupply them in the scenario's [freebsd] table ({sc.source}), or run on a machine "
                       "that reaches download.freebsd.org and pkg.freebsd.org. `lab run ... --plan` lists every step.")
    return version, how


def hang_summary(hang: dict, cause: str, t: float | None) -> str:
    """One line: what stopped, where, and since when."""
    since = f" since t={t:.0f}s of the workload" if t is not None else ""
    where = ""
    if hang.get("backend_taken") is not None and hang.get("guest_completed") is not None:
        held = hang["backend_taken"] - hang["guest_completed"]
        where = (f"; dom0: blkback took {hang['backend_taken']} requests, {held} not completed to the guest, "
                 f"{hang.get('backing_inflight')} in flight on the backing device")
    elif hang.get("evidence"):
        where = f": {hang['evidence']}"
    first = hang.get("side_stopped_first")
    side = f"; stopped first: {first}" if first and first != "unknown" else ""
    return f"HANG: {cause}{since}{where}{side}"


class _SkipEvidence(Exception):
    pass


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def runs_dir() -> Path:
    return images.cache_dir() / "runs"


def clean_stale_runs() -> list[str]:
    """Work directories of runs whose lab process and QEMU are both gone (killed
    with SIGKILL, power cut): remove them. Kept labs stay while their QEMU runs."""
    removed = []
    for d in runs_dir().glob("run-*"):
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        pids = [p for p in (owner.get("pid"), owner.get("qemu_pid")) if p]
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


class LabRun:
    def __init__(
        self,
        sc: scenario.Scenario,
        *,
        results_root: Path,
        accel: str | None = None,
        keep: bool = False,
        cold: bool = False,
        hooks: Hooks | None = None,
        results_dir: Path | None = None,
    ) -> None:
        self.results_dir = results_dir  # an exact directory (bisect steps) instead of results/<name>/<stamp>
        self.cold = cold  # never restore a saved L1 (a new state is still saved if none exists)
        self.pending_state: l1state.State | None = None
        self.sc = sc
        self.results_root = results_root
        self.accel_override = accel
        self.keep = keep
        self.hooks = hooks or Hooks()
        self.record: dict = {"scenario": sc.name, "verdict": "ERROR", "stage": "setup", "phases": {}}
        self.phases: dict[str, float] = self.record["phases"]
        self.stage = "setup"
        self.vm: qemu.Vm | None = None
        self.dom0: ssh.SshRunner | None = None
        self.guests: dict[str, GuestState] = {}
        self.tracks: list[Track] = []
        self.samplers: list[Sampler] = []
        self.cleanups: list[Callable[[], None]] = []  # run before QEMU stops (faults release)
        self._socket_dirs: list[Path] = []  # short homes of QMP sockets (_qmp_path)
        self.consoles: dict[str, console.Console] = {}
        self.t_workload = 0.0
        self.lock = threading.Lock()
        self.interrupted = False
        self.injector = None  # type: ignore[var-annotated]
        self._l1_alive: bool | None = None
        self._console_size, self._console_moved_t, self._last_probe_t = -1, 0.0, 0.0

    # ------------------------------------------------------------ top level
    def execute(self) -> dict:
        t_start = time.monotonic()
        if self.results_dir is not None:
            self.results = self.results_dir
            self.results.mkdir(parents=True, exist_ok=True)
        else:
            self.results = report.make_results_dir(self.results_root, self.sc.name)
        self.record.update(results_dir=str(self.results), started_utc=report.utc_stamp())
        (self.results / "scenario.toml").write_text(scenario.to_toml(self.sc))
        self.cmdlog = CommandLog(self.results / "commands.log")
        self.l0 = LocalRunner(self.cmdlog)
        runs_dir().mkdir(parents=True, exist_ok=True)
        clean_stale_runs()
        self.work = Path(
            __import__("tempfile").mkdtemp(prefix=f"run-{report.utc_stamp()}-", dir=runs_dir())
        )
        self._write_owner()
        torn_down = False
        try:
            with sigterm_as_exception():
                try:
                    self._pipeline()
                except LabError as e:
                    self._error(e)
                except Interrupted as e:
                    self.interrupted = True
                    self._error(LabError(self.stage, f"interrupted by {e}"))
                    raise
                except KeyboardInterrupt:
                    self.interrupted = True
                    self._error(LabError(self.stage, "interrupted (Ctrl-C)"))
                    raise
                finally:
                    self._finish_record(t_start)
                    self._settle_state()
                    keep = self.keep and self.record["verdict"] != "PASS" and self.vm and self.vm.alive()
                    if keep:
                        self._leave_running()
                    else:
                        t = time.monotonic()
                        self.teardown()
                        self.phases["teardown"] = round(time.monotonic() - t, 2)
                        torn_down = True
                    self.record["wall_s"] = round(time.monotonic() - t_start, 2)
                    report.write_record(self.results / "record.json", self.record)
        finally:
            if not torn_down and not (self.keep and self.vm and self.vm.alive()):
                self.teardown()
        return self.record

    def _pipeline(self) -> None:
        self._phase("images", self.prepare_images)
        self._phase("boot", self.boot_l1)
        self._phase("backend", self.install_backend)
        self._phase("guests", self.start_guests)
        self._phase("workload", self.run_workloads)

    def _phase(self, name: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        try:
            fn()
        finally:
            self.phases[name] = round(time.monotonic() - t, 2)

    def _bisect_code(self) -> int:
        """As a `git bisect run` step: a lab failure never blames a commit, nor does
        an L1 that went unresponsive without a lockup or panic on any console."""
        v = self.record["verdict"]
        if v == "HANG" and (self.record.get("hang") or {}).get("l1_unresponsive"):
            return 125
        return report.BISECT_CODES[v]

    def _settle_state(self) -> None:
        """Keep a state saved during this run only if the run reached a decision."""
        if self.pending_state is None:
            return
        verdict = "ERROR" if self.interrupted else self.record["verdict"]
        kept = l1state.promote(self.pending_state, verdict)
        self.pending_state = None
        l1 = self.record.setdefault("l1", {})
        l1["state_kept"] = kept is not None
        if kept is None:
            l1.pop("saved_state", None)

    def _error(self, e: LabError) -> None:
        log.error("%s", e)
        self.record.update(verdict="ERROR", stage=e.stage, error=e.message)
        if e.tail:
            self.record["console_tail"] = e.tail.splitlines()[-30:]
        self.record.setdefault("summary", f"lab failed at stage {e.stage}: {e.message}")

    # ------------------------------------------------------------ images
    def prepare_images(self) -> None:
        self.stage = "image"
        if self.sc.dom0.os == "freebsd":
            self._prepare_freebsd()
            return
        self.dom0_img = images.ensure_image("linux-dom0", runner=self.l0)
        self.guest_img = images.ensure_image("linux-guest", runner=self.l0)
        self.keys = images.ensure_keys()
        m = self.dom0_img.manifest
        self.record["images"] = {
            "dom0": str(self.dom0_img.dir), "guest": str(self.guest_img.dir),
            "kernel_abi": m.get("kernel_abi"), "xen": m.get("xen"),
            "xen_version": m.get("packages", {}).get("xen-hypervisor-4.17-amd64"),
            "kernel_version": m.get("packages", {}).get(f"linux-image-{m.get('kernel_abi')}"),
        }
        self.xen_bin = self._user_file(self.sc.xen.binary, "xen.binary") or self.dom0_img.xen
        if self.sc.xen.binary and self.xen_bin.suffix == ".gz":
            plain = self.work / "xen"
            import gzip

            plain.write_bytes(gzip.decompress(self.xen_bin.read_bytes()))
            self.xen_bin = plain
        self.dom0_kernel = self._user_file(self.sc.dom0.kernel, "dom0.kernel") or self.dom0_img.kernel
        self.dom0_initrd = self._user_file(self.sc.dom0.initrd, "dom0.initrd") or self.dom0_img.initrd
        self.dom0_root = (self.dom0_img.root, "raw")

    def _prepare_freebsd(self) -> None:
        """Media (or a clear ERROR naming what is missing), the provisioned dom0
        image, and the kernel built from [freebsd] src when there is one."""
        from lab import freebsd

        version, how = freebsd_media_or_error(self.sc)
        self.guest_img = images.ensure_image("linux-guest", runner=self.l0)
        self.keys = images.ensure_keys()
        accel, why = self.choose_accel()
        self.record.update(accel=accel, accel_reason=why)
        t = time.monotonic()
        self.fb_img = freebsd.ensure_dom0_image(
            self.sc.freebsd, version=version, accel=accel, cpus=self.sc.lab.cpus,
            dom0_mem_mb=self.sc.dom0.memory.mib, keys=self.keys, runner=self.l0, results=self.results,
            cache=images.cache_dir() / "freebsd", loader_timeout=self.sc.deadlines.xen_banner)
        self.phases["freebsd_image"] = round(time.monotonic() - t, 2)
        m = self.fb_img.manifest
        self.record["images"] = {"dom0": str(self.fb_img.path), "guest": str(self.guest_img.dir),
                                 "freebsd_version": version, "version_chosen": how, "base_image": m.get("image"),
                                 "packages": m.get("packages"), "kernel_id": self.fb_img.kernel_id}
        self.dom0_root = (self.fb_img.path, "qcow2")

    def _user_file(self, value: str, key: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        if not p.is_file():
            raise LabError("image", f"{self.sc.source}: key '{key}': expected an existing file, got {value!r}")
        return p.resolve()

    # ------------------------------------------------------------ L1
    def _boot_disk(self) -> Path:
        """A small read-only ext4 disk holding each guest's kernel and initrd, which
        dom0's xl needs as files. Built per run in a fraction of a second."""
        stage = self.work / "boot"
        stage.mkdir()
        total = 0
        for g in self.sc.guests:
            kernel = self._user_file(g.kernel, "guests.kernel") or self.guest_img.kernel
            initrd = self._user_file(g.initrd, "guests.initrd") or self.guest_img.initrd
            for src, dst in ((kernel, f"{g.name}-vmlinuz"), (initrd, f"{g.name}-initrd")):
                shutil.copyfile(src, stage / dst)
                total += src.stat().st_size
        img = self.work / "boot.img"
        # A fixed size: a restored dom0 has this disk's capacity cached from its boot.
        size_mib = 128
        if total * 1.2 > size_mib * 2**20:
            raise LabError("image", f"the guests' kernels and initrds ({total >> 20} MiB) do not fit the "
                           f"{size_mib} MiB boot disk")
        self.l0.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(stage), str(img), f"{size_mib}M"],
                    timeout=60).check("image")
        shutil.rmtree(stage)
        return img

    def choose_accel(self) -> tuple[str, str]:
        requested = self.accel_override or self.sc.lab.accel
        if requested != "auto":
            return requested, f"requested ({requested})"
        from lab import kvmprobe

        if self.sc.dom0.os == "freebsd":
            from lab.freebsd import nested_kvm_problem

            # no probe VM: the probe boots the Linux dom0's Xen; a PVH dom0 needs
            # nested VMX/SVM, which the host states in a module parameter
            why = qemu.kvm_usable_quick() or nested_kvm_problem()
            return ("tcg", f"TCG: {why}") if why else ("kvm", "KVM with nested virtualisation enabled")

        ok, why = kvmprobe.kvm_works(self.xen_bin, self.dom0_kernel, self.dom0_initrd)
        return ("kvm" if ok else "tcg"), why

    def _slots(self) -> list[l1state.Slot]:
        slots = [l1state.Slot("dom0-root", "lab-dom0-root", base=self.dom0_root[0], base_fmt=self.dom0_root[1])]
        for i, g in enumerate(self.sc.guests):
            slots.append(l1state.Slot(f"{g.name}-root", f"lab-{g.name}-root", base=self.guest_img.root))
            for d in g.disks:
                slots.append(l1state.Slot(f"{g.name}-{d.vdev}", f"lab-{g.name}-{d.vdev}", size=d.size))
            self.guests[g.name] = GuestState(g, f"{GUEST_NET}.{10 + i}")
        return slots

    @staticmethod
    def _drives(disks: list[Path], slots: list[l1state.Slot], boot_disk: Path) -> list[qemu.Drive]:
        """L1's disks, whatever the dom0 OS: each slot by its serial, then the
        read-only disk with the guests' kernels."""
        drives = [qemu.Drive(p, s.serial) for p, s in zip(disks, slots, strict=True)]
        return [*drives, qemu.Drive(boot_disk, "lab-boot", fmt="raw", readonly=True)]

    def _spec(self, accel: str, disks: list[Path], slots: list[l1state.Slot], boot_disk: Path,
              extra: list[str] | None = None) -> qemu.VmSpec:
        mem = self.sc.dom0.memory.mib
        drives = self._drives(disks, slots, boot_disk)
        return qemu.VmSpec(
            accel=accel, cpus=self.sc.lab.cpus, memory_mib=self.sc.lab.memory.mib,
            cpu_model=self.sc.lab.cpu_model, xen=self.xen_bin,
            xen_cmdline=f"{self.sc.xen.cmdline} dom0_mem={mem}M,max:{mem}M",
            modules=[(self.dom0_kernel, f"{self.sc.dom0.cmdline} lab.root=/dev/vda"), (self.dom0_initrd, "")],
            drives=drives, ssh_port=qemu.free_port(), console_log=self.results / "console-xen.log",
            qmp_sock=self._qmp_path(), extra=extra or [],
        )

    def _start_qemu(self, spec: qemu.VmSpec) -> qemu.VmSpec:
        for attempt in (1, 2):  # the port may be taken between choosing and binding it
            (self.results / "qemu-argv.json").write_text(json.dumps(qemu.build_argv(spec), indent=1) + "\n")
            try:
                self.vm = qemu.start(spec, self.results / "qemu-stderr.log")
                break
            except LabError as e:
                if attempt == 2 or "hostfwd" not in e.tail:
                    raise
                spec = dataclasses.replace(spec, ssh_port=qemu.free_port())
        assert self.vm is not None
        self._write_owner()
        self.record["qemu"] = {"pid": self.vm.pid, "version": qemu.qemu_version(), "ssh_port": spec.ssh_port}
        return spec

    def boot_l1(self) -> None:
        """Restore a saved L1 whose key matches, else boot cold (and save one)."""
        self.stage = "boot:qemu"
        if self.sc.dom0.os == "freebsd":
            self._freebsd_boot()
            return
        accel, why = self.choose_accel()
        self.record.update(accel=accel, accel_reason=why)
        slots = self._slots()
        boot_disk = self._boot_disk()
        self.consoles["xen"] = console.Console(self.results / "console-xen.log", "Xen serial")
        probe = self._spec(accel, [Path(s.name) for s in slots], slots, boot_disk)
        inputs = l1state.key_inputs(probe, slots)
        key = l1state.state_key(inputs)
        l1: dict = {"key": key}
        self.record["l1"] = l1
        state = None if self.cold else l1state.find(key)
        if state is not None:
            try:
                self._restore(accel, state, slots, boot_disk, l1)
                return
            except LabError as e:
                # never a PASS of a run that did not happen as described: say so,
                # drop the state that failed, boot cold and save a new one
                log.warning("restore of L1 state %s failed, booting cold: %s", key, e)
                l1["restore_failed"] = str(e)
                if self.vm:
                    self.vm.stop()
                    self.vm = None
                if self.dom0:
                    self.dom0.close()
                    self.dom0 = None
                for s in slots:
                    (self.work / f"{s.name}.qcow2").unlink(missing_ok=True)
                l1state.remove(key)
                self.consoles["xen"].path.unlink(missing_ok=True)
        self._cold_boot(accel, slots, boot_disk, l1, inputs)

    def _restore(self, accel: str, state: l1state.State, slots: list[l1state.Slot], boot_disk: Path,
                 l1: dict) -> None:
        self.stage = "boot:restore"
        t0 = time.monotonic()
        disks = l1state.restore_overlays(state, slots, self.work)
        spec = self._start_qemu(self._spec(accel, disks, slots, boot_disk,
                                           extra=["-incoming", f"exec:cat {state.file}"]))
        assert self.vm is not None
        l1.update(start="restored", state=str(state.dir))
        l1["load_s"] = round(l1state.wait_restored(self.vm, timeout=120), 2)
        shutil.copyfile(state.dir / "console-boot.log", self.results / "console-xen-boot.log")
        self._connect_dom0(spec, Deadline(60), stage="boot:restore")
        l1["dom0_ready_s"] = round(time.monotonic() - t0, 2)
        self.record["boot"] = {"restore_load": l1["load_s"], "dom0_ssh": l1["dom0_ready_s"]}
        self._after_boot()

    def _cold_boot(self, accel: str, slots: list[l1state.Slot], boot_disk: Path, l1: dict, inputs: dict) -> None:
        saving = l1state.find(l1["key"]) is None
        if saving:
            self.pending_state = l1state.begin(l1["key"])
            disks = l1state.create_disks(self.pending_state, slots)
        else:
            disks = l1state.create_disks(self.work, slots)
        t_qemu = time.monotonic()
        spec = self._start_qemu(self._spec(accel, disks, slots, boot_disk))
        assert self.vm is not None
        l1.update(start="cold")
        con = self.consoles["xen"]
        dl = self.sc.deadlines
        boot: dict[str, float] = {}
        self.record["boot"] = boot
        con.wait_for(console.XEN_BANNER, Deadline(dl.xen_banner), alive=self.vm.alive)
        boot["xen_banner"] = round(time.monotonic() - t_qemu, 2)
        con.wait_for(console.DOM0_KERNEL, Deadline(dl.dom0_kernel), alive=self.vm.alive)
        boot["dom0_kernel"] = round(time.monotonic() - t_qemu, 2)
        self.stage = "boot:dom0"
        con.wait_for(console.DOM0_INIT, Deadline(dl.dom0_ssh), alive=self.vm.alive)
        boot["dom0_init"] = round(time.monotonic() - t_qemu, 2)
        if saving and self.pending_state is not None:
            # dom0 is up, no SSH session has ever been opened, no domU exists
            self.stage = "boot:save"
            shutil.copyfile(con.path, self.pending_state.dir / "console-boot.log")
            l1["save_paused_s"] = round(
                l1state.save(self.vm, self.pending_state, slots, self.work, inputs=inputs), 2)
            l1["saved_state"] = str(l1state.states_dir() / l1["key"])
        self._connect_dom0(spec, Deadline(dl.dom0_ssh), stage="boot:ssh")
        boot["dom0_ssh"] = round(time.monotonic() - t_qemu, 2)
        l1["dom0_ready_s"] = boot["dom0_ssh"]
        self._after_boot()

    def _freebsd_boot(self) -> None:
        """FreeBSD's loader boots Xen, Xen builds FreeBSD as its PVH dom0. Always a
        cold boot (warm start is Linux-dom0 only so far). A missed milestone names
        the ones reached: a PVH dom0 under TCG is new ground (docs/freebsd.md)."""
        from lab import freebsd

        accel = self.record["accel"]
        if accel == "kvm":
            problem = freebsd.nested_kvm_problem()
            if problem:
                raise LabError("boot:qemu", problem)
        slots = self._slots()
        boot_disk = self._boot_disk()
        self.record["l1"] = {"start": "cold", "warm_start": "not for a FreeBSD dom0 yet"}
        disks = l1state.create_disks(self.work, slots)
        drives = self._drives(disks, slots, boot_disk)
        self.consoles["xen"] = console.Console(self.results / "console-xen.log", "Xen serial")
        spec = self._start_qemu(freebsd.vm_spec(
            drives, console_log=self.results / "console-xen.log", qmp_sock=self._qmp_path(), accel=accel,
            cpus=self.sc.lab.cpus, memory_mib=self.sc.lab.memory.mib, ssh_port=qemu.free_port(),
            cpu_model=self.sc.lab.cpu_model))
        assert self.vm is not None
        t_qemu = self.vm.started
        dl = self.sc.deadlines
        boot: dict[str, float] = {}
        self.record["boot"] = boot
        limits = {freebsd.FREEBSD_LOADER: dl.xen_banner, console.XEN_BANNER: dl.xen_banner,
                  freebsd.XEN_PVH_DOM0: dl.dom0_kernel, freebsd.FREEBSD_KERNEL: dl.dom0_kernel,
                  console.DOM0_INIT: dl.dom0_ssh}
        for m in freebsd.DOM0_BOOT:
            self.stage = m.stage
            try:
                self.consoles["xen"].wait_for(m, Deadline(limits[m]), alive=self.vm.alive)
            except LabError as e:
                reached = ", ".join(f"{k} at {v:.0f}s" for k, v in boot.items()) or "none"
                raise LabError(e.stage, f"FreeBSD dom0 boot: {e.message}; milestones reached: {reached}",
                               tail=e.tail) from None
            boot[m.what] = round(time.monotonic() - t_qemu, 2)
        self._connect_dom0(spec, Deadline(dl.dom0_ssh), stage="boot:ssh")
        boot["dom0_ssh"] = round(time.monotonic() - t_qemu, 2)
        self._after_boot()

    def _connect_dom0(self, spec: qemu.VmSpec, deadline: Deadline, *, stage: str) -> None:
        self.stage = stage
        self.dom0 = ssh.SshRunner(
            "dom0",
            host_key=ssh.load_pinned_key(Path(str(self.keys.host("dom0")) + ".pub")),
            client_key=paramiko.Ed25519Key.from_private_key_file(str(self.keys.client)),
            log_=self.cmdlog,
            connect=ssh.tcp_connect(spec.ssh_port),
        )
        self.dom0.connect(deadline, stage=stage)

    def _after_boot(self) -> None:
        assert self.dom0 is not None
        dl = self.sc.deadlines
        self.dom0_os = DOM0_CLASSES[self.sc.dom0.os](self.dom0, timeout=dl.command)
        # the wall clock of a VM is whatever it booted with; make dom0 agree with L0
        self.dom0_os.set_clock(int(time.time()))
        if isinstance(self.dom0_os, FreeBsdDom0):
            # the kernel is the backend: it must be the one built (or the release's)
            self.stage = "backend"
            kid = self.fb_img.kernel_id
            m = self.fb_img.manifest
            self.record["backend"] = {
                "kind": "built" if kid else "stock", "os": "freebsd", "tree_hash": kid,
                "commit": m.get("commit"), "patches": m.get("patches", []), "kernconf": m.get("kernconf")}
            self.record["backend"]["loaded"] = self.dom0_os.check_kernel(kid)
        else:
            self.record["backend"] = {"kind": "stock", **self.dom0_os.backend_module()}
        self.xl = Xl(self.dom0, timeout=dl.command)

    # ------------------------------------------------------------ backend
    def install_backend(self) -> None:
        """Build the backend under test (cached by source hash) and load it into the
        running dom0 before the first guest exists."""
        self.stage = "backend"
        b = self.sc.backend
        if self.sc.dom0.os == "freebsd":
            return  # built into the dom0 image and checked at boot (_after_boot)
        if not b.source:
            mod = self.record["backend"]
            # the stock run must really run the stock driver
            if "/updates/" in mod.get("module_path", "") or "O" in mod.get("taint", ""):
                raise LabError("backend", f"dom0 has a non-stock xen-blkback loaded: {mod}")
            return
        from lab.backend import BACKEND_BUILDERS

        assert self.dom0 is not None
        abi = self.dom0_img.manifest["kernel_abi"]
        builder = BACKEND_BUILDERS[self.sc.dom0.os](abi, self.l0)
        src = Path(b.source).expanduser()
        if not src.is_dir():
            raise LabError("backend", f"{self.sc.source}: key 'backend.source': expected a kernel source "
                           f"directory, got {b.source!r}")
        t = time.monotonic()
        art = builder.build(src, [Path(p).expanduser() for p in b.patches], self.results)
        self.phases["backend_build"] = round(time.monotonic() - t, 2)
        dom0 = self.dom0
        loaded = self.dom0_os.install_backend(
            art.path, art.identity.get("build_id"),
            put=lambda local, remote: dom0.put_file(local, remote, timeout=60))
        self.record["backend"] = {"kind": "built", **art.identity, "loaded": loaded}

    # ------------------------------------------------------------ guests
    def start_guests(self) -> None:
        self.stage = "guest:create"
        assert self.dom0 is not None
        dl = self.sc.deadlines
        t = time.monotonic()
        self.dom0_os.mount_boot_disk("lab-boot", "/run/lab/boot")
        self.phases["mount_boot_disk"] = round(time.monotonic() - t, 2)
        for g in self.guests.values():
            rk, ri = f"/run/lab/boot/{g.cfg.name}-vmlinuz", f"/run/lab/boot/{g.cfg.name}-initrd"
            g.root_dev = self.dom0_os.disk_by_serial(f"lab-{g.cfg.name}-root")
            disks = [XlDisk("xvda", g.root_dev)]
            for d in g.cfg.disks:
                lower = self.dom0_os.disk_by_serial(f"lab-{g.cfg.name}-{d.vdev}")
                b = self.dom0_os.make_backing(f"lab-{g.cfg.name}-{d.vdev}", lower)
                g.backings[d.vdev] = b
                disks.append(XlDisk(d.vdev, b.path))
            cmd = [g.cfg.cmdline, "lab.root=/dev/xvda", f"lab.ip={g.ip}", f"lab.name={g.cfg.name}"]
            if g.cfg.max_ring_page_order >= 0:
                cmd.append(f"xen_blkfront.max_ring_page_order={g.cfg.max_ring_page_order}")
            if g.cfg.max_queues >= 0:
                cmd.append(f"xen_blkfront.max_queues={g.cfg.max_queues}")
            cfg = render_xl_cfg(
                name=g.cfg.name, run_id=self.results.name, kernel=rk, ramdisk=ri, cmdline=" ".join(cmd),
                memory_mib=g.cfg.memory.mib, vcpus=g.cfg.vcpus, disks=disks,
                mac=f"00:16:3e:00:00:{int(g.ip.rsplit('.', 1)[1]):02x}",
            )
            (self.results / f"xl-{g.cfg.name}.cfg").write_text(cfg)
            path = f"/run/lab/{g.cfg.name}.cfg"
            self.dom0.run(["sh", "-c", f"cat > {path}"], timeout=dl.command, input=cfg).check("guest:create")
            t = time.monotonic()
            # -p then unpause: xenconsoled is already logging when the guest's first line comes
            self.xl.create_paused(path, timeout=dl.guest_create)
            g.domid = self.xl.domid(g.cfg.name)
            self.xl.unpause(g.cfg.name)
            self.phases[f"xl_create_{g.cfg.name}"] = round(time.monotonic() - t, 2)
        self.stage = "guest:boot"
        for g in self.guests.values():
            t = time.monotonic()
            g.runner = ssh.SshRunner(
                g.cfg.name,
                host_key=ssh.load_pinned_key(Path(str(self.keys.host("guest")) + ".pub")),
                client_key=paramiko.Ed25519Key.from_private_key_file(str(self.keys.client)),
                log_=self.cmdlog, connect=ssh.via(self.dom0, g.ip),
            )
            try:
                g.runner.connect(Deadline(dl.guest_ssh), stage="guest:boot")
            except LabError as e:
                e.tail = self._guest_console(g.cfg.name)
                raise
            self.phases[f"guest_ssh_{g.cfg.name}"] = round(time.monotonic() - t, 2)
            assert g.domid is not None
            # every backend kind, so a qdisk would be seen (and refused) too
            be_raw = self.xl.xenstore_raw("/local/domain/0/backend")
            fe_raw = self.xl.xenstore_raw(f"/local/domain/{g.domid}/device/vbd")
            (self.results / f"xenstore-{g.cfg.name}.txt").write_text(be_raw + "\n" + fe_raw)
            be, fe = parse_xenstore_ls(be_raw), parse_xenstore_ls(fe_raw)
            for d in g.cfg.disks:
                g.vbds[d.vdev] = vbd_info(g.domid, d.vdev, be, fe)
        self.record["guests"] = {
            name: {
                "domid": g.domid, "ip": g.ip, "root_dev": g.root_dev,
                "blkfront_params": GUEST_CLASSES[g.cfg.os](name, g.runner, timeout=dl.command).blkfront_params()
                if g.runner else {},
                "vbds": {v: {**dataclasses.asdict(i), "ring_capacity": i.ring_capacity,
                             "sysfs": i.sysfs_name, "backing": dataclasses.asdict(g.backings[v])}
                         for v, i in g.vbds.items()},
            }
            for name, g in self.guests.items()
        }

    def _guest_console(self, name: str, n: int = 30) -> str:
        if not self.dom0 or not self.dom0.alive():
            return ""
        res = self.dom0.run(["tail", "-n", str(n), f"/var/log/xen/console/guest-{name}.log"], timeout=10)
        return res.stdout

    # ------------------------------------------------------------ workload
    def run_workloads(self) -> None:
        self.stage = "workload"
        assert self.dom0 is not None
        dl, wd = self.sc.deadlines, self.sc.watchdog
        jobs: list[tuple[scenario.WorkloadCfg, GuestState, Track]] = []
        for i, w in enumerate(self.sc.workloads):
            g = self.guests[w.guest]
            info = g.vbds[w.disk]
            tr = Track(w.guest, w.disk, info.sysfs_name, info.ring_capacity)
            self.tracks.append(tr)
            jobs.append((w, g, tr))
            job = workload.fio_job(w, GUEST_CLASSES[g.cfg.os].disk_device(w.disk))
            (self.results / f"fio-{i}.job").write_text(job)
            assert g.runner is not None
            g.runner.run(["sh", "-c", f"cat > /run/lab/fio-{i}.job"], timeout=dl.command, input=job).check("workload")
        self.t_workload = time.monotonic()
        self._start_samplers()
        if self.sc.faults:
            self._start_faults()
        results: dict[int, object] = {}
        threads = []
        for i, (w, g, _tr) in enumerate(jobs):
            def go(i: int = i, w: scenario.WorkloadCfg = w, g: GuestState = g) -> None:
                assert g.runner is not None
                results[i] = g.runner.run(
                    workload.fio_argv(f"/run/lab/fio-{i}.job", f"/run/lab/fio-{i}.json"),
                    timeout=w.runtime + dl.workload_grace,
                )
            th = threading.Thread(target=go, name=f"fio-{i}", daemon=True)
            th.start()
            threads.append(th)
        if self.hooks.workload_started:
            self.hooks.workload_started(self)
        end_by = Deadline(max(w.runtime for w in self.sc.workloads) + dl.workload_grace)
        hang = None
        self._jobs = jobs
        while True:
            # decide on a finer tick than the sampling interval: a stall is called
            # within a quarter interval of the window closing, not up to a whole one
            time.sleep(wd.interval / 4)
            now = time.monotonic() - self.t_workload
            crash = self._check_crash()
            if crash:
                return
            for tr in self.tracks:
                hang = check_hang(tr, now, wd.stall_window)
                if hang:
                    break
            if hang:
                self._verdict_hang(hang.as_dict(), hang.cause)
                return
            xhang = self._xbbd_hang()
            if xhang:
                self._verdict_hang(xhang, xhang["cause"])
                return
            unresponsive = self._l1_unresponsive(now)
            if unresponsive:
                self._verdict_hang(unresponsive, unresponsive["cause"])
                return
            if all(not th.is_alive() for th in threads):
                break
            if end_by.expired():
                self.stage = "workload"
                self._verdict_hang(None, f"workload still running {dl.workload_grace:.0f}s past its runtime")
                return
        self.phases["fio"] = round(time.monotonic() - self.t_workload, 2)
        # drain
        self.stage = "drain"
        t_end = time.monotonic() - self.t_workload
        drain_dl = Deadline(wd.drain_window)
        drains = {}
        while True:
            drains = {tr.key: check_drain(tr, t_end) for tr in self.tracks}
            if all(d.drained for d in drains.values()) or drain_dl.expired():
                break
            time.sleep(wd.interval / 2)
        self.phases["drain"] = round(time.monotonic() - self.t_workload - t_end, 2)
        self.record["drain"] = {k: d.as_dict() for k, d in drains.items()}
        wl_records = []
        errors = []
        for i, (w, g, tr) in enumerate(jobs):
            res = results.get(i)
            entry = self._workload_entry(w, tr, t_end)
            assert g.runner is not None
            out = g.runner.run(["cat", f"/run/lab/fio-{i}.json"], timeout=dl.command)
            (self.results / f"fio-{i}.json").write_text(out.stdout)
            try:
                io = workload.parse_fio(out.stdout)
                entry["result"] = io.as_dict()
                if io.errors:
                    errors.append(f"{w.guest}/{w.disk}: fio reported {io.errors} errors")
            except ValueError as e:
                entry["result"] = None
                rc = getattr(res, "rc", None)
                errors.append(f"{w.guest}/{w.disk}: no fio result (rc {rc}: {e})")
            if res is not None and not getattr(res, "ok", False):
                errors.append(f"{w.guest}/{w.disk}: fio exited {getattr(res, 'rc', '?')}: "
                              f"{getattr(res, 'stderr', '').strip()[-300:]}")
            wl_records.append(entry)
        self.record["workloads"] = wl_records
        if self._check_crash():
            return
        errors += self._xbbd_findings()
        not_drained = [k for k, d in drains.items() if not d.drained]
        if errors:
            self.record.update(verdict="FAIL", stage="workload", summary="; ".join(errors))
        elif not_drained:
            k = not_drained[0]
            d = drains[k]
            why = ("requests still in flight" if (d.guest_inflight or d.backing_inflight)
                   else "; ".join(d.mismatches) or "no samples after the workload")
            self.record.update(verdict="HANG", stage="drain",
                               summary=f"{k} did not drain within {wd.drain_window:.0f}s: {why}")
            self.record["hang"] = {"disk": k, "cause": "never drained", **d.as_dict()}
        else:
            moved = all(tr.guest_pts and tr.guest_pts[-1].completed > tr.guest_pts[0].completed for tr in self.tracks)
            if not moved:
                self.record.update(verdict="FAIL", stage="workload", summary="no I/O completed on a test disk")
            else:
                self.record.update(verdict="PASS", stage="done", summary="all workloads finished, progressed and drained")

    @staticmethod
    def _workload_entry(w: scenario.WorkloadCfg, tr: Track, t_end: float) -> dict:
        during = [p for p in tr.backend_pts if p.t <= t_end]
        return {
            "guest": w.guest, "disk": w.disk, "tool": w.tool, "outstanding": w.iodepth * w.numjobs,
            "ring_capacity": tr.ring_capacity,
            "peak_inflight_guest": peak(p.inflight for p in tr.guest_pts),
            "peak_inflight_backing": peak(p.backing_inflight for p in tr.backend_pts),
            "longest_completion_gap_s": longest_gap(tr),
            # share of the workload's dom0 samples in which the backing device held at
            # least a full ring: did the backend's pool of requests stay exhausted?
            "backing_full_fraction": round(
                sum(p.backing_inflight >= tr.ring_capacity for p in during) / max(1, len(during)), 3),
            # the backend ran out of request structures: Linux's oo_req, FreeBSD's
            # request_shortages (None where the backend lacks the counter)
            **{k: (tr.backend_pts[-1].stats[k] - tr.backend_pts[0].stats[k])
               if tr.backend_pts and k in tr.backend_pts[0].stats else None
               for k in ("oo_req", "request_shortages")},
        }

    def _xbbd(self, tr: Track) -> dict:
        from lab.freebsd import xbbd_check

        with self.lock:
            samples = [(p.t, p.stats) for p in tr.backend_pts]
        return xbbd_check(samples, stall_window=self.sc.watchdog.stall_window)

    def _xbbd_hang(self) -> dict | None:
        """FreeBSD's own hang rule on top of the common one: responses queued for
        completion and never pushed (the 2014 fix's counter stuck non-zero)."""
        if self.sc.dom0.os != "freebsd":
            return None
        for tr in self.tracks:
            h = self._xbbd(tr)["hang"]
            if h and "reqs_queued_for_completion" in h["cause"]:
                return {"disk": tr.key, **h, "detected_at_s": round(h["detected_t"], 2),
                        "last_progress_at_s": round(h["since_t"], 2), "side_stopped_first": "backend"}
        return None

    def _xbbd_findings(self) -> list[str]:
        """FreeBSD: the xbbd rules' report per disk (which counters this kernel
        lacks, shortages) into the record; errors completed by the backend and
        in-flight above max_requests make the run FAIL."""
        if self.sc.dom0.os != "freebsd":
            return []
        out = []
        rep: dict = {}
        for tr in self.tracks:
            c = self._xbbd(tr)
            rep[tr.key] = {k: c[k] for k in ("samples", "missing", "shortages", "errors", "invariant_violations")}
            if c["missing"]:
                rep[tr.key]["note"] = ("this kernel lacks " + ", ".join(c["missing"])
                                       + " (older than the 2014 fix, or it reverted): rules ran without them")
            if c["errors"]:
                out.append(f"{tr.key}: blkback completed {c['errors']} request(s) with an error "
                           "(reqs_completed_with_error grew)")
            short = c["shortages"]["request_shortages"]
            if short and self.sc.freebsd.fail_on_request_shortages:
                out.append(f"{tr.key}: blkback ran out of request structures {short} time(s) "
                           "(request_shortages grew; [freebsd] fail_on_request_shortages)")
            if c["invariant_violations"]:
                v = c["invariant_violations"][0]
                out.append(f"{tr.key}: {len(c['invariant_violations'])} sample(s) with more requests in flight "
                           f"than max_requests (first at t={v['t']:.0f}s: {v['inflight']} > {v['max_requests']})")
        self.record["xbbd"] = rep
        return out

    def _verdict_hang(self, hang: dict | None, cause: str) -> None:
        self.record.update(verdict="HANG", stage=self.stage)
        now = time.monotonic() - self.t_workload
        self.record["workloads"] = [self._workload_entry(w, tr, now) for w, _g, tr in getattr(self, "_jobs", [])]
        hang = dict(hang or {"cause": cause})
        t = hang.get("last_progress_at_s")
        if self.injector is not None:
            # for an induced fault, detection latency counts from its recorded start
            f = self.injector.first_started(("stall", "pause-l1"))
            if f is not None and f.started_at is not None and "detected_at_s" in hang:
                hang["fault_started_at_s"] = round(f.started_at, 2)
                hang["detected_after_s"] = round(hang["detected_at_s"] - f.started_at, 2)
                hang["detected_after_from"] = f"fault {f.cfg.kind}"
        hang.setdefault("detected_after_from", "last progress")
        self.record["hang"] = hang
        self.record["summary"] = hang_summary(hang, cause, t)
        self.phases["fio"] = round(time.monotonic() - self.t_workload, 2)

    def _l1_unresponsive(self, now: float) -> dict | None:
        """"L1 unresponsive", decided from what a wedged host shows (no samples from
        any machine, dom0's SSH probe past its deadline, consoles silent, QEMU alive),
        never from QEMU's run state."""
        wd = self.sc.watchdog
        con = self.consoles["xen"]
        size = con.size()
        if size != self._console_size:
            self._console_size, self._console_moved_t = size, now
        last = max((s.last_t for s in self.samplers if s.last_t is not None), default=0.0)
        if now - last < wd.stall_window or now - self._last_probe_t < wd.stall_window:
            return None
        self._last_probe_t = now
        assert self.dom0 is not None
        probe = self.dom0.run(["true"], timeout=PROBE_SECONDS)
        if probe.ok:
            return None
        if not (self.vm and self.vm.alive()):
            return None  # a dead VM is a CRASH: _check_crash says so
        silent = now - self._console_moved_t
        cause = "L1 unresponsive"
        return {
            "cause": cause, "l1_unresponsive": True,
            "detected_at_s": round(time.monotonic() - self.t_workload, 2),
            "last_progress_at_s": round(last, 2),
            "detected_after_s": round(time.monotonic() - self.t_workload - last, 2),
            "evidence": f"no samples from dom0 or guests for {now - last:.0f}s; dom0's SSH probe got no answer "
                        f"within {PROBE_SECONDS:.0f}s; Xen console silent for {silent:.0f}s; QEMU process alive",
            "side_stopped_first": "both",
        }

    def _start_faults(self) -> None:
        from lab.faults import Injector

        assert self.dom0 is not None and self.vm is not None
        vm = self.vm
        self.injector = Injector(
            self.sc.faults, dom0=self.dom0,
            backing=lambda g, d: self.guests[g].backings[d],
            scripts=self.dom0_os, pause_l1=lambda: vm.qmp("stop"), resume_l1=lambda: vm.qmp("cont"),
            t0=self.t_workload,
        )
        self.cleanups.append(self.injector.release_all)
        self.injector.start()

    def _check_crash(self) -> bool:
        for name, con in self.consoles.items():
            found = console.find_crash(con.read_all())
            if found:
                self.record.update(verdict="CRASH", stage=self.stage,
                                   summary=f"{found[0]} on the {name} console: {found[1]}")
                return True
        if self.vm and not self.vm.alive():
            self.record.update(verdict="CRASH", stage=self.stage,
                               summary=f"QEMU (the Xen VM) exited with rc {self.vm.proc.returncode}")
            return True
        return False

    def _start_samplers(self) -> None:
        assert self.dom0 is not None
        iv = str(self.sc.watchdog.interval)
        t0 = self.t_workload
        disks = [(self.guests[tr.guest].vbds[tr.vdev], self.guests[tr.guest].backings[tr.vdev]) for tr in self.tracks]
        dom0_argv = self.dom0_os.sample_argv(iv, disks)
        parse = self.dom0_os.parse_sample

        def on_dom0(t: float, values: list[str | None]) -> None:
            for tr, st in zip(self.tracks, parse(values, len(self.tracks)), strict=True):
                if st is not None:
                    with self.lock:
                        tr.backend_pts.append(BackendPoint(t, st))

        long = 24 * 3600.0  # samplers end with the run; the channel closes then
        dom0 = self.dom0
        self.samplers.append(Sampler("dom0", lambda: dom0.stream(dom0_argv, timeout=long),
                                     on_dom0, t0, raw=self.results / "samples-dom0.jsonl"))
        for name, g in self.guests.items():
            mine = [tr for tr in self.tracks if tr.guest == name]
            if not mine or g.runner is None:
                continue
            paths = [p for tr in mine for p in [f"/sys/block/{tr.vdev}/stat"]]

            def on_guest(t: float, values: list[str | None], mine: list[Track] = mine) -> None:
                for tr, v in zip(mine, values, strict=False):
                    st = parse_block_stat(v)
                    if st is not None:
                        with self.lock:
                            tr.guest_pts.append(GuestPoint(t, st["completed"], st["inflight"], st["flushes"], st))

            runner = g.runner
            self.samplers.append(Sampler(name, lambda r=runner, p=paths: r.stream(["lab-sample", iv, *p], timeout=long),
                                         on_guest, t0, raw=self.results / f"samples-{name}.jsonl"))
        for s in self.samplers:
            s.start()

    # ------------------------------------------------------------ evidence, report
    def collect_evidence(self) -> None:
        """Best effort, each item with its own short deadline; L0's evidence first,
        because it never depends on L1 answering."""
        ev: dict[str, str] = {}
        edir = self.results / "evidence"
        edir.mkdir(exist_ok=True)
        if self.vm:
            (edir / "qemu-state.txt").write_text(
                f"pid {self.vm.pid} alive={self.vm.alive()} status={self.vm.status()}\n")
            ev["qemu_state"] = "evidence/qemu-state.txt"
        for name, con in self.consoles.items():
            (edir / f"tail-{name}.txt").write_text(con.tail(80) + "\n")
            ev[f"console_tail_{name}"] = f"evidence/tail-{name}.txt"
        items: list[tuple[str, object, list[str]]] = []
        dom0_os = getattr(self, "dom0_os", None)  # None: dom0 answered SSH but the run stopped before asking it
        if self._l1_answers() and dom0_os is not None:
            items += [(label, self.dom0, argv) for label, argv in dom0_os.evidence_commands()]
            for name, g in self.guests.items():
                if g.runner is not None and g.runner.alive():
                    items += [(f"{name}-inflight", g.runner, ["sh", "-c", "grep -H . /sys/block/*/inflight"]),
                              (f"{name}-diskstats", g.runner, ["cat", "/proc/diskstats"]),
                              (f"{name}-dmesg", g.runner, ["dmesg"])]
        elif dom0_os is None and self.dom0 is not None:
            ev["l1"] = "the run stopped before dom0 was set up: only L0 evidence was collected"
        else:
            ev["l1"] = "dom0 did not answer an SSH probe: only L0 evidence was collected"
        for label, runner, argv in items:
            res = runner.run(argv, timeout=10)  # type: ignore[attr-defined]
            (edir / f"{label}.txt").write_text(res.stdout + (f"\n[rc {res.rc}] {res.stderr}" if not res.ok else ""))
            ev[label] = f"evidence/{label}.txt"
        self.record["evidence"] = ev

    def _l1_answers(self) -> bool:
        """One short probe, remembered: evidence must not wait out every item's
        deadline on an L1 that stopped answering."""
        if self._l1_alive is None:
            self._l1_alive = bool(self.dom0 is not None and self.dom0.alive()
                                  and self.dom0.run(["true"], timeout=PROBE_SECONDS).ok)
        return self._l1_alive

    def fetch_guest_consoles(self) -> None:
        for name in self.guests:
            text = self._guest_console(name, n=2000) if self.dom0 else ""
            if text:
                path = self.results / f"console-{name}.log"
                path.write_text(text)
                self.consoles[name] = console.Console(path, f"guest {name}")

    def _finish_record(self, t_start: float) -> None:
        for s in self.samplers:
            s.stop()
        try:
            if self.interrupted:  # the user wants out: no evidence round trips
                raise _SkipEvidence()
            if self._l1_answers():
                self.fetch_guest_consoles()
            if self.record["verdict"] not in ("PASS",):
                if self.record["verdict"] != "CRASH":
                    self._check_crash()
                t = time.monotonic()
                self.collect_evidence()
                self.phases["evidence"] = round(time.monotonic() - t, 2)
        except _SkipEvidence:
            pass
        except Exception as e:  # evidence never changes the verdict
            log.warning("evidence collection failed: %s", e)
        if self.tracks:
            n = report.write_series(self.results / "counters.csv", self.tracks)
            self.record["series"] = {"file": "counters.csv", "rows": n,
                                     "interval_s": self.sc.watchdog.interval,
                                     "samplers": {s.name: {"lines": s.lines, "error": s.error} for s in self.samplers}}
            self.record["counters"] = {tr.vbd: report.counter_summary(tr) for tr in self.tracks}
        self.record["watchdog"] = scenario.to_dict(self.sc.watchdog)
        if self.injector is not None:
            self.record["faults"] = [r.as_dict() for r in self.injector.records]
        self.record["bisect_code"] = self._bisect_code()
        self.record["exit_code"] = report.EXIT_CODES[self.record["verdict"]]
        # the lab's own overhead: everything but L1 boot, guest boot and the workload itself
        ph = self.phases
        boot = self.record.get("boot", {}).get("dom0_ssh", 0)
        guest = sum(v for k, v in ph.items() if k.startswith(("xl_create_", "guest_ssh_")))
        wall = time.monotonic() - t_start
        self.record["overhead_s"] = round(wall - boot - guest - ph.get("fio", 0), 2)
        self.record["files"] = sorted(str(p.relative_to(self.results)) for p in self.results.rglob("*") if p.is_file())

    # ------------------------------------------------------------ teardown
    def run_cleanups(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:
                log.warning("cleanup %s failed: %s", fn, e)

    def teardown(self) -> None:
        # a second Ctrl-C must not cut teardown short and leak QEMU or overlays
        with _signals_deferred():
            self._teardown()

    def _teardown(self) -> None:
        self.run_cleanups()
        for s in self.samplers:
            s.stop()
        for g in self.guests.values():
            if g.runner:
                g.runner.close()
        if self.dom0:
            self.dom0.close()
        if self.vm:
            self.vm.stop()
        if getattr(self, "work", None) and self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        for d in self._socket_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _qmp_path(self) -> Path:
        """The QMP socket in the run's work directory, unless that path is too long
        for a Unix socket (108 bytes, a deep $LAB_CACHE): then in a short private
        directory under /tmp, removed with the run."""
        p = self.work / "qmp.sock"
        if len(os.fsencode(p)) < 100:
            return p
        d = Path(__import__("tempfile").mkdtemp(prefix="lab-qmp-", dir="/tmp"))
        self._socket_dirs.append(d)
        return d / "qmp.sock"

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "qemu_pid": self.vm.pid if self.vm else None, "results": str(self.results)}
        (self.work / "owner.json").write_text(json.dumps(owner))

    def _leave_running(self) -> None:
        """--keep: leave the failed lab up for `lab ssh`, and say how to end it."""
        self.run_cleanups()
        for s in self.samplers:
            s.stop()
        assert self.vm is not None
        info = {
            "qemu_pid": self.vm.pid, "ssh_port": self.vm.spec.ssh_port, "work": str(self.work),
            "socket_dirs": [str(d) for d in self._socket_dirs],
            "keys": str(self.keys.dir), "guests": {n: g.ip for n, g in self.guests.items()},
        }
        (self.results / "lab.json").write_text(json.dumps(info, indent=1) + "\n")
        self._write_owner()
        self.record["kept"] = info
        self.record["teardown_hint"] = f"lab down {self.results}"
