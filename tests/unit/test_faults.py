"""The fault injector's schedule and dm tables, with a recording stand-in for dom0
(the faults themselves act on the real stack in tests/e2e/test_presets.py)."""

from __future__ import annotations

import time

from lab.faults import Injector
from lab.platform import Backing
from lab.platform.linux.dom0 import LinuxDom0
from lab.platform.linux.faults import dm_table, swap_table_script
from lab.runner import Result
from lab.scenario import Duration, FaultCfg

B = Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-0")


class Dom0:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[float, str]] = []
        self.delay = delay
        self.t0 = time.monotonic()

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        time.sleep(self.delay)
        self.calls.append((time.monotonic() - self.t0, argv[-1]))
        return Result(tuple(argv), 0, "", "", self.delay)


def _injector(faults: tuple[FaultCfg, ...], dom0: Dom0, log: list[str]) -> Injector:
    return Injector(faults, dom0=dom0, backing=lambda g, d: B, scripts=LinuxDom0(dom0, timeout=30),
                    pause_l1=lambda: log.append("stop"),
                    resume_l1=lambda: log.append("cont"), t0=dom0.t0)


def test_dm_tables_shall_keep_the_lower_device_and_size() -> None:
    assert dm_table("linear", B) == "0 $n linear /dev/vdc 0"
    assert dm_table("delay", B, delay_ms=100) == "0 $n delay /dev/vdc 0 100"
    assert dm_table("error", B) == "0 $n error"
    # always down (up 0 s), one feature of five words: byte 2100 of each write set to 0xa5
    assert dm_table("corrupt", B) == "0 $n flakey /dev/vdc 0 0 3600 5 corrupt_bio_byte 2100 w 165 0"
    script = swap_table_script(B, dm_table("delay", B, delay_ms=5))
    # suspend, reload, resume, in that order, on the lab's dm device, without udev
    order = [script.index(w) for w in ("dmsetup suspend", "dmsetup reload", "dmsetup resume")]
    assert order == sorted(order) and script.count("--noudevsync") == 3 and "blockdev --getsz /dev/vdc" in script


def test_a_stall_shall_last_its_duration_from_when_it_was_in_force() -> None:
    """The suspend returns after in-flight I/O completes; the release comes
    `duration` after that, not after the planned start."""
    dom0 = Dom0(delay=0.3)
    inj = _injector((FaultCfg(kind="stall", guest="lin1", at=Duration(0.1), duration=Duration(0.4)),), dom0, [])
    inj.start()
    inj.join(5)
    r = inj.records[0]
    assert r.started_at is not None and r.started_at >= 0.4  # 0.1 planned + 0.3 for the suspend
    assert r.ended_at is not None and r.ended_at - r.started_at >= 0.4
    assert [c[1].split()[1] for c in dom0.calls] == ["suspend", "resume"]


def test_release_all_shall_undo_what_is_in_force_and_nothing_else() -> None:
    dom0, log = Dom0(), []
    faults = (FaultCfg(kind="pause-l1", at=Duration(0)),
              FaultCfg(kind="stall", guest="lin1", at=Duration(30)))
    inj = _injector(faults, dom0, log)
    inj.start()
    deadline = time.monotonic() + 3
    while inj.records[0].started_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    inj.release_all()
    inj.join(3)
    assert log == ["stop", "cont"]
    assert inj.records[1].started_at is None and dom0.calls == []  # the stall never started
    assert inj.first_started(("stall", "pause-l1")) is inj.records[0]


def test_delay_shall_sit_under_the_device_blkback_uses() -> None:
    """blkback keeps submitting to a dm-linear (whose in-flight count the watchdog
    samples); the dm-delay device goes underneath it."""
    from lab.platform.linux.faults import delay_script

    s = delay_script(B, 100)
    assert 'dmsetup create --noudevsync lab-lin1-xvdb-delay --table "0 $n delay /dev/vdc 0 100"' in s
    assert 'dmsetup reload --noudevsync lab-lin1-xvdb --table "0 $n linear /dev/mapper/lab-lin1-xvdb-delay 0"' in s
    assert s.index("dmsetup create") < s.index("dmsetup suspend") < s.index("dmsetup reload") < s.index("dmsetup resume")
