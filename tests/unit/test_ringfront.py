"""The userspace frontend (issue 17): lab/ringfront.py, its scenario keys, the
guest commands that keep blkfront off its disk, the attach path that refuses a
disk blkfront took, and images/blkring/blkring.c itself.

The program shall compile (static, every warning an error) wherever the lab
builds images; under a stand-in for Xen (tests/unit/blkring_sim.c, preloaded
into a dynamic build) it shall connect, keep the ring full, verify, run every
hostile case with its expectation met, and count what it completed exactly as
the backend counted what it took. Through a reconnect schedule it shall connect
once per phase with each ring size asked for, and name a backend that refuses a
reconnect, never prepares for one, or serves another ring size than the one
granted. With several queues it shall keep every queue's ring full and name a
backend that serves fewer queues than min(asked, offered); a reused id shall
be answered twice without a response counted as bogus; a close with a full
ring in flight shall reach Closed and serve again after a reconnect, and a
backend stuck in Closing shall be that case's failure. Only a run in a VM
proves it against blkback."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab import guests, images, ringfront, scenario, xen
from lab.errors import LabError, ScenarioError
from lab.platform.linux import guest as linux_guest
from lab.platform.linux.guest import LinuxGuest
from lab.runner import Result
from lab.scenario import RingCfg, WorkloadCfg
from lab.timing import Deadline
from lab.watchdog import GuestPoint, accounting_mismatches
from lab.workload import WORKLOADS, IoResult

DATA = Path(__file__).resolve().parent.parent / "data"
SIM_SOURCE = Path(__file__).resolve().parent / "blkring_sim.c"
SOURCE = images.program_source("blkring")
ALL_CASES = list(scenario.RING_HOSTILE_CASES)


def _ring(**kw: Any) -> WorkloadCfg:
    return WorkloadCfg(guest="lin1", disk="xvdb", tool="ring", ring=RingCfg(**kw))


# ------------------------------------------------------------ job and argv
def test_ring_job_shall_be_key_value_lines_of_the_workloads_options() -> None:
    w = dataclasses.replace(_ring(behaviour="bursty", op="mixed", segments=13, depth=16, ring_page_order=2,
                                  persistent=True, notify="needed", verify=False,
                                  hostile=("prod-ahead", "too-many-segments")),
                            rwmixread=70, runtime=scenario.Duration(45))
    text = ringfront.ring_job(w, "/dev/xvdb")
    lines = text.splitlines()
    assert lines[0].startswith("# blkring job for lin1/xvdb")
    opts = dict(line.split("=", 1) for line in lines[1:] if line)
    assert opts == {
        "devid": "51728", "duration": "45", "behaviour": "bursty", "op": "mixed", "rwmixread": "70",
        "segments": "13", "depth": "16", "ring_page_order": "2", "queues": "1", "persistent": "1", "notify": "needed",
        "poll": "0", "verify": "0", "hostile": "prod-ahead,too-many-segments", "reconnect_orders": "",
        "halt_wait": "2", "burst_gap": "0", "settle": "2.5", "stat": "/run/blkring-51728.stat", "at_end": "linger",
    }
    assert opts["stat"] == ringfront.stat_path("xvdb")


def test_ring_job_shall_pass_the_reconnect_schedule_in_order() -> None:
    opts = ringfront.job_options(_ring(ring_page_order=0, reconnect_orders=(2, 0, 1)), "/dev/xvdb")
    assert opts["ring_page_order"] == "0" and opts["reconnect_orders"] == "2,0,1"
    assert "reconnect_orders=2,0,1" in ringfront.ring_job(_ring(reconnect_orders=(2, 0, 1)), "/dev/xvdb").splitlines()


@pytest.mark.parametrize(("w", "device", "error"), [
    (_ring(), "/dev/sda", "like /dev/xvdb"),
    (_ring(), "/dev/xvdb;reboot", "like /dev/xvdb"),
    (_ring(hostile=("drop-tables",)), "/dev/xvdb", "hostile case 'drop-tables'"),
    (_ring(reconnect_orders=(1, 5)), "/dev/xvdb", "reconnect order 5"),
    (_ring(reconnect_orders=(0,) * 9), "/dev/xvdb", "9 reconnect orders"),
    (_ring(queues=0), "/dev/xvdb", "queues 0 \\(expected 1..16\\)"),
    (_ring(queues=17), "/dev/xvdb", "queues 17"),
])
def test_ring_job_shall_refuse_what_the_loader_would_have(w: WorkloadCfg, device: str, error: str) -> None:
    with pytest.raises(ScenarioError, match=error):
        ringfront.ring_job(w, device)


def test_ring_job_shall_pass_the_queues() -> None:
    assert ringfront.job_options(_ring(queues=4), "/dev/xvdb")["queues"] == "4"
    assert "queues=2" in ringfront.ring_job(_ring(queues=2), "/dev/xvdb").splitlines()


def test_ring_argv_shall_name_the_job_and_the_output() -> None:
    assert ringfront.ring_argv("/run/lab/ring-0.job", "/run/lab/ring-0.json") == [
        "blkring", "--job", "/run/lab/ring-0.job", "--output", "/run/lab/ring-0.json"]


def test_the_ring_tool_shall_be_registered_beside_fio() -> None:
    tool = WORKLOADS["ring"]
    assert tool.tool == "ring" and isinstance(tool, ringfront.Ring)
    assert tool.argv("j", "o") == ringfront.ring_argv("j", "o")
    assert tool.job(_ring(), "/dev/xvdc").startswith("# blkring job for lin1/xvdb")


# ------------------------------------------------------------ the program's JSON
def test_parse_ring_shall_read_a_passing_hostile_run() -> None:
    r = ringfront.parse_ring((DATA / "blkring-sim-hostile.json").read_text())
    data = json.loads((DATA / "blkring-sim-hostile.json").read_text())
    assert isinstance(r, IoResult) and r.tool == "ring"
    assert r.errors == 0 and ringfront.problems(r) == []
    assert r.runtime_s == data["runtime_s"] > 0
    assert r.read_iops == round(data["completed"]["read"] / r.runtime_s, 1)
    done = data["completed"]
    assert r.write_iops == round((done["write"] + done["flush"] + done["discard"]) / r.runtime_s, 1)
    assert r.ios == sum(data["responses"].values())
    assert (r.clat_p50_ms, r.clat_max_ms) == (data["latency_ms"]["p50"], data["latency_ms"]["max"])
    # captured before slot-reuse and reconnect-mid-flight existed: the first five
    assert [c["case"] for c in r.extra["hostile"]] == ALL_CASES[:5]
    assert all(c["ok"] for c in r.extra["hostile"])
    assert r.extra["ring"]["entries"] == 32 and r.extra["connections"] == 4
    assert len(r.extra["series"]["completions"]) == len(r.extra["series"]["inflight_max"]) >= 2
    assert r.extra["behaviour"] == "aggressive" and r.extra["op"] == "mixed"


def test_parse_ring_shall_count_a_verify_mismatch_as_errors() -> None:
    r = ringfront.parse_ring((DATA / "blkring-sim-verify-mismatch.json").read_text())
    assert r.extra["verify"]["mismatches"] > 0
    assert r.errors == r.extra["verify"]["mismatches"]
    assert any("verify" in p for p in ringfront.problems(r))


def test_parse_ring_shall_count_each_failed_hostile_case_and_each_lost_request() -> None:
    data = json.loads((DATA / "blkring-sim-hostile.json").read_text())
    data["hostile"][3]["ok"] = False
    data["never_completed"] = 2
    data["unexpected_errors"] = 5
    r = ringfront.parse_ring("warning first\n" + json.dumps(data))
    assert r.errors == 1 + 2 + 5


def test_parse_ring_of_a_stopped_program_shall_raise_with_its_stage() -> None:
    text = (DATA / "blkring-no-xen.json").read_text()
    with pytest.raises(ValueError, match="blkring stopped at setup: /dev/xen/xenbus"):
        ringfront.parse_ring(text)
    stage, message = ringfront.fatal(text) or ("", "")
    assert stage == "setup" and stage in ringfront.LAB_STAGES and "xenbus" in message
    assert ringfront.fatal((DATA / "blkring-sim-hostile.json").read_text()) is None


@pytest.mark.parametrize("text", ["", "no json here", '{"tool": "fio"}', "{broken"])
def test_parse_ring_shall_refuse_what_is_not_blkrings_output(text: str) -> None:
    with pytest.raises(ValueError):
        ringfront.parse_ring(text)


# ------------------------------------------------------------ the stat file and the guest sampler
STAT = (DATA / "blkring-sim-hostile.stat").read_text()


def test_parse_stat_shall_give_what_the_block_layers_stat_gives() -> None:
    st = ringfront.parse_stat(STAT)
    assert st is not None
    assert set(ringfront.STAT_KEYS) <= set(st)
    assert st["completed"] == st["reads"] + st["writes"] + st["flushes"] + st["discards"]
    assert st["inflight"] == 0 and st["conn"] == 4
    # the guest platform reads either kind of line
    assert LinuxGuest.parse_stat(STAT) == st
    assert LinuxGuest.parse_stat("1 0 8 0 0 0 0 0 0 0 0") is not None
    # it feeds the drain's accounting like a block device's: equal to what blkback took
    b = {"rd_req": st["reads"], "wr_req": st["writes"], "f_req": st["flushes"], "ds_req": st["discards"],
         "rd_sect": st["sectors_read"], "wr_sect": st["sectors_written"], "taken": st["completed"]}
    assert accounting_mismatches(GuestPoint(1.0, st["completed"], 0, st["flushes"], st), b) == []


def test_lost_request_shall_name_one_request_held_past_the_window() -> None:
    st = ringfront.parse_stat(STAT)
    assert st is not None and ringfront.lost_request(st, 15) is None, "nothing in flight"
    held = {**st, "inflight": 3, "oldest_ms": 16500}
    assert "outstanding for 16s" in (ringfront.lost_request(held, 15) or "")
    assert ringfront.lost_request({**held, "oldest_ms": 14000}, 15) is None
    assert ringfront.lost_request(None, 15) is None


@pytest.mark.parametrize("text", [None, "", "blkring", "blkring completed=1 inflight=x",
                                  "blkring completed=1 inflight=0", "fio 1 2 3"])
def test_parse_stat_shall_refuse_a_partial_or_foreign_line(text: str | None) -> None:
    assert ringfront.parse_stat(text) is None


def test_the_guest_sampler_shall_read_the_stat_file_of_a_ring_disk() -> None:
    argv = LinuxGuest().stat_argv("1", ["xvdb", "xvdc"], ring={"xvdb"})
    assert argv == ["lab-sample", "1", "/run/blkring-51728.stat", "/sys/block/xvdc/stat"]
    assert LinuxGuest().stat_argv("1", ["xvdb"]) == ["lab-sample", "1", "/sys/block/xvdb/stat"]


# ------------------------------------------------------------ guest commands
def test_autoprobe_and_binding_commands() -> None:
    assert linux_guest.autoprobe_argv(False) == ["sh", "-c", "echo 0 > /sys/bus/xen/drivers_autoprobe"]
    assert linux_guest.autoprobe_argv(True) == ["sh", "-c", "echo 1 > /sys/bus/xen/drivers_autoprobe"]
    argv = linux_guest.vbd_binding_argv(51728)
    assert argv[:2] == ["sh", "-c"] and "/sys/bus/xen/devices/vbd-51728/driver" in argv[2]
    for word in ("absent", "bound", "unbound"):
        assert linux_guest.parse_vbd_binding(f"{word}\n") == word
    assert linux_guest.parse_vbd_binding("") == linux_guest.parse_vbd_binding("maybe") == ""


def test_userspace_frontend_argv_shall_load_both_modules_and_report_what_is_missing() -> None:
    argv = linux_guest.userspace_frontend_argv(4096)
    script = argv[2]
    for needle in ("modprobe $m", "xen-evtchn xen-gntalloc", "echo 4096 > /sys/module/xen_gntalloc/parameters/limit",
                   "/dev/xen/xenbus", "/dev/xen/gntalloc", "/dev/xen/evtchn", "command -v blkring",
                   "/sys/bus/xen/drivers_autoprobe"):
        assert needle in script
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    assert LinuxGuest.userspace_frontend_argv() == linux_guest.userspace_frontend_argv(scenario.RING_GRANT_LIMIT)


# ------------------------------------------------------------ the attach path
class Scripted:
    """A runner answering each command by the first matching rule (substring of
    the joined argv -> stdout, or a Result), recording what ran."""

    def __init__(self, rules: list[tuple[str, Any]]) -> None:
        self.rules = rules
        self.calls: list[str] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        line = " ".join(argv)
        self.calls.append(line)
        for needle, answer in self.rules:
            if needle in line:
                if isinstance(answer, Result):
                    return answer
                return Result(tuple(argv), 0, answer() if callable(answer) else answer, "", 0.01)
        return Result(tuple(argv), 0, "", "", 0.01)


def _xenstore(be_state: str, fe_state: str) -> list[tuple[str, Any]]:
    be = "/local/domain/0/backend/vbd/3/51728"
    fe = "/local/domain/3/device/vbd/51728"
    # both trees come in one round trip (Xl.xenstore_trees), split by its marker
    return [("xenstore-ls -f /local/domain/0/backend", f'{be}/state = "{be_state}"\n{be}/type = "phy"\n'
             f'{xen._TREE_SPLIT}\n{fe}/state = "{fe_state}"\n{fe}/backend = "{be}"\n')]


def _attach(tmp_path: Path, dom0: Scripted, guest: Scripted) -> tuple[Any, Any]:
    sc = scenario.from_dict({
        "name": "t", "guests": [{"name": "lin1", "disks": [{"vdev": "xvdb"}]}],
        "workloads": [{"guest": "lin1", "disk": "xvdb", "tool": "ring"}],
    })
    from lab.platform import Backing
    from lab.xen import Xl
    gu = guests.Guest(sc.guests[0], "10.99.0.10", 3, guest, LinuxGuest(),  # type: ignore[arg-type]
                      backings={"xvdb": Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-0")})
    from lab.platform.linux.dom0 import LinuxDom0
    l1 = SimpleNamespace(dom0=dom0, ops=SimpleNamespace(block_script=LinuxDom0.block_script))
    where = SimpleNamespace(results=tmp_path)
    info = guests.attach_one(sc, l1, gu, Xl(dom0, timeout=5), where, "xvdb", Deadline(3))  # type: ignore[arg-type]
    return gu, info


def test_a_ring_disk_shall_be_attached_with_autoprobe_off_and_left_unbound(tmp_path: Path) -> None:
    dom0 = Scripted([("xl block-attach", ""), *_xenstore("2", "1")])
    guest = Scripted([("drivers_autoprobe", ""), ("/sys/bus/xen/devices/vbd-51728", "unbound\n")])
    gu, info = _attach(tmp_path, dom0, guest)
    assert (info.state_backend, info.state_frontend) == ("2", "1") and gu.vbds["xvdb"] is info
    off = next(i for i, c in enumerate(guest.calls) if "echo 0 > /sys/bus/xen/drivers_autoprobe" in c)
    on = next(i for i, c in enumerate(guest.calls) if "echo 1 > /sys/bus/xen/drivers_autoprobe" in c)
    attach = next(i for i, c in enumerate(dom0.calls) if c.startswith("xl block-attach lin1"))
    assert off < on and attach >= 0
    # the lab's lean hotplug script, and target= last (xl reads the rest of the spec as the target)
    assert dom0.calls[attach].endswith("script=/etc/xen/scripts/lab-block-phy, target=/dev/mapper/lab-lin1-xvdb")
    assert "modprobe" in guest.calls[0], "the modules and devices are checked first"
    assert not any("xen_blkfront" in c for c in guest.calls)
    assert (tmp_path / "xenstore-lin1.txt").exists()


@pytest.mark.parametrize(("be", "fe", "binding", "why"), [
    ("2", "1", "bound\n", "vbd-51728 has a driver"),
    ("4", "4", "bound\n", "a frontend connected it"),
    ("2", "3", "unbound\n", "a frontend connected it"),
])
def test_a_ring_disk_blkfront_took_shall_be_refused_with_autoprobe_back_on(
        tmp_path: Path, be: str, fe: str, binding: str, why: str) -> None:
    dom0 = Scripted([("xl block-attach", ""), *_xenstore(be, fe)])
    guest = Scripted([("drivers_autoprobe", ""), ("/sys/bus/xen/devices/vbd-51728", binding)])
    with pytest.raises(LabError) as e:
        _attach(tmp_path, dom0, guest)
    assert e.value.stage == "guest:attach" and not isinstance(e.value, guests.DiskFailure)
    assert why in str(e.value) and "refuses" in str(e.value)
    assert any("echo 1 > /sys/bus/xen/drivers_autoprobe" in c for c in guest.calls), "autoprobe restored"


def test_a_ring_disk_blkfront_takes_once_autoprobe_is_back_shall_be_refused(tmp_path: Path) -> None:
    answers = iter(["unbound\n", "bound\n"])
    dom0 = Scripted([("xl block-attach", ""), *_xenstore("2", "1")])
    guest = Scripted([("drivers_autoprobe", ""), ("/sys/bus/xen/devices/vbd-51728", lambda: next(answers))])
    with pytest.raises(LabError, match="once driver autoprobe was back on"):
        _attach(tmp_path, dom0, guest)


def test_a_guest_without_the_frontends_devices_shall_be_a_lab_error_before_any_attach(tmp_path: Path) -> None:
    dom0 = Scripted([("xl block-attach", ""), *_xenstore("2", "1")])
    guest = Scripted([("modprobe", "no /dev/xen/gntalloc\nno blkring in PATH\n")])
    with pytest.raises(LabError, match="no /dev/xen/gntalloc; no blkring in PATH"):
        _attach(tmp_path, dom0, guest)
    assert not any("block-attach" in c for c in dom0.calls)
    assert not any("echo 0 > /sys/bus/xen/drivers_autoprobe" in c for c in guest.calls)


def test_a_failed_block_attach_shall_be_the_backends_fail_with_autoprobe_back_on(tmp_path: Path) -> None:
    failed = Result(("xl",), 1, "", "libxl: error: device busy\n", 0.1)
    dom0 = Scripted([("xl block-attach", failed), *_xenstore("2", "1")])
    guest = Scripted([("drivers_autoprobe", "")])
    with pytest.raises(guests.DiskFailure, match="device busy"):
        _attach(tmp_path, dom0, guest)
    assert guest.calls[-1].endswith("echo 1 > /sys/bus/xen/drivers_autoprobe")


# ------------------------------------------------------------ scenario keys
BASE = {
    "name": "t",
    "guests": [{"name": "lin1", "disks": [{"vdev": "xvdb", "size": "1G"}, {"vdev": "xvdc", "size": "1G"}]}],
    "workloads": [{"guest": "lin1", "disk": "xvdb", "tool": "ring", "runtime": "30s", "ring": {}}],
}


def _scenario(workload: dict | None = None, ring: dict | None = None, **top: Any) -> dict:
    raw = copy.deepcopy(BASE)
    raw["workloads"][0].update(workload or {})
    raw["workloads"][0]["ring"].update(ring or {})
    raw.update(top)
    return raw


def test_a_ring_workload_shall_load_with_its_options() -> None:
    sc = scenario.from_dict(_scenario(ring={"behaviour": "bursty", "op": "write", "verify": True,
                                            "hostile": ALL_CASES, "segments": 20, "depth": 8}))
    r = sc.workloads[0].ring
    assert sc.workloads[0].tool == "ring" and r.verify and r.segments == 20 and r.hostile == tuple(ALL_CASES)


@pytest.mark.parametrize(("raw", "key", "expected"), [
    (_scenario({"bssplit": "4k/100"}), "workloads[0].bssplit", "a fio key"),
    (_scenario({"extra": {"fsync": "1"}}), "workloads[0].extra", "[workloads.ring]"),
    (_scenario({"iodepth": 64}), "workloads[0].iodepth", "remove it"),
    (_scenario({"tool": "fio"}, {"op": "write"}), "workloads[0].ring", 'only for tool = "ring"'),
    (_scenario(ring={"hostile": ["drop-tables"]}), "workloads[0].ring.hostile[0]",
     "expected one of too-many-segments, bad-grant-ref, out-of-range-sector, prod-ahead, kill-with-outstanding"),
    (_scenario(ring={"hostile": ["prod-ahead", "prod-ahead"]}), "workloads[0].ring.hostile[1]", "listed twice"),
    (_scenario(ring={"verify": True}), "workloads[0].ring.verify", 'needs op = "write"'),
    (_scenario(ring={"segments": 0}), "workloads[0].ring.segments", "expected 1..256"),
    (_scenario(ring={"segments": 257}), "workloads[0].ring.segments", "expected 1..256"),
    (_scenario(ring={"ring_page_order": 5}), "workloads[0].ring.ring_page_order", "expected 0..4"),
    (_scenario(ring={"depth": 33}), "workloads[0].ring.depth", "1..32"),
    (_scenario(ring={"ring_page_order": 1, "depth": 65}), "workloads[0].ring.depth", "1..64"),
    (_scenario(ring={"op": "trim"}), "workloads[0].ring.op", "one of 'read', 'write', 'flush', 'discard', 'mixed'"),
    (_scenario(ring={"behaviour": "polite"}), "workloads[0].ring.behaviour", "one of 'aggressive', 'bursty'"),
    (_scenario(ring={"halt_wait": 0}), "workloads[0].ring.halt_wait", "more than 0s"),
    (_scenario(ring={"hostile": ["prod-ahead"], "settle": "1s"}), "workloads[0].ring.settle",
     "at least twice watchdog.interval"),
    (_scenario(ring={"hostile": ["prod-ahead"], "settle": "7s"}), "workloads[0].ring.settle",
     "not less than watchdog.stall_window"),
    (_scenario(ring={"ring_page_order": 4, "segments": 256}), "workloads[0].ring", "more than the 8192"),
    (_scenario(ring={"queues": 0}), "workloads[0].ring.queues", "expected 1..16 rings"),
    (_scenario(ring={"queues": 17}), "workloads[0].ring.queues", "got 17"),
    (_scenario(ring={"queues": 4, "ring_page_order": 2, "segments": 16}), "workloads[0].ring",
     "4 queues of 128 slots of 16 pages need 8720 grants"),
    (_scenario(ring={"op": "write", "verify": True, "segments": 64, "queues": 2},
               guests=[{"name": "lin1", "disks": [{"vdev": "xvdb", "size": "16M"}]}]),
     "workloads[0].ring.verify", "at least 128 blocks"),
    (_scenario(ring={"op": "write", "verify": True, "segments": 128},
               guests=[{"name": "lin1", "disks": [{"vdev": "xvdb", "size": "4M"}]}]),
     "workloads[0].ring.verify", "at least 64 blocks"),
    (_scenario(ring={"reconnect_orders": [2, 5]}), "workloads[0].ring.reconnect_orders[1]",
     "expected a ring page order 0..4"),
    (_scenario(ring={"reconnect_orders": [-1]}), "workloads[0].ring.reconnect_orders[0]", "got -1"),
    (_scenario({"runtime": "100s"}, {"reconnect_orders": [0] * 9}), "workloads[0].ring.reconnect_orders",
     "at most 8 reconnects"),
    (_scenario({"runtime": "15s"}, {"reconnect_orders": [2, 0, 1]}), "workloads[0].ring.reconnect_orders",
     "leaves 3.75s each; expected at least 5s per phase: raise workloads[0].runtime to 20s"),
    (_scenario({"runtime": "45s"}, {"reconnect_orders": [0] * 8, "settle": "7s"}),
     "workloads[0].ring.reconnect_orders", "more than half of deadlines.workload_grace"),
    (_scenario(ring={"reconnect_orders": [1], "settle": "1s"}), "workloads[0].ring.settle",
     "at least twice watchdog.interval"),
    (_scenario(ring={"reconnect_orders": [1], "settle": "8s"}), "workloads[0].ring.settle",
     "not less than watchdog.stall_window"),
    (_scenario(ring={"ring_page_order": 1, "reconnect_orders": [2, 0], "depth": 40}), "workloads[0].ring.depth",
     "1..32 (the slots of a 1-page ring (the smallest of ring_page_order and reconnect_orders)"),
    (_scenario(ring={"reconnect_orders": [4], "segments": 256}), "workloads[0].ring", "more than the 8192"),
    (_scenario(ring={"op": "write", "verify": True, "segments": 64, "reconnect_orders": [1]},
               guests=[{"name": "lin1", "disks": [{"vdev": "xvdb", "size": "16M"}]}]),
     "workloads[0].ring.verify", "at least 128 blocks"),
])
def test_bad_ring_keys_shall_be_refused_naming_key_and_expectation(raw: dict, key: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(raw, "/x/t.toml")
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg and "/x/t.toml" in msg, msg


def test_queues_shall_load_and_reach_the_job() -> None:
    sc = scenario.from_dict(_scenario(ring={"queues": 4, "hostile": ["slot-reuse", "reconnect-mid-flight"]}))
    w = sc.workloads[0]
    assert w.ring.queues == 4 and w.ring.hostile == ("slot-reuse", "reconnect-mid-flight")
    assert ringfront.job_options(w, "/dev/xvdb")["queues"] == "4"
    assert scenario.from_dict(_scenario()).workloads[0].ring.queues == 1


def test_a_reconnect_schedule_shall_load_and_reach_the_job() -> None:
    sc = scenario.from_dict(_scenario({"runtime": "20s"}, {"reconnect_orders": [2, 0, 1], "depth": 32}))
    w = sc.workloads[0]
    assert w.ring.reconnect_orders == (2, 0, 1) and isinstance(w.ring.reconnect_orders, tuple)
    assert ringfront.job_options(w, "/dev/xvdb")["reconnect_orders"] == "2,0,1"
    assert scenario.from_dict(_scenario()).workloads[0].ring.reconnect_orders == ()


def test_a_ring_disk_shall_carry_no_second_workload() -> None:
    raw = _scenario()
    raw["workloads"].append({"guest": "lin1", "disk": "xvdb"})
    with pytest.raises(ScenarioError, match="'workloads\\[0\\].disk'.*owns its disk"):
        scenario.from_dict(raw)


@pytest.mark.skipif("save-restore" not in scenario.FAULT_KINDS, reason="no save-restore fault in this tree")
def test_a_ring_workloads_guest_shall_not_be_saved_and_restored() -> None:
    raw = _scenario(faults=[{"kind": "save-restore", "guest": "lin1", "disk": "xvdc", "at": "5s"}])
    with pytest.raises(ScenarioError, match="'workloads\\[0\\].tool'.*save-restore"):
        scenario.from_dict(raw)


def test_the_two_presets_shall_say_what_the_issue_asks() -> None:
    agg = scenario.load("aggressive-frontend")
    (w,) = agg.workloads
    assert w.tool == "ring" and w.ring.behaviour == "aggressive" and w.ring.notify == "always"
    assert w.ring.depth == 0 and w.ring.ring_page_order == 0, "a one-page ring kept full"
    assert [(f.kind, f.delay) for f in agg.faults] == [("delay", 0.1)], "against a slow backing device"
    hostile = scenario.load("hostile-frontend")
    ring, healthy = hostile.workloads
    assert ring.tool == "ring" and list(ring.ring.hostile) == ALL_CASES
    assert healthy.tool == "fio" and healthy.disk != ring.disk, "a second, healthy disk"


def test_the_ring_reconnect_preset_shall_say_what_it_was_asked() -> None:
    sc = scenario.load("ring-reconnect")
    (g,) = sc.guests
    assert g.name == "lin1" and [d.vdev for d in g.disks] == ["xvdb", "xvdc"]
    ring, healthy = sc.workloads
    assert (ring.disk, ring.tool, ring.ring.behaviour, ring.ring.op) == ("xvdb", "ring", "aggressive", "read")
    assert (ring.ring.ring_page_order, ring.ring.reconnect_orders) == (0, (2, 0, 1)), "1, then 4, 1, 2 pages"
    assert ring.runtime == 40 and not ring.ring.hostile and not sc.faults
    assert (healthy.disk, healthy.tool, healthy.iodepth, healthy.numjobs, healthy.runtime) == ("xvdc", "fio", 16, 2, 40)


# ------------------------------------------------------------ the image
def test_the_guest_recipe_shall_build_blkring_and_keep_its_modules() -> None:
    r = images.load_recipe("linux-guest")
    assert r.programs == ("blkring",)
    assert {"xen-gntalloc", "xen-evtchn"} <= set(r.modules)
    assert images.program_source("blkring") == SOURCE and SOURCE.is_file()


def test_gcc_argv_shall_build_static_with_warnings_as_errors(tmp_path: Path) -> None:
    argv = images.gcc_argv(SOURCE, tmp_path / "blkring")
    assert argv[0] == "gcc" and "-static" in argv and {"-Wall", "-Wextra", "-Werror"} <= set(argv)
    assert argv[-3:] == ["-o", str(tmp_path / "blkring"), str(SOURCE)]


def test_the_recipe_hash_shall_follow_blkrings_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    shutil.copytree(images.RECIPES, root, symlinks=True)
    monkeypatch.setattr(images, "RECIPES", root)
    keys = images.ensure_keys(tmp_path / "cache")
    from lab.images import AptSource
    mirror = [AptSource("http://deb.debian.org/debian", "bookworm", ("main",))]
    before = images.recipe_hash(images.load_recipe("linux-guest"), mirror, keys)
    src = root / "blkring" / "blkring.c"
    src.write_text(src.read_text() + "\n")
    assert images.recipe_hash(images.load_recipe("linux-guest"), mirror, keys) != before
    src.unlink()
    with pytest.raises(LabError, match="no source"):
        images.load_recipe("linux-guest")


def _have_static_libc() -> bool:
    if not shutil.which("gcc"):
        return False
    out = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


@pytest.mark.skipif(not _have_static_libc(), reason="no gcc with a static libc (apt install gcc libc6-dev)")
def test_blkring_shall_compile_static_with_every_warning_an_error(tmp_path: Path) -> None:
    out = tmp_path / "blkring"
    res = subprocess.run(images.gcc_argv(SOURCE, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from lab.ramroot import elf_needed
    assert elf_needed(out.read_bytes()) == ([], []), "static: nothing for the RAM root to keep"
    # without Xen it stops at setup, with its reason in the JSON and exit code 3
    run = subprocess.run([str(out), "--devid", "51728", "--duration", "1"], capture_output=True, text=True,
                         timeout=30)
    if not os.path.exists("/dev/xen/xenbus"):
        assert run.returncode == 3
        assert ringfront.fatal(run.stdout) == ("setup", "/dev/xen/xenbus: No such file or directory")
    usage = subprocess.run([str(out), "--devid", "1", "--op", "trim"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and ringfront.fatal(usage.stdout) == ("usage", "op: unknown value 'trim'")


# ------------------------------------------------------------ the program under the simulator
@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    d = tmp_path_factory.mktemp("blkring-sim")
    prog, lib = d / "blkring", d / "sim.so"
    for argv in (["gcc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-o", str(prog), str(SOURCE)],
                 ["gcc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
                  str(lib), str(SIM_SOURCE), "-lpthread", "-ldl"]):
        res = subprocess.run(argv, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    return {"dir": d, "prog": prog, "lib": lib}


def _sim_run(sim: dict[str, Path], name: str, *args: str, env: dict[str, str] | None = None,
             term_after: float | None = None) -> tuple[int, dict, dict[str, int] | None, dict[str, int]]:
    d = sim["dir"]
    out, stat, stats = d / f"{name}.json", d / f"{name}.stat", d / f"{name}.sim"
    argv = [str(sim["prog"]), "--devid", "51728", "--stat", str(stat), "--output", str(out), "--seed", "7", *args]
    e = {**os.environ, "LD_PRELOAD": str(sim["lib"]), "SIM_STATS": str(stats), **(env or {})}
    p = subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if term_after is not None:
        time.sleep(term_after)
        p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    (d / f"{name}.err").write_text(err)
    backend = dict(w.split("=") for w in stats.read_text().split())
    return (p.returncode, json.loads(out.read_text()), ringfront.parse_stat(stat.read_text()),
            {k: int(v) for k, v in backend.items()})


def _accounting(st: dict[str, int] | None, backend: dict[str, int]) -> list[str]:
    """The drain's comparison, with the backend's statistics summed over the
    connections as the dom0 sampler continues them (lab/sampling.py)."""
    assert st is not None
    b = {k: backend[f"sum_{k}"] for k in ("rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect")}
    b["taken"] = b["rd_req"] + b["wr_req"] + b["f_req"] + b["ds_req"]
    return accounting_mismatches(GuestPoint(0.0, st["completed"], st["inflight"], st["flushes"], st), b)


def test_under_the_simulator_the_aggressive_frontend_keeps_the_ring_full(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "aggressive", "--duration", "0.6")
    assert rc == 0 and out["ok"], out
    r = ringfront.parse_ring(json.dumps(out))
    assert r.errors == 0 and r.ios == out["requests"] > 100
    assert out["notifies"] == out["requests"], "a notify on every push"
    assert max(out["series"]["inflight_max"]) == 32, "the ring kept full"
    assert out["closed"] == "close" and st is not None and st["inflight"] == 0
    assert _accounting(st, backend) == []


def test_under_the_simulator_every_hostile_case_meets_its_expectation(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "hostile", "--duration", "0.5", "--op", "mixed", "--hostile",
                                    ",".join(ALL_CASES), "--halt-wait", "0.3", "--settle", "0.1")
    assert rc == 0, out["errors"]
    assert [(c["case"], c["ok"]) for c in out["hostile"]] == [(c, True) for c in ALL_CASES], out["hostile"]
    assert out["connections"] == 5, "prod-ahead, kill, reconnect-mid-flight and the fresh one for the base phase"
    assert backend["halted"] == 0, "the last connection serves"
    assert _accounting(st, backend) == [], "what the frontend completed = what the backend took"


@pytest.mark.parametrize(("env", "status", "ok"), [
    ({}, "error", True),  # the ref stayed ended: blkback must refuse it
    ({"SIM_REGRANT": "1"}, "okay", True),  # another grant took the ref: serving it is right
    ({"SIM_SERVE_REVOKED": "1"}, "okay", False),  # a backend that maps an ended grant
])
def test_under_the_simulator_a_revoked_grant_ref_is_refused_unless_granted_again(
        sim: dict[str, Path], env: dict[str, str], status: str, ok: bool) -> None:
    rc, out, st, backend = _sim_run(sim, f"revoked-{status}-{ok}", "--duration", "0.3", "--op", "write",
                                    "--hostile", "revoked-grant-ref", "--settle", "0.05", env=env)
    (case,) = out["hostile"]
    assert case["case"] == "revoked-grant-ref" and case["ok"] is ok, case
    assert case["got"].startswith(f"{status} response"), case["got"]
    assert (rc == 0) is ok
    if ok:
        assert _accounting(st, backend) == [], "a served revoked write counts its sectors, a refused one none"


def test_under_the_simulator_verify_catches_a_corrupted_read(sim: dict[str, Path]) -> None:
    rc, out, _, _ = _sim_run(sim, "clean", "--duration", "0.4", "--op", "write", "--verify", "1")
    assert rc == 0 and out["verify"]["checked"] > 0 and out["verify"]["mismatches"] == 0
    rc, out, _, _ = _sim_run(sim, "corrupt", "--duration", "0.4", "--op", "write", "--verify", "1",
                             env={"SIM_CORRUPT": "1"})
    assert rc == 1 and out["verify"]["mismatches"] > 0
    assert ringfront.parse_ring(json.dumps(out)).errors == out["verify"]["mismatches"]


def test_under_the_simulator_bursty_indirect_multipage_mixed_io_counts_exactly(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "bursty", "--duration", "0.5", "--behaviour", "bursty", "--op", "mixed",
                                    "--segments", "20", "--ring-page-order", "2", "--notify", "needed",
                                    "--persistent", "1")
    assert rc == 0 and out["ok"], out["errors"]
    assert out["ring"]["pages"] == 4 and out["ring"]["entries"] == 128 and out["ring"]["indirect"]
    assert all(out["completed"][k] > 0 for k in ("read", "write", "flush", "discard"))
    assert _accounting(st, backend) == []


def test_under_the_simulator_sigterm_ends_the_run_drained_and_closed(sim: dict[str, Path]) -> None:
    rc, out, st, _ = _sim_run(sim, "term", "--duration", "60", term_after=0.5)
    assert rc == 0 and out["stopped_by_signal"] and out["closed"] == "close"
    assert st is not None and st["inflight"] == 0 and out["runtime_s"] < 30


def test_a_blkring_that_could_not_set_up_is_the_labs_failure() -> None:
    """blkring's own output when it ran where there is no Xen (the file's first
    line in tests/data/README.md): its fatal stage is the lab's, so the tool
    names it for an ERROR; fio never does."""
    from lab import workload

    text = (DATA / "blkring-no-xen.json").read_text()
    assert workload.WORKLOADS["ring"].lab_failure(text).startswith("blkring setup")
    assert workload.WORKLOADS["fio"].lab_failure(text) == ""


# ------------------------------------------------------------ the reconnect schedule under the simulator
SCHEDULE = ("--duration", "0.8", "--reconnect-orders", "2,0,1", "--settle", "0.05", "--connect-timeout", "1")


def _blkring_lines(sim: dict[str, Path], name: str) -> list[str]:
    """blkring's own stderr lines (the stand-in's are left out)."""
    return [ln for ln in (sim["dir"] / f"{name}.err").read_text().splitlines() if ln.startswith("blkring:")]


def test_under_the_simulator_a_reconnect_schedule_connects_once_per_phase(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "schedule", *SCHEDULE)
    assert rc == 0 and out["ok"], out["errors"]
    detail = out["connections_detail"]
    assert out["connections"] == len(detail) == 4 and out["reconnect_orders"] == [2, 0, 1]
    assert [(c["requested_order"], c["pages"], c["entries"]) for c in detail] == [
        (0, 1, 32), (2, 4, 128), (0, 1, 32), (1, 2, 64)]
    assert all(c["ok"] and c["connected"] and c["scheduled"] and c["problem"] is None for c in detail)
    assert all(c["allowed_pages"] == c["pages"] and c["responses"]["okay"] > 0 for c in detail)
    assert sum(c["requests"] for c in detail) == out["requests"]
    assert sum(sum(c["responses"].values()) for c in detail) == sum(out["responses"].values())
    assert sum(c["responses"]["okay"] for c in detail) == out["responses"]["okay"]
    assert out["failed_connections"] == 0 and out["closed"] == "close"
    assert max(out["series"]["inflight_max"]) == 128, "the 4-page connection kept its ring full"
    # 4 phases of 0.2s of I/O; the reconnects' idle time is kept out of runtime_s (and out of the IOPS)
    assert out["reconnect_idle_s"] >= 3 * 2 * 0.05 and out["duration_s"] - 0.01 <= out["runtime_s"] < out["duration_s"] + 0.5
    assert st is not None and st["conn"] == 4 and st["conn_completed"] == sum(detail[-1]["responses"].values())
    assert _accounting(st, backend) == [], "what the frontend completed = what the backend took, over 4 connections"
    r = ringfront.parse_ring(json.dumps(out))
    assert r.errors == 0 and r.extra["connections_detail"] == detail and r.extra["reconnect_orders"] == [2, 0, 1]


def test_under_the_simulator_a_backend_that_keeps_the_old_ring_size_is_named(sim: dict[str, Path]) -> None:
    rc, out, _, backend = _sim_run(sim, "stale", *SCHEDULE, env={"SIM_STALE_RING": "1"})
    assert rc == 1 and not out["ok"]
    first, second = out["connections_detail"]
    assert first["ok"] and first["pages"] == 1
    assert (second["index"], second["requested_order"], second["allowed_pages"], second["pages"]) == (2, 2, 4, 1)
    assert not second["ok"] and second["entries"] == 32
    (line,) = _blkring_lines(sim, "stale")
    assert line.startswith("blkring: connection 2 (ring-page-order 2): the backend serves a ring of 32 entries "
                           "(1 page), not the 4 pages (128 entries)"), line
    assert out["errors"] == [line.removeprefix("blkring: ")] and out["failed_connections"] == 1
    assert out["closed"] == "closed after a failed connection" and backend["halted"] == 0
    r = ringfront.parse_ring(json.dumps(out))
    assert r.errors == 1 and ringfront.problems(r) == out["errors"]


def test_under_the_simulator_a_refused_reconnect_is_a_problem_with_the_backends_error(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "refused", *SCHEDULE, env={"SIM_REFUSE_CONNECT": "3"})
    assert rc == 1 and [c["ok"] for c in out["connections_detail"]] == [True, True, False]
    third = out["connections_detail"][2]
    assert not third["connected"] and third["requests"] == 0
    (line,) = _blkring_lines(sim, "refused")
    assert "connection 3 (ring-page-order 0)" in line and "state 5 (Closing), not Connected" in line
    assert "/local/domain/0/error/backend/vbd/1/51728/error: '22 mapping ring-ref" in line
    assert out["closed"] == "closed after a failed connection" and out["connections"] == 2
    assert _accounting(st, backend) == []
    assert ringfront.parse_ring(json.dumps(out)).errors == 1


def test_under_the_simulator_a_backend_that_never_prepares_for_reconnect_is_a_problem(sim: dict[str, Path]) -> None:
    rc, out, _, _ = _sim_run(sim, "no-prepare", *SCHEDULE, env={"SIM_NO_PREPARE": "1"})
    assert rc == 1 and out["connections"] == 1 and out["failed_connections"] == 1
    (line,) = _blkring_lines(sim, "no-prepare")
    assert line == ("blkring: connection 2 (ring-page-order 2): backend did not prepare for reconnect: state 6 1s "
                    "after the frontend wrote Initialising (1), never InitWait (2)")
    assert out["closed"] == "closed: a reconnect failed"


# ------------------------------------------------------------ the two later hostile cases under the simulator
def test_under_the_simulator_a_reused_id_and_a_close_mid_flight_meet_their_expectations(sim: dict[str, Path]) -> None:
    # 20 ms a response, as dm-delay makes it: the first request with the id is
    # still out when the second goes in, and the full ring is out at the close
    rc, out, st, backend = _sim_run(sim, "later-cases", "--duration", "0.3", "--hostile",
                                    "slot-reuse,reconnect-mid-flight", "--settle", "0.05",
                                    env={"SIM_DELAY_MS": "20"})
    assert rc == 0 and out["ok"], out["errors"]
    reuse, mid = out["hostile"]
    assert (reuse["case"], reuse["ok"], mid["case"], mid["ok"]) == ("slot-reuse", True, "reconnect-mid-flight", True)
    assert "while the first was outstanding" in reuse["got"] and "2 okay, 0 error" in reuse["got"]
    assert out["bogus_responses"] == 0, "the second response with the id is not one for no request"
    assert mid["got"].startswith("32 reads pushed (all taken), 32 outstanding at Closing; 32 at Closed;"), mid["got"]
    assert "32 okay, 0 error, 0 never" in mid["got"] and mid["got"].endswith("32/32 reads okay after reconnect")
    assert out["connections"] == 3, "the first, the one after the close mid-flight, the fresh one for the base phase"
    assert _accounting(st, backend) == [], "both requests with the one id counted, as the backend counted them"


def test_under_the_simulator_a_backend_stuck_in_closing_fails_the_case_and_ends_the_run(sim: dict[str, Path]) -> None:
    rc, out, st, _ = _sim_run(sim, "stuck", "--duration", "0.3", "--hostile", "reconnect-mid-flight,prod-ahead",
                              "--settle", "0.05", "--close-timeout", "1",
                              env={"SIM_DELAY_MS": "20", "SIM_STUCK_CLOSING": "1"})
    assert rc == 1 and not out["ok"] and "fatal" not in out
    (case,) = out["hostile"]
    assert case["case"] == "reconnect-mid-flight" and not case["ok"], "prod-ahead never ran: no device left"
    assert "the backend stayed in state 5 (Closing) 1.0s after the frontend wrote Closed (6) with 32 reads in " \
           "flight" in case["got"], case["got"]
    (line,) = _blkring_lines(sim, "stuck")
    assert line.startswith("blkring: hostile case reconnect-mid-flight: expected Closing then Closed with a full "
                           "ring of reads in flight: the backend Closed within 1s"), line
    assert out["closed"] == "not closed: the backend stayed in Closing" and out["connections"] == 1
    assert st is not None and st["inflight"] == 0
    r = ringfront.parse_ring(json.dumps(out))
    assert r.errors == 1 and ringfront.problems(r) == out["errors"]


# ------------------------------------------------------------ several queues under the simulator
def test_under_the_simulator_every_queue_is_kept_full_and_counted(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "queues", "--duration", "0.5", "--queues", "3")
    assert rc == 0 and out["ok"], out["errors"]
    ring = out["ring"]
    assert (ring["queues"], ring["requested_queues"], ring["backend_max_queues"]) == (3, 3, 4)
    assert [q["queue"] for q in ring["per_queue"]] == [0, 1, 2]
    assert all(q["requests"] == q["completed"] > 100 for q in ring["per_queue"])
    assert sum(q["requests"] for q in ring["per_queue"]) == out["requests"]
    assert max(out["series"]["inflight_max"]) == 3 * 32, "each of the three rings kept full"
    (conn,) = out["connections_detail"]
    assert (conn["queues"], conn["queues_serving"]) == (3, 3)
    assert _accounting(st, backend) == [], "the stat file's totals are summed over the queues"


@pytest.mark.parametrize(("offer", "asked", "queues"), [("2", "4", 2), ("0", "4", 1), ("4", "1", 1)])
def test_under_the_simulator_the_queues_are_the_smaller_of_asked_and_offered(
        sim: dict[str, Path], offer: str, asked: str, queues: int) -> None:
    rc, out, _, _ = _sim_run(sim, f"queues-{offer}-{asked}", "--duration", "0.3", "--queues", asked,
                             env={"SIM_MAX_QUEUES": offer})
    assert rc == 0 and out["ok"], out["errors"]
    assert (out["ring"]["queues"], out["ring"]["backend_max_queues"]) == (queues, max(int(offer), 1))
    assert max(out["series"]["inflight_max"]) == 32 * queues


def test_under_the_simulator_queues_survive_a_reconnect_schedule(sim: dict[str, Path]) -> None:
    rc, out, st, backend = _sim_run(sim, "queues-schedule", *SCHEDULE, "--queues", "2")
    assert rc == 0 and out["ok"], out["errors"]
    assert [(c["queues"], c["queues_serving"], c["pages"]) for c in out["connections_detail"]] == [
        (2, 2, 1), (2, 2, 4), (2, 2, 1), (2, 2, 2)]
    assert max(out["series"]["inflight_max"]) == 2 * 128
    assert _accounting(st, backend) == []


def test_under_the_simulator_a_backend_serving_fewer_queues_is_a_problem(sim: dict[str, Path]) -> None:
    rc, out, _, _ = _sim_run(sim, "one-queue", "--duration", "0.3", "--queues", "2", "--connect-timeout", "1",
                             "--drain-timeout", "1", env={"SIM_ONE_QUEUE": "1"})
    assert rc == 1 and not out["ok"]
    (conn,) = out["connections_detail"]
    assert (conn["queues"], conn["queues_serving"], conn["ok"]) == (2, 1, False)
    lines = _blkring_lines(sim, "one-queue")
    assert lines[0] == ("blkring: connection 1 (ring-page-order 0): 1 of the 2 queues answered a read within 1s "
                        "(expected min(2 asked, 4 offered) = 2; no response on queue 1)"), lines
    assert ringfront.parse_ring(json.dumps(out)).errors >= 1


def test_the_parser_reads_blkrings_output_from_a_real_hostile_run() -> None:
    """blkring's JSON from a real hostile-frontend run on the stock backend
    (tests/data/README.md): every case answered as expected, no error counted,
    each case named with what it got."""
    from lab.ringfront import parse_ring

    res = parse_ring((DATA / "blkring-hostile-real.json").read_text())
    hostile = res.extra["hostile"]
    assert [h["case"] for h in hostile] == ["too-many-segments", "bad-grant-ref", "out-of-range-sector",
                                            "prod-ahead", "kill-with-outstanding", "slot-reuse",
                                            "reconnect-mid-flight"]
    assert all(h["ok"] for h in hostile) and res.errors == 0
    kill = hostile[4]["got"]
    assert "killed with 32 reads outstanding" in kill
    assert res.ios == res.extra["requests"] > 0 and res.extra["ring"]["entries"] == 32


@pytest.mark.parametrize(("name", "slots"), [("blkring-hostile-real.json", 32), ("blkring-queues-real.json", 128)])
def test_a_ring_disks_capacity_is_what_blkring_negotiated(name: str, slots: int) -> None:
    """Captured from real runs (tests/data/README.md): one queue of one page, and
    two queues of two-page rings (the vbd read at attach said 32 for both)."""
    from lab.ringfront import capacity

    assert capacity(json.loads((DATA / name).read_text())) == slots


def test_a_job_file_the_lab_could_not_write_shall_be_the_labs_failure(tmp_path: Path) -> None:
    """The job file goes in on the tool's own round trip; when `cat > job` fails,
    the tool never ran: a NoResult carrying a lab failure (ERROR), not the tool's."""
    from lab import observe
    from lab.runner import Result

    sc = scenario.from_dict({"name": "t", "guests": [{"name": "lin1", "disks": [{"vdev": "xvdb"}]}],
                             "workloads": [{"guest": "lin1", "disk": "xvdb"}]})
    never = Scripted([])  # no `cat` of a JSON may be tried
    j = observe.Job(sc.workloads[0], SimpleNamespace(cfg=sc.guests[0], runner=never), None, 0, 5.0,  # type: ignore[arg-type]
                    "[global]\n")
    j.result = Result(("sh",), 97, f"{observe.JOB_NOT_WRITTEN}\n", "sh: can't create /run/lab/fio-0.job: "
                      "No space left on device", 0.1)
    (got,) = observe._fetch_results(sc, [j], SimpleNamespace(results=tmp_path)).values()  # type: ignore[arg-type]
    assert isinstance(got, observe.NoResult) and "No space left" in got.lab_failure
    assert never.calls == []
