"""Lifecycle operations as faults (`[[faults]]` kinds detach-attach, destroy,
save-restore and reboot): the toolstack disconnecting and reconnecting the
backend while a run is on, where blkback's teardown and connect paths are
exercised. Each returns an `Outcome` (lab/faults.py) that lab/decide.py judges:
the operation completed within its deadline, nothing of the old connection
survived (xenstore nodes, ring threads, the backing device held open, a domain
Xen still holds), and, for a disk that comes back, it connects again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lab import scenario
from lab.boot import L1, Where
from lab.errors import LabError
from lab.faults import Outcome
from lab.guests import DiskFailure, Guest, attach_one, check_negotiated, wait_connected
from lab.runner import Runner
from lab.scenario import FaultCfg
from lab.teardown import GONE_SECONDS, STEP_SECONDS, _dying, _gone
from lab.timing import Deadline
from lab.xen import VDEV_DEVID, Xl

log = logging.getLogger("lab.lifecycle")


class Lifecycle:
    """Carries out lifecycle faults for one run (called from the fault injector's
    thread). `gone` names the guests a fault destroyed: the run stops judging
    their workloads, samplers and disks from then on."""

    def __init__(self, sc: scenario.Scenario, l1: L1, guests: dict[str, Guest], where: Where) -> None:
        self.sc, self.l1, self.guests, self.where = sc, l1, guests, where
        self.xl = Xl(l1.dom0, timeout=sc.deadlines.command)
        self.gone: set[str] = set()
        self.ended_by: dict[str, str] = {}  # guest: the fault that ended its workload (destroy, reboot)
        self.lock = threading.Lock()

    def __call__(self, f: FaultCfg) -> Outcome:
        ops: dict[str, Callable[[FaultCfg], Outcome]] = {"detach-attach": self.detach_attach,
                                                         "destroy": self.destroy,
                                                         "save-restore": self.save_restore,
                                                         "reboot": self.reboot}
        return ops[f.kind](f)

    def _leftovers(self, domid: int, vdev: str | None, gu: Guest) -> list[str]:
        """What the platform finds of `domid`'s connections (of one disk, or all)."""
        backings = [gu.backings[vdev]] if vdev else list(gu.backings.values())
        found = self.l1.ops.backend_leftovers([domid], backings)
        if vdev is None:
            return found
        devid = str(VDEV_DEVID[vdev])
        return [x for x in found if f"/{devid} " in x + " " or f".{vdev}-" in x or gu.backings[vdev].name in x]

    def _old_domain_left(self, domid: int, gu: Guest) -> list[str]:
        """What remains in dom0 of a domain that is gone (destroyed, saved, or
        rebooted into a new one): a domain Xen still holds, then, once the
        backend has had GONE_SECONDS to tear its devices down (xenwatch does it
        asynchronously), each of its connections still there."""
        left = _dying(self.l1.dom0, [domid])
        deadline = Deadline(GONE_SECONDS)
        while True:
            found = self._leftovers(domid, None, gu)
            if not found or deadline.expired():
                return left + found
            time.sleep(0.5)

    def detach_attach(self, f: FaultCfg) -> Outcome:
        gu = self.guests[f.guest]
        dom0 = self.l1.dom0
        node = f"/local/domain/0/backend/vbd/{gu.domid}/{VDEV_DEVID[f.disk]}"
        for i in range(1, f.count + 1):
            bad = _step(dom0, ["xl", "block-detach", f.guest, f.disk], f"cycle {i}: ")
            if bad is not None:
                return bad
            left = [] if _gone(dom0, ["xenstore-exists", node]) else [f"{node} still in xenstore"]
            left += self._leftovers(gu.domid, f.disk, gu)
            if left:
                return Outcome(False, leftovers=tuple(f"cycle {i}, after detach: {x}" for x in left))
            try:
                attach_one(self.sc, self.l1, gu, self.xl, self.where, f.disk,
                           Deadline(self.sc.deadlines.guest_create))
            except DiskFailure as e:
                return Outcome(False, failed=f"cycle {i}: re-attach: {e.message}")
            except LabError as e:
                return Outcome(False, transport_error=f"cycle {i}: re-attach: {e.message}")
        return Outcome(True, detail=f"{f.count} detach-attach cycle(s) of {f.guest}/{f.disk}")

    def destroy(self, f: FaultCfg) -> Outcome:
        """`xl destroy` whatever the guest has in flight; then the guest's every
        connection must be gone from dom0."""
        gu = self.guests[f.guest]
        with self.lock:
            self.gone.add(f.guest)
            self.ended_by[f.guest] = "destroy"
        # its workload's and sampler's channels die with it: close them now rather
        # than wait for TCP to notice a host that is gone
        gu.runner.close()
        t = time.monotonic()
        bad = _step(self.l1.dom0, ["xl", "destroy", f.guest])
        if bad is not None:
            return bad
        took = time.monotonic() - t
        left = [] if _gone(self.l1.dom0, ["xl", "domid", f.guest]) else [f"{f.guest} still listed by xl"]
        left += self._old_domain_left(gu.domid, gu)
        if left:
            return Outcome(False, leftovers=tuple(left), detail=f"xl destroy took {took:.1f}s")
        return Outcome(True, detail=f"xl destroy took {took:.1f}s; nothing of domain {gu.domid} left in dom0")

    def save_restore(self, f: FaultCfg) -> Outcome:
        """`xl save` of the guest with its workload running (each frontend
        suspends with requests pending; the domain and its backend devices go),
        then `xl restore` (a new domain: each frontend reconnects to a new backend
        device and re-issues what was pending). Between the two nothing of the
        old domain may remain in dom0; after the restore every test disk must be
        Connected again with what it negotiated before, and the samplers follow
        the new devices. The workload's progress afterwards is the watchdog's."""
        gu = self.guests[f.guest]
        dom0 = self.l1.dom0
        path = f"/var/tmp/lab-{f.guest}.save"
        try:
            t = time.monotonic()
            bad = _step(dom0, ["xl", "save", f.guest, path], timeout=SAVE_SECONDS)
            if bad is not None:
                return bad
            saved = time.monotonic() - t
            old = gu.domid
            left = self._old_domain_left(old, gu)
            if left:
                return Outcome(False, leftovers=tuple(f"after xl save: {x}" for x in left),
                               detail=f"xl save took {saved:.1f}s")
            t = time.monotonic()
            bad = _step(dom0, ["xl", "restore", path], timeout=SAVE_SECONDS)
            if bad is not None:
                return bad
            restored = time.monotonic() - t
            gu.domid = self.xl.domid(f.guest)
            bad = self._connected_again(gu, "after xl restore")
            if bad is not None:
                return bad
            return Outcome(True, detail=f"xl save {saved:.1f}s (domain {old}: nothing left in dom0), xl restore "
                           f"{restored:.1f}s (domain {gu.domid}: {', '.join(gu.vbds)} Connected again)")
        finally:
            dom0.run(["rm", "-f", path], timeout=STEP_SECONDS)


    def _connected_again(self, gu: Guest, when: str) -> Outcome | None:
        """Every test disk of a guest that came back as a new domain Connected,
        with what its limits allow, and the sampler following its new backend
        device; None when so, else the Outcome that says which did not."""
        for vdev in list(gu.vbds):
            try:
                gu.vbds[vdev] = wait_connected(self.sc, gu, self.xl, vdev, self.where,
                                               Deadline(self.sc.deadlines.guest_create))
                check_negotiated(gu, vdev, gu.cfg)
            except DiskFailure as e:
                return Outcome(False, failed=f"{when}: {e.message}")
            self.l1.ops.point_vbd(gu.backings[vdev], gu.vbds[vdev].sysfs_name)
        return None

    def reboot(self, f: FaultCfg) -> Outcome:
        """`xl reboot` under load: the guest shuts down with its workload running
        (its frontends close with I/O pending), xl builds the domain again with
        the test disks in its configuration, so each is created with the domain
        and its frontend connects during boot. Nothing of the old domain may
        remain; each disk must connect with the scenario's ring and carry reads."""
        gu = self.guests[f.guest]
        dom0 = self.l1.dom0
        with self.lock:
            self.gone.add(f.guest)  # its workload and sampler end with the old domain
            self.ended_by[f.guest] = "reboot"
        gu.runner.close()
        old = gu.domid
        t = time.monotonic()
        bad = _step(dom0, ["xl", "reboot", f.guest])
        if bad is not None:
            return bad
        deadline = Deadline(self.sc.deadlines.guest_create)
        while True:
            res = dom0.run(["xl", "domid", f.guest], timeout=STEP_SECONDS)
            if res.transport_error:
                return Outcome(False, transport_error=res.transport_error)
            if res.ok and res.stdout.strip().isdigit() and int(res.stdout) != old:
                break
            if deadline.expired():
                return Outcome(False, timed_out=True, detail=f"domain {old} of {f.guest} did not come back as a "
                               f"new domain within {deadline.seconds:.0f}s of `xl reboot`")
            time.sleep(0.5)
        gu.domid = int(res.stdout)
        rebuilt = time.monotonic() - t
        left = self._old_domain_left(old, gu)
        if left:
            return Outcome(False, leftovers=tuple(f"after xl reboot: {x}" for x in left))
        try:
            gu.runner.connect(Deadline(self.sc.deadlines.guest_ssh), stage="fault:reboot")
        except LabError as e:
            return Outcome(False, transport_error=f"{f.guest} did not answer SSH after its reboot: {e.message}")
        bad = self._connected_again(gu, "after xl reboot")
        if bad is not None:
            return bad
        done = []
        for vdev in list(gu.vbds):
            res = gu.runner.run(gu.os.io_check_argv(vdev), timeout=IO_SECONDS)
            if res.transport_error:
                return Outcome(False, transport_error=res.transport_error)
            if res.timed_out:
                return Outcome(False, timed_out=True, detail=f"reads on {f.guest}/{vdev} after the reboot did not "
                               f"complete within {IO_SECONDS:.0f}s")
            if not res.ok:
                return Outcome(False, failed=f"reads on {f.guest}/{vdev} after the reboot failed: "
                               f"{res.stderr.strip()[-200:]}")
            v = gu.vbds[vdev]
            done.append(f"{vdev} ring order {v.ring_page_order} x {v.num_queues}")
        return Outcome(True, detail=f"domain {old} rebooted as {gu.domid} in {rebuilt:.1f}s, nothing of {old} left; "
                       f"{', '.join(done)} connected at boot and read 4 MiB each")


IO_SECONDS = 60.0  # 4 MiB of direct reads: about a second under TCG
SAVE_SECONDS = 180.0  # xl save / restore of a 320 MiB guest: 6 s and 9 s under TCG


def _step(dom0: Runner, argv: list[str], prefix: str = "", *, timeout: float = STEP_SECONDS) -> Outcome | None:
    """One toolstack step under its deadline: None when it succeeded, else the
    Outcome that says how it did not (lost transport, no return, refused)."""
    res = dom0.run(argv, timeout=timeout)
    what = f"{prefix}`{' '.join(argv)}`"
    if res.transport_error:
        return Outcome(False, transport_error=res.transport_error)
    if res.timed_out:
        return Outcome(False, timed_out=True, detail=f"{what} did not return within {timeout:.0f}s")
    if not res.ok:
        return Outcome(False, failed=f"{what} failed: {res.stderr.strip()[-300:]}")
    return None
