"""Guests: boot each from its kernel and initramfs (its whole root is in there, so
a guest never needs the backend under test to boot: a guest that does not come up
is the lab's failure, ERROR), or adopt those a restored L1 holds (warm start);
then, with the backend under test loaded, load each frontend with the
scenario's ring and queue limits, create fresh test disks in dom0 and attach
them (`xl block-attach`), and check in xenstore that each is a `vbd` served by
the dom0 kernel with the ring it negotiated. A test disk the backend refuses or
never connects is the backend's failure: `DiskFailure`, a FAIL."""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from lab import console, ringfront, scenario, ssh
from lab.boot import L1, Where, guest_files, guest_ip
from lab.errors import LabError
from lab.platform import Backing, GuestPlatform, Media
from lab.platforms import dom0_platform, guest_platform
from lab.timing import Background, Deadline, sh_poll
from lab.xen import (
    VDEV_DEVID,
    VbdInfo,
    Xl,
    negotiation_problems,
    parse_xenstore_ls,
    render_xl_cfg,
    split_trees,
    trees_script,
    vbd_info,
)

BOOT_MOUNT = "/run/lab/boot"
XENBUS_CONNECTED = "4"
XENBUS_GIVING_UP = {"5", "6"}  # Closing, Closed: a device being set up never passes through these
XENBUS_INITIALISING, XENBUS_INITWAIT = "1", "2"
CONNECT_WAIT_S = 10.0  # the attach's own wait for Connected; wait_connected's loop goes on after it


class DiskFailure(Exception):
    """The backend under test did not serve a test disk: an observation of the
    system under test (FAIL), not a lab failure."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


@dataclass
class Guest:
    cfg: scenario.GuestCfg
    ip: str
    domid: int
    runner: ssh.SshRunner
    os: GuestPlatform
    backings: dict[str, Backing] = field(default_factory=dict)
    vbds: dict[str, VbdInfo] = field(default_factory=dict)
    from_state: bool = False  # up in a restored L1 (warm start), not booted by this run
    blkfront: dict[str, str] = field(default_factory=dict)  # blkfront's parameters as loaded for the test disks
    frontend_loaded: bool = False  # load_frontend ran (this run's blkfront, with the scenario's limits)
    clock_pending: bool = False  # adopted from a saved state: its clock is set on load_frontend's round trip

    def as_record(self) -> dict[str, Any]:
        return {
            "domid": self.domid, "ip": self.ip, "root": "initramfs", "blkfront_params": self.blkfront,
            "booted": "restored with L1" if self.from_state else "cold",
            "vbds": {v: {**dataclasses.asdict(i), "ring_capacity": i.ring_capacity, "sysfs": i.sysfs_name,
                         "backing": dataclasses.asdict(self.backings[v])} for v, i in self.vbds.items()},
        }


def console_tail(l1: L1, name: str, n: int = 30) -> str:
    if not l1.dom0.alive():
        return ""
    return l1.dom0.run(["tail", "-n", str(n), f"/var/log/xen/console/guest-{name}.log"], timeout=10).stdout


def xl_configs(sc: scenario.Scenario, *, run_id: str) -> dict[str, str]:
    """Each guest's xl config, no disk in it (test disks are attached later)."""
    out = {}
    for g in sc.guests:
        gp = guest_platform(g.os)
        ip = guest_ip(sc, g.name)
        reboots = any(f.kind == "reboot" and f.guest == g.name for f in sc.faults)
        out[g.name] = render_xl_cfg(
            name=g.name, run_id=run_id, kernel=f"{BOOT_MOUNT}/{g.name}-vmlinuz",
            ramdisk=f"{BOOT_MOUNT}/{g.name}-initrd", cmdline=gp.cmdline(g, ip=ip, rebooted=reboots),
            memory_mib=g.memory.mib, vcpus=g.vcpus, disks=[],
            mac=f"00:16:3e:00:00:{int(ip.rsplit('.', 1)[1]):02x}", restart_on_reboot=reboots,
            vif_script=dom0_platform(sc.dom0.os).vif_script,
        )
    return out


def state_inputs(sc: scenario.Scenario, media: Media) -> list[dict[str, Any]]:
    """What a saved L1 holding these guests depends on (lab/l1state.py hashes the
    files): each guest's kernel, initrd and xl config (its command line, memory,
    vCPUs, MAC, what a reboot does). Not the ring or queue limits, nor the test
    disks: those are applied after a restore, exactly as after a cold boot."""
    cfgs = xl_configs(sc, run_id="(saved with L1)")
    out = []
    for g in sc.guests:
        kernel, initrd = guest_files(sc, media, g)
        out.append({"name": g.name, "kernel": kernel, "initrd": initrd, "xl_cfg": cfgs[g.name]})
    return out


def boot_all(sc: scenario.Scenario, l1: L1, media: Media, where: Where, *, phases: dict[str, float],
             progress: list[str], deadline: Deadline) -> list[Guest]:
    """Boot every guest from its kernel and initramfs, no disk attached, and wait
    for its SSH."""
    progress[0] = "guest:create"
    dl = sc.deadlines
    xl = Xl(l1.dom0, timeout=dl.command)
    t = time.monotonic()
    l1.ops.mount_boot_disk("lab-boot", BOOT_MOUNT)
    phases["mount_boot_disk"] = round(time.monotonic() - t, 2)
    booted: list[tuple[scenario.GuestCfg, int]] = []
    cfgs = xl_configs(sc, run_id=where.results.name)
    for g in sc.guests:
        cfg = cfgs[g.name]
        (where.results / f"xl-{g.name}.cfg").write_text(cfg)
        path = f"/run/lab/{g.name}.cfg"
        l1.dom0.run(["sh", "-c", f"cat > {path}"], timeout=dl.command, input=cfg).check("guest:create")
        t = time.monotonic()
        # -p then unpause: xenconsoled is already logging when the guest's first line comes
        xl.create_paused(path, timeout=dl.guest_create)
        domid = xl.domid(g.name)
        xl.unpause(g.name)
        phases[f"xl_create_{g.name}"] = round(time.monotonic() - t, 2)
        booted.append((g, domid))
    progress[0] = "guest:boot"
    guests = []
    for g, domid in booted:
        t = time.monotonic()
        runner = _connect(sc, l1, media, where, g, domid, deadline)
        phases[f"guest_ssh_{g.name}"] = round(time.monotonic() - t, 2)
        guests.append(Guest(g, guest_ip(sc, g.name), domid, runner, guest_platform(g.os)))
    return guests


def adopt(sc: scenario.Scenario, l1: L1, media: Media, where: Where, *, phases: dict[str, float],
          progress: list[str], deadline: Deadline) -> list[Guest]:
    """The guests a restored L1 holds (lab/l1state.py): each still running under
    its name, with no disk of any kind, and reached over a new SSH session (TCP
    state did not survive the save). Anything else means the state is not what
    its key says: the lab's failure (ERROR), and the caller drops the state.
    Each guest's clock stood still while saved: load_frontend, the next step,
    sets it from L0's on its own round trip."""
    progress[0] = "guest:restore"
    dl = sc.deadlines
    cfgs = xl_configs(sc, run_id="(saved with L1)")  # what the state's key says they were created with
    guests = []
    for g in sc.guests:
        # one round trip: its domain id, then any vbd node dom0 holds for it
        res = l1.dom0.run(["sh", "-c", f"d=$(xl domid {shlex.quote(g.name)}) && echo \"domid=$d\" && "
                           "xenstore-ls -f /local/domain/0/backend/vbd/$d 2>/dev/null; true"], timeout=dl.command)
        res.check("guest:restore")
        m = re.match(r"domid=(\d+)\n", res.stdout)
        if m is None:
            raise LabError("guest:restore", f"guest {g.name} is not in the restored L1 "
                           f"({(res.stdout.strip() or res.stderr.strip())[-200:]!r})")
        domid = int(m.group(1))
        vbds = parse_xenstore_ls(res.stdout[m.end():])
        if vbds:
            raise LabError("guest:restore", f"guest {g.name} (domain {domid}) has a disk in the restored L1: "
                           f"{sorted(vbds)[:3]}; a saved state must hold none")
        t = time.monotonic()
        runner = _connect(sc, l1, media, where, g, domid, deadline)
        phases[f"guest_ssh_{g.name}"] = round(time.monotonic() - t, 2)
        (where.results / f"xl-{g.name}.cfg").write_text(cfgs[g.name])
        guests.append(Guest(g, guest_ip(sc, g.name), domid, runner, guest_platform(g.os), from_state=True,
                            clock_pending=True))
    return guests


def reconnect(sc: scenario.Scenario, guests: list[Guest], *, deadline: Deadline) -> None:
    """L1 went on in a new QEMU process (the libvirt driver's save, lab/l0.py):
    each guest's SSH session died with the old one's network. A new one through
    dom0's (reconnected already), and the guest's clock set from L0's: it stood
    still while L1 was saved and restored."""
    for gu in guests:
        gu.runner.reconnect(deadline.slice(sc.deadlines.guest_ssh), stage="boot:save")
        gu.runner.run(gu.os.set_clock_argv(int(time.time())), timeout=sc.deadlines.command).check("boot:save")


def attach_all(sc: scenario.Scenario, l1: L1, guests: list[Guest], where: Where, *, progress: list[str],
               deadline: Deadline, prepared: dict[str, Backing] | None = None) -> None:
    """Fresh test disks for every guest, the backend under test already loaded:
    each guest's blkfront reloaded (unless load_frontends did it already), then
    each disk's backing device made (unless `prepared` holds it, made after the
    backend loaded: lab/pipeline.py overlaps that with the guests' steps),
    attached and Connected."""
    progress[0] = "guest:attach"
    xl = Xl(l1.dom0, timeout=sc.deadlines.command)
    for gu in guests:
        if not gu.frontend_loaded:
            load_frontend(sc, gu)
        for d in gu.cfg.disks:
            name = backing_name(gu.cfg.name, d.vdev)
            gu.backings[d.vdev] = (prepared or {}).get(name) or l1.ops.backing_by_serial(name)
            attach_one(sc, l1, gu, xl, where, d.vdev, deadline.slice(sc.deadlines.guest_create))


def backing_name(guest: str, vdev: str) -> str:
    """A test disk's name: QEMU's serial for it and the dm device dom0 makes on it."""
    return f"lab-{guest}-{vdev}"


def make_backings(sc: scenario.Scenario, l1: L1) -> dict[str, Backing]:
    """Every test disk's backing device, by backing_name (dom0 only: no guest
    is touched, so it may run beside the guests' own steps)."""
    return {name: l1.ops.backing_by_serial(name)
            for g in sc.guests for d in g.disks for name in [backing_name(g.name, d.vdev)]}


def load_frontends(sc: scenario.Scenario, guests: list[Guest]) -> None:
    for gu in guests:
        load_frontend(sc, gu)


def load_frontend(sc: scenario.Scenario, gu: Guest) -> None:
    """Reload the guest's blkfront with the scenario's limits (no disk uses it
    yet) and check it took them; one round trip, which first sets the clock of
    a guest adopted from a saved state (a round trip costs 0.3-0.5 s under TCG)."""
    gp = gu.os
    argv = gp.frontend_argv(gu.cfg)
    if gu.clock_pending:
        argv = after_clock(gp.set_clock_argv(int(time.time())), argv)
    res = gu.runner.run(argv, timeout=sc.deadlines.command)
    if res.rc == CLOCK_FAILED:
        raise LabError("guest:restore", f"guest {gu.cfg.name}: could not set its clock: {_last_line(res.stderr)}")
    have = gp.parse_blkfront_params(res.check("guest:attach").stdout)
    gu.clock_pending = False
    gu.blkfront = have
    gu.frontend_loaded = True
    wrong = {k: (v, have.get(k)) for k, v in gp.frontend_params(gu.cfg).items() if have.get(k) != v}
    if wrong:
        raise LabError("guest:attach", f"guest {gu.cfg.name}'s blkfront did not take the scenario's limits "
                       f"(wanted, loaded): {wrong}")


CLOCK_FAILED = 90  # after_clock's rc when the clock could not be set


def after_clock(clock: list[str], then: list[str]) -> list[str]:
    """One command: `clock` (its output dropped), then `then` in its place,
    whose rc and output are the command's; CLOCK_FAILED if `clock` failed."""
    return ["sh", "-c", f"{shlex.join(clock)} >/dev/null || exit {CLOCK_FAILED}; exec {shlex.join(then)}"]


def _connect(sc: scenario.Scenario, l1: L1, media: Media, where: Where, g: scenario.GuestCfg,
             domid: int, deadline: Deadline) -> ssh.SshRunner:
    keys = media.keys
    runner = ssh.SshRunner(
        g.name, host_key=ssh.load_pinned_key(Path(str(keys.host("guest")) + ".pub")),
        client_key=paramiko.Ed25519Key.from_private_key_file(str(keys.client)),
        log_=where.cmdlog, connect=ssh.via(l1.dom0, guest_ip(sc, g.name)),
    )

    def abort() -> None:
        """A guest console that shows it will never answer ends the wait at once."""
        text = console_tail(l1, g.name, 60).encode()
        fatal = console.LAB_FATAL.search(text) or console.GUEST_TOO_SMALL.search(text)
        crash = console.find_crash(text)
        if fatal or crash:
            why = fatal.group(0).decode(errors="replace") if fatal else f"{crash[0]}: {crash[1]}"  # type: ignore[index]
            raise LabError("guest:boot", f"guest {g.name} will not come up: {why}", tail=text.decode(errors="replace"))
        if l1.dom0.run(["xl", "domid", g.name], timeout=sc.deadlines.command).rc != 0:
            raise LabError("guest:boot", f"guest {g.name} (domain {domid}) is gone", tail=text.decode(errors="replace"))

    try:
        runner.connect(deadline.slice(sc.deadlines.guest_ssh), stage="guest:boot", abort=_every(3.0, abort))
    except LabError as e:
        e.tail = e.tail or console_tail(l1, g.name)
        raise
    return runner


def _every(seconds: float, fn: Any) -> Any:
    """Call `fn` at most once per `seconds` (each call costs dom0 round trips)."""
    last = [0.0]

    def call() -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            fn()

    return call


def attach_one(sc: scenario.Scenario, l1: L1, gu: Guest, xl: Xl, where: Where, vdev: str,
               deadline: Deadline) -> VbdInfo:
    """`xl block-attach` of one test disk on its backing device, then both ends
    Connected: the first time, and again after each detach of a churn. A disk
    the userspace frontend drives is attached with blkfront kept off instead."""
    if ringfront.drives(sc.workloads, gu.cfg.name, vdev):
        gu.vbds[vdev] = attach_unbound(sc, l1, gu, xl, where, vdev, deadline)
        return gu.vbds[vdev]
    # the guest waits for its block device beside dom0's attach (one round trip each)
    present = Background("guest:attach", lambda: gu.runner.run(
        gu.os.disk_present_argv(vdev, wait_s=CONNECT_WAIT_S), timeout=CONNECT_WAIT_S + 10).ok, beside="the attach")
    trees = _block_attach(l1, gu, xl, vdev, deadline, then_connected=True)
    gu.vbds[vdev] = wait_connected(sc, gu, xl, vdev, where, deadline, first=trees, present=present)
    check_negotiated(gu, vdev, gu.cfg)
    return gu.vbds[vdev]


def attach_unbound(sc: scenario.Scenario, l1: L1, gu: Guest, xl: Xl, where: Where, vdev: str,
                   deadline: Deadline) -> VbdInfo:
    """A test disk for the userspace frontend (tool = "ring", lab/ringfront.py):
    the guest's driver autoprobe is off while `xl block-attach` adds it, so no
    driver binds the new vbd: the backend waits in InitWait (2) and the
    frontend node stays Initialising (1) until blkring connects. Autoprobe is
    back on afterwards whatever happened (it holds for every Xen device of the
    guest). If the kernel's blkfront took the disk anyway, the run stops here
    with a lab failure (ERROR): it would otherwise test the wrong frontend."""
    gp, dl, name = gu.os, sc.deadlines, gu.cfg.name
    devid = VDEV_DEVID[vdev]
    missing = gu.runner.run(gp.userspace_frontend_argv(), timeout=dl.command).check("guest:attach").stdout
    if missing.strip():
        raise LabError("guest:attach", f"guest {name} cannot run the userspace frontend on {vdev}: "
                       + "; ".join(ln.strip() for ln in missing.splitlines() if ln.strip()))
    gu.runner.run(gp.autoprobe_argv(False), timeout=dl.command).check("guest:attach")
    try:
        _block_attach(l1, gu, xl, vdev, deadline)
        info = wait_unbound(sc, gu, xl, vdev, where, deadline)
    finally:
        restored = gu.runner.run(gp.autoprobe_argv(True), timeout=dl.command)
    restored.check("guest:attach")
    binding = gp.parse_vbd_binding(gu.runner.run(gp.vbd_binding_argv(devid), timeout=dl.command).stdout)
    if binding != "unbound":
        raise LabError("guest:attach", _refusal(name, vdev, f"vbd-{devid} is {binding or 'unreadable'} "
                                                 "once driver autoprobe was back on"))
    return info


def _refusal(guest: str, vdev: str, why: str) -> str:
    return (f"guest {guest}'s kernel took test disk {vdev} meant for the userspace frontend ({why}): the lab "
            "refuses to run the ring workload against the kernel's blkfront in its place")


def wait_unbound(sc: scenario.Scenario, gu: Guest, xl: Xl, vdev: str, where: Where,
                 deadline: Deadline) -> VbdInfo:
    """The backend in InitWait (2), the frontend node Initialising (1) and the
    guest's vbd there with no driver, within the deadline. A frontend that
    moved on, or a driver bound, is the kernel's blkfront: refused (LabError);
    a backend that never gets to InitWait is the backend's FAIL."""
    devid = VDEV_DEVID[vdev]
    while True:
        raw, info, last = _vbd_now(gu, xl, vdev)

        def keep(raw: str = raw) -> None:
            (where.results / f"xenstore-{gu.cfg.name}.txt").write_text(raw)

        if info is not None:
            if info.state_frontend not in ("", XENBUS_INITIALISING) or info.state_backend in ("3", XENBUS_CONNECTED):
                keep()
                raise LabError("guest:attach", _refusal(gu.cfg.name, vdev, f"{last}: a frontend connected it"))
            if info.state_backend in XENBUS_GIVING_UP:
                keep()
                raise DiskFailure("guest:attach", f"test disk {gu.cfg.name}/{vdev} was closed before the userspace "
                                  f"frontend could connect ({last})")
            if info.state_backend == XENBUS_INITWAIT and info.state_frontend == XENBUS_INITIALISING:
                res = gu.runner.run(gu.os.vbd_binding_argv(devid), timeout=10)
                binding = gu.os.parse_vbd_binding(res.stdout)
                if binding == "bound":
                    keep()
                    raise LabError("guest:attach", _refusal(gu.cfg.name, vdev, f"vbd-{devid} has a driver"))
                if binding == "unbound":
                    keep()
                    return info
                last += f"; the guest's vbd-{devid} is {binding or 'unreadable'}"
        if deadline.expired():
            keep()
            if info is None and "qdisk" in last:
                raise LabError("guest:attach", last)  # the lab's configuration, not the backend
            raise DiskFailure("guest:attach", f"test disk {gu.cfg.name}/{vdev} never reached InitWait with "
                              f"no driver within {deadline.seconds:.0f}s: {last}")
        time.sleep(0.5)


def _block_attach(l1: L1, gu: Guest, xl: Xl, vdev: str, deadline: Deadline, *,
                  then_connected: bool = False) -> list[str] | None:
    """`xl block-attach` of a test disk on its backing device: the lab losing dom0
    is ERROR, the toolstack refusing it is the backend's FAIL. With
    `then_connected`, on the same round trip dom0 waits (at most
    CONNECT_WAIT_S) for both ends to be Connected or giving up, then prints
    both xenstore trees for wait_connected (returned, as xenstore_trees)."""
    script = f"script={l1.ops.block_script}, " if l1.ops.block_script else ""
    spec = f"format=raw, vdev={vdev}, access=rw, {script}target={gu.backings[vdev].path}"  # target= comes last
    argv = ["xl", "block-attach", gu.cfg.name, spec]
    if then_connected:
        devid = VDEV_DEVID[vdev]
        argv = ["sh", "-c", f"{shlex.join(argv)} || exit $?; "
                + until_settled(f"/local/domain/0/backend/vbd/{gu.domid}/{devid}/state",
                                f"/local/domain/{gu.domid}/device/vbd/{devid}/state", CONNECT_WAIT_S) + "; "
                + trees_script("/local/domain/0/backend", f"/local/domain/{gu.domid}/device/vbd") + "; true"]
    res = l1.dom0.run(argv, timeout=max(1.0, deadline.remaining()))
    if res.transport_error:
        res.check("guest:attach")  # the lab lost dom0: ERROR
    if not res.ok:
        be = xl.xenstore_raw(f"/local/domain/0/backend/vbd/{gu.domid}")
        raise DiskFailure("guest:attach", f"`xl block-attach {gu.cfg.name} {vdev}` failed "
                          f"(rc {res.rc}): {_last_line(res.stderr)}; backend: {_states(be)}")
    return split_trees(res.stdout, 2) if then_connected else None


def until_settled(be_state: str, fe_state: str, seconds: float) -> str:
    """sh: poll both xenbus state nodes at most `seconds`, until both read
    Connected or either reads Closing/Closed."""
    giving_up = "|".join(f"{s}:*|*:{s}" for s in sorted(XENBUS_GIVING_UP))
    return sh_poll(f"s=\"$(xenstore-read {shlex.quote(be_state)} 2>/dev/null):"
                   f"$(xenstore-read {shlex.quote(fe_state)} 2>/dev/null)\"; "
                   f"case \"$s\" in {XENBUS_CONNECTED}:{XENBUS_CONNECTED}|{giving_up}) true;; *) false;; esac",
                   seconds, "break")


def _vbd_now(gu: Guest, xl: Xl, vdev: str, trees: list[str] | None = None) -> tuple[str, VbdInfo | None, str]:
    """Both xenstore trees as read now (or as `trees` read them), kept as
    evidence, the disk's VbdInfo if it is there, and a line saying where it
    stands."""
    # one round trip; the backend tree of every kind: a qdisk would be seen too
    be_raw, fe_raw = trees or xl.xenstore_trees("/local/domain/0/backend", f"/local/domain/{gu.domid}/device/vbd")
    try:
        info = vbd_info(gu.domid, vdev, parse_xenstore_ls(be_raw), parse_xenstore_ls(fe_raw))
    except LabError as e:
        return be_raw + "\n" + fe_raw, None, e.message
    return (be_raw + "\n" + fe_raw, info,
            f"backend state {info.state_backend or '?'}, frontend state {info.state_frontend or '?'}")


def check_negotiated(gu: Guest, vdev: str, want: scenario.GuestCfg) -> None:
    """The connected disk negotiated what its frontend's limits and the backend's
    offer allow (a backend that keeps a stale ring size or persistent grants the
    frontend refused fails here)."""
    bad = negotiation_problems(want, gu.vbds[vdev], gu.cfg.vcpus)
    if bad:
        raise DiskFailure("guest:attach", f"test disk {gu.cfg.name}/{vdev} connected with "
                          + "; ".join(bad))


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _states(xenstore: str) -> str:
    found = re.findall(r"/(\d+)/state = \"(\d)\"", xenstore)
    return ", ".join(f"devid {d} state {s}" for d, s in found) or "no vbd in xenstore"


def wait_connected(sc: scenario.Scenario, gu: Guest, xl: Xl, vdev: str, where: Where,
                   deadline: Deadline, *, first: list[str] | None = None,
                   present: Background | None = None) -> VbdInfo:
    """Both ends Connected (xenbus state 4) and the disk present in the guest, within
    the guest-create deadline; a disk that never gets there is the backend's FAIL.
    `first`: xenstore's trees as already read (the attach's round trip);
    `present`: the guest's wait for the disk, already under way."""
    while True:
        raw, info, last = _vbd_now(gu, xl, vdev, first)
        first = None
        if info is not None:
            if {info.state_backend, info.state_frontend} & XENBUS_GIVING_UP:
                (where.results / f"xenstore-{gu.cfg.name}.txt").write_text(raw)
                err = xl.xenstore_raw("/local/domain/0/error")
                why = "; ".join(v for k, v in parse_xenstore_ls(err).items() if k.endswith("/error")) or "no error node"
                raise DiskFailure("guest:attach", f"test disk {gu.cfg.name}/{vdev} was closed before it connected "
                                  f"({last}; backend's error: {why})")
            waited, present = present, None
            if (info.state_backend == info.state_frontend == XENBUS_CONNECTED
                    and ((waited is not None and waited.result(deadline))
                         or gu.runner.run(gu.os.disk_present_argv(vdev), timeout=10).ok)):
                (where.results / f"xenstore-{gu.cfg.name}.txt").write_text(raw)
                return info
        if deadline.expired():
            (where.results / f"xenstore-{gu.cfg.name}.txt").write_text(raw)
            if info is None and "qdisk" in last:
                raise LabError("guest:attach", last)  # the lab's configuration, not the backend
            raise DiskFailure("guest:attach", f"test disk {gu.cfg.name}/{vdev} never connected within "
                              f"{deadline.seconds:.0f}s: {last}")
        time.sleep(0.5)
