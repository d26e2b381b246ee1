"""What a reconnect changes: blkback's counters continued across connections
(lab/sampling.py rebase), what a freshly connected disk may negotiate
(lab/xen.py negotiation_problems), and the keys that configure it."""

from __future__ import annotations

import pytest

from lab import scenario, xen
from lab.errors import ScenarioError
from lab.sampling import rebase


def test_counters_shall_continue_across_a_reconnect() -> None:
    base: dict[str, int] = {}
    series = []
    prev = None
    # the old connection counts to 100 reads, the disk goes (no sample), the new
    # one starts again from 0; the in-flight gauge is never offset
    for st in ({"rd_req": 40, "taken": 40, "backing_inflight": 3},
               {"rd_req": 100, "taken": 100, "backing_inflight": 5},
               {"rd_req": 0, "taken": 0, "backing_inflight": 0},
               {"rd_req": 30, "taken": 30, "backing_inflight": 2}):
        base, point = rebase(prev, base, st)
        prev = st
        series.append((point["taken"], point["backing_inflight"]))
    assert series == [(40, 3), (100, 5), (100, 0), (130, 2)]


def test_counters_that_only_grow_shall_be_left_alone() -> None:
    base, point = rebase({"rd_req": 5, "taken": 5}, {}, {"rd_req": 9, "taken": 9})
    assert base == {} and point == {"rd_req": 9, "taken": 9}


def vbd(order: int = 0, queues: int = 1, persistent: bool = True, *, offered_order: int = 4,
        offered_queues: int = 2, offered_persistent: bool = True) -> xen.VbdInfo:
    return xen.VbdInfo(1, 51728, "xvdb", "vbd", "phy", "", "", "4", "4", order, queues, 256, persistent,
                       offered_order, offered_queues, offered_persistent)


@pytest.mark.parametrize(("want", "info", "problem"), [
    (dict(max_ring_page_order=2, max_queues=2), vbd(2, 2), ""),
    (dict(max_ring_page_order=2), vbd(0), "ring-page-order 0, expected 2"),  # a stale one-page ring
    (dict(max_ring_page_order=4), vbd(1, offered_order=1), ""),  # the backend offers less: its limit wins
    (dict(max_queues=4), vbd(queues=2), ""),  # no more queues than vCPUs (2) and the backend's offer
    (dict(max_queues=4), vbd(queues=1), "1 queue(s), expected 2"),
    (dict(feature_persistent=0), vbd(persistent=True), "persistent grants in use although the frontend turned"),
    (dict(feature_persistent=0), vbd(persistent=False), ""),
    (dict(feature_persistent=1), vbd(persistent=False), "persistent grants not in use although both ends offer"),
    (dict(feature_persistent=1), vbd(persistent=False, offered_persistent=False), ""),
])
def test_a_connected_disk_shall_negotiate_what_the_limits_allow(want: dict, info: xen.VbdInfo, problem: str) -> None:
    g = scenario.GuestCfg(name="lin1", **{"max_ring_page_order": -1, "max_queues": -1, **want})
    got = xen.negotiation_problems(g, info, vcpus=2)
    assert (got[0] if got else "").startswith(problem) if problem else got == []


def one_guest(**kw: object) -> dict:
    return {"guests": [{"name": "lin1", **kw}], "workloads": [{"guest": "lin1"}]}


@pytest.mark.parametrize(("raw", "key"), [
    (one_guest(feature_persistent=2), "guests[0].feature_persistent"),
    (one_guest(max_indirect_segments=5000), "guests[0].max_indirect_segments"),
    ({**one_guest(), "dom0": {"os": "freebsd"}, "faults": [{"kind": "save-restore", "guest": "lin1"}]},
     "faults[0].kind"),
    ({**one_guest(), "dom0": {"os": "freebsd"}, "faults": [{"kind": "reboot", "guest": "lin1"}]},
     "faults[0].kind"),
])
def test_bad_frontend_and_save_restore_keys_shall_be_named(raw: dict, key: str) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(raw, "t.toml")
    assert f"key '{key}'" in str(e.value)


def test_the_lifecycle_presets_shall_load() -> None:
    sr = scenario.load("save-restore")
    assert [f.kind for f in sr.faults] == ["save-restore"]
    rb = scenario.load("reboot-under-load")
    assert [f.kind for f in rb.faults] == ["reboot"]
    nop = scenario.load("hot-attach-nopersist")
    assert nop.guests[0].feature_persistent == 0


def test_the_guest_command_line_shall_carry_blkfront_limits_for_a_reboot() -> None:
    """A guest rebooted by a fault loads blkfront from its init with the disks
    already there: modprobe takes the limits from the kernel command line."""
    from lab.platform.linux.guest import LinuxGuest

    g = scenario.GuestCfg(name="lin1", max_ring_page_order=0, max_queues=1, feature_persistent=0)
    words = LinuxGuest().cmdline(g, ip="10.99.0.11", rebooted=True).split()
    assert {"xen_blkfront.max_ring_page_order=0", "xen_blkfront.max_queues=1",
            "xen_blkfront.feature_persistent=0", "rootfstype=ramfs", "lab.ip=10.99.0.11"} <= set(words)
    assert not any(w.startswith("xen_blkfront.max_indirect") for w in words)  # -1: the driver's default


def test_a_guest_no_fault_reboots_shall_not_carry_the_ring_on_its_command_line() -> None:
    """Warm start saves guests with L1 and keys the state on their command lines:
    the ring and queues are applied at attach, so they stay out of both."""
    from lab.platform.linux.guest import LinuxGuest

    g = scenario.GuestCfg(name="lin1", max_ring_page_order=0, max_queues=1, feature_persistent=0)
    words = LinuxGuest().cmdline(g, ip="10.99.0.11").split()
    assert "lab.ip=10.99.0.11" in words
    assert not [w for w in words if w.startswith("xen_blkfront.")]
