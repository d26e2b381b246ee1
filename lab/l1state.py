"""Warm start: save a freshly booted Xen VM (L1) once, restore it for later runs.

Under TCG a cold boot to dom0 SSH costs about 28 s, a restore about 3 s
(facts/l1-snapshot.md); the scenario's guests are saved with it (their `xl
create` and SSH cost another 20-25 s). A saved state is only valid for exactly
the QEMU build, command line, kernels, images and disk layout it was taken with,
and for the guests it holds (kernel, initrd, xl config: command line, memory,
vCPUs), so its key hashes all of them; any change means a cold boot and a new
state. What a run tests is never in it: the backend under test is loaded, the
guests' blkfront reloaded with the scenario's ring and queues, and the test
disks made and attached after the restore, exactly as after a cold boot. The
guests' SSH sessions at save time are not reused (TCP does not survive a
restore): a restored run opens new ones and sets the guests' clocks.

Disks: the cold boot's writable disks are created inside the state's directory.
At the save point (dom0 ready and the scenario's guests booted and answering
SSH, with no disk served by the backend under test) QEMU is stopped, every
writable disk is switched to a new per-run overlay (blockdev-snapshot-sync), and
the RAM and device state go to a file. From then on the state's disks are never
written: the cold run writes its overlays, and every restore gets fresh overlays
on top of the frozen disks. The read-only disk with the guests' kernels
(boot.img) lives in the state too: dom0 has it mounted when saved.

A state is built aside (lab/cache.py: `.KEY.building-PID-TOKEN`) and renamed
into place only when the run that took it reached a decision (PASS, FAIL or
HANG): an interrupted save, a failed boot or a run the lab could not finish
never leaves a state a later run loads. It takes no lock: the build is a whole
run; two runs that race for one key each build, the first promotion wins."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lab import cache, images, qemu
from lab.errors import LabError
from lab.timing import Deadline, wait_until

log = logging.getLogger("lab.l1state")
STATE_FORMAT = "2"  # bump when the layout of a state directory changes (2: guests and boot.img inside)
PROMOTE_ON = ("PASS", "FAIL", "HANG")


@dataclass(frozen=True)
class Slot:
    """One writable disk of L1: an overlay on a base image, or a fresh empty disk."""

    name: str  # file stem
    serial: str
    base: Path | None = None
    size: int = 0
    base_fmt: str = "raw"  # the lab's Debian images are raw; a FreeBSD dom0 image is qcow2


def states_dir() -> Path:
    return images.cache_dir() / "l1-states"


def _file_id(p: Path) -> str:
    """Content hash of a kernel/initrd/Xen, memoised on (path, size, mtime)."""
    st = p.stat()
    memo = images.cache_dir() / "hash-memo.json"
    k = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if k not in known:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        known[k] = h.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        # aside under a unique name (runs and threads race for the memo), then renamed:
        # a reader sees the old memo or the new one, never half of one. A lost
        # update only costs a hash later.
        tmp = cache.aside(memo)
        try:
            tmp.write_text(json.dumps(known))
            tmp.replace(memo)
        finally:
            tmp.unlink(missing_ok=True)
    return known[k]


def save_uri(path: Path) -> str:
    """The QMP `migrate` URI that writes L1's state to `path`. QEMU runs an exec:
    URI with `/bin/sh -c`, so the path is quoted: a space or a `$` in LAB_CACHE or
    HOME is part of the name, never a word break or an expansion. (An fd: URI
    would avoid the shell, but it needs the descriptor passed with SCM_RIGHTS on
    the QMP connection that then migrates; the lab's QMP client opens one
    connection per command.)"""
    return f"exec:cat > {shlex.quote(str(path))}"


def load_uri(path: Path) -> str:
    """`-incoming`'s URI that reads the state saved at `path` (quoted as save_uri)."""
    return f"exec:cat {shlex.quote(str(path))}"


def key_inputs(spec: qemu.VmSpec, slots: list[Slot], guests: list[dict] | None = None,
               driver: dict | None = None) -> dict:
    """Everything that must match for a state to load and be correct. `guests`:
    the guests saved with L1, each {"name", "kernel", "initrd" (paths, hashed
    here), "xl_cfg" (text)} (lab/guests.py: state_inputs). `driver`: what the L0
    driver adds (lab/l0.py `key_inputs`): a libvirt save image is not a QEMU
    migration stream, so the two drivers never share a state. The qemu driver
    adds nothing, so its keys stay what they were before there was a choice."""
    canon = dataclasses.replace(
        spec,
        drives=[dataclasses.replace(d, path=Path(f"<{d.serial}>")) for d in spec.drives],
        ssh_port=0, console_log=Path("<console>"), qmp_sock=Path("<qmp>"),
        modules=[(Path(f"<module{i}>"), args) for i, (_, args) in enumerate(spec.modules)],
        xen=Path("<xen>"), extra=[],
    )
    qbin = shutil.which(qemu.QEMU) or qemu.QEMU
    return {
        "format": STATE_FORMAT,
        "qemu_version": qemu.qemu_version(),
        "qemu_binary": _file_id(Path(qbin)),
        "argv": qemu.build_argv(canon),
        "xen": _file_id(spec.xen) if spec.xen is not None else None,
        "modules": [_file_id(p) for p, _ in spec.modules],
        "slots": [
            {"serial": s.serial, "size": s.size,
             "base": None if s.base is None else
             f"{s.base.parent.name}/{s.base.name}|{s.base.stat().st_size}|{s.base.stat().st_mtime_ns}"}
            for s in slots
        ],
        "guests": [{"name": g["name"], "kernel": _file_id(Path(g["kernel"])), "initrd": _file_id(Path(g["initrd"])),
                    "xl_cfg": g["xl_cfg"]} for g in guests or []],
        **(driver or {}),
    }


def state_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class State:
    key: str
    dir: Path

    @property
    def file(self) -> Path:
        return self.dir / "l1.state"

    def disk(self, slot: Slot) -> Path:
        return self.dir / f"{slot.name}.qcow2"

    @property
    def boot_disk(self) -> Path:
        """The read-only disk with the guests' kernels: dom0 has it mounted in the
        saved state, so a restore must give it these very bytes (mkfs is not
        reproducible: a new one would differ under dom0's cached metadata)."""
        return self.dir / "boot.img"

    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())


def find(key: str) -> State | None:
    d = states_dir() / key
    if (d / "meta.json").exists() and (d / "l1.state").exists():
        return State(key, d)
    return None


def begin(key: str) -> State:
    """A directory to build a new state in (renamed into place by `promote`)."""
    root = states_dir()
    root.mkdir(parents=True, exist_ok=True)
    cache.sweep(root)  # left by runs killed hard
    d = cache.aside(root / key)
    d.mkdir()
    return State(key, d)


def create_disks(where: State | Path, slots: list[Slot]) -> list[Path]:
    """Cold boot: the writable disks themselves (in the state being built, or in
    the run's work directory when no state is taken)."""
    out = []
    for s in slots:
        p = where.disk(s) if isinstance(where, State) else where / f"{s.name}.qcow2"
        if s.base is not None:
            qemu.create_overlay(s.base, p, base_fmt=s.base_fmt)
        else:
            qemu.create_disk(p, s.size)
        out.append(p)
    return out


def restore_overlays(state: State, slots: list[Slot], work: Path) -> list[Path]:
    out = []
    for s in slots:
        p = work / f"{s.name}.qcow2"
        qemu.create_overlay(state.disk(s), p, base_fmt="qcow2")
        out.append(p)
    return out


def save(vm: qemu.Vm, state: State, slots: list[Slot], work: Path, *, inputs: dict, timeout: float = 120) -> float:
    """Stop the VM, move its writable disks onto per-run overlays, write its RAM
    and device state, let it run on. Returns the seconds the VM was stopped."""
    t = time.monotonic()
    vm.qmp("stop")
    try:
        for i, s in enumerate(slots):
            vm.qmp("blockdev-snapshot-sync", device=f"d{i}",
                   **{"snapshot-file": str(work / f"{s.name}.qcow2"), "format": "qcow2"})
        vm.qmp("migrate", uri=save_uri(state.file))

        def done() -> bool | None:
            st = vm.qmp("query-migrate")
            status = st.get("status") if isinstance(st, dict) else None
            if status == "failed":
                raise LabError("boot:save", f"saving the L1 state failed: {st}")
            return status == "completed" or None

        wait_until(done, Deadline(timeout), stage="boot:save", what="the L1 state to be written", interval=0.1)
    finally:
        vm.qmp("cont")
    seal(state, slots, inputs=inputs)
    return time.monotonic() - t


def seal(state: State, slots: list[Slot], *, inputs: dict) -> None:
    """The state saved, whatever the driver: its files read-only and root's, and
    meta.json, which makes it a state `promote` may keep."""
    for s in slots:
        state.disk(s).chmod(0o400)
    if state.boot_disk.exists():
        state.boot_disk.chmod(0o400)
    # root only: the RAM image holds dom0's memory, its SSH host key included
    state.file.chmod(0o400)
    (state.dir / "meta.json").write_text(json.dumps({
        "key": state.key, "created": time.time(), "inputs": inputs,
        "slots": [dataclasses.asdict(s) | {"base": str(s.base) if s.base else None} for s in slots],
    }, indent=1, default=str))


def promote(state: State, verdict: str) -> State | None:
    """Keep the state only if the run that took it reached a decision (and got as
    far as saving it)."""
    if verdict not in PROMOTE_ON or not (state.dir / "meta.json").exists():
        shutil.rmtree(state.dir, ignore_errors=True)
        return None
    # if another run saved the same key first, its state is kept and ours dropped
    return State(state.key, cache.promote(state.dir, states_dir() / state.key))


def wait_restored(vm: qemu.Vm, timeout: float) -> float:
    """After `-incoming`: wait for the migration to land (the VM comes up paused,
    as it was saved), then `cont`. SSH must not be tried before this: QEMU's user
    network would queue the SYNs and dom0's sshd saw a SYN flood (facts)."""
    t = time.monotonic()

    def landed() -> bool | None:
        if not vm.alive():
            raise LabError("boot:restore", "QEMU exited while loading the saved L1 state", tail=vm.stderr_tail())
        try:
            st = vm.qmp("query-status")
        except (OSError, RuntimeError, ConnectionError):
            return None
        status = st.get("status") if isinstance(st, dict) else None
        return status in ("paused", "postmigrate", "running") or None

    wait_until(landed, Deadline(timeout), stage="boot:restore", what="the saved L1 state to load", interval=0.1)
    vm.qmp("cont")
    return time.monotonic() - t


def list_states() -> list[dict]:
    out = []
    root = states_dir()
    for d in sorted(root.glob("*")) if root.exists() else []:
        if d.name.startswith(".") or not (d / "meta.json").exists():
            continue
        meta = json.loads((d / "meta.json").read_text())
        size = sum(f.stat().st_blocks * 512 for f in d.iterdir())
        out.append({"key": d.name, "dir": str(d), "bytes": size, "created": meta.get("created"),
                    "driver": meta.get("inputs", {}).get("driver", "qemu"),
                    "xen_cmdline": (meta.get("inputs", {}).get("argv") or [])})
    return out


def is_state_key(key: str) -> bool:
    """What `state_key` makes: 20 lower-case hex digits. Never a path (`../x`,
    `/abs`, `.`, ``): a key names one directory inside the state store."""
    return re.fullmatch(r"[0-9a-f]{20}", key) is not None


def remove(key: str) -> bool:
    """Delete the saved state `key`; False if there is none. Refuses anything that
    is not a state key, and a state directory that is a symlink out of the store."""
    if not is_state_key(key):
        raise LabError("states", f"{key!r} is not a state key (20 hex digits, as `lab states list` shows): "
                       "nothing deleted")
    d = states_dir() / key
    if d.is_symlink():
        raise LabError("states", f"{d} is a symlink, not a state the lab saved: nothing deleted")
    if d.is_dir():
        shutil.rmtree(d)
        return True
    return False
