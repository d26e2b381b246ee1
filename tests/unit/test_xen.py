"""lab/xen.py: what xenstore says blkfront and blkback negotiated (on the tree of a
real run), the xl.cfg template, and the xl calls over a fake runner."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from labdata import DATA

from lab import xen
from lab.errors import LabError
from lab.runner import Result
from lab.xen import XlDisk


def _trees() -> tuple[dict[str, str], dict[str, str]]:
    """xenstore-default.txt: the backend listing, a blank line, the frontend listing."""
    text = (DATA / "xenstore-default.txt").read_text()
    be_raw, fe_raw = text.split("\n\n", 1)
    return xen.parse_xenstore_ls(be_raw), xen.parse_xenstore_ls(fe_raw)


def test_parse_xenstore_ls_shall_give_every_node_with_its_unquoted_value() -> None:
    text = (DATA / "xenstore-default.txt").read_text()
    nodes = xen.parse_xenstore_ls(text)
    assert len(nodes) == sum(1 for ln in text.splitlines() if " = " in ln)
    assert nodes["/local/domain/0/backend/vbd/1/51728/params"] == "/dev/mapper/lab-lin1-xvdb"
    assert nodes["/local/domain/0/backend/vbd"] == ""
    assert nodes["/local/domain/1/device/vbd/51728/backend"] == "/local/domain/0/backend/vbd/1/51728"
    assert nodes["/local/domain/0/backend/vif/1/0/mac"] == "00:16:3e:00:00:0a"


def test_parse_xenstore_ls_shall_keep_values_with_inner_separators_and_skip_junk() -> None:
    nodes = xen.parse_xenstore_ls('/a = "x = y"\nno separator here\n/b = 7\n/c = "\n')
    assert nodes == {"/a": "x = y", "/b": "7", "/c": '"'}


def test_vbd_info_shall_read_the_test_disk_of_the_default_run() -> None:
    be, fe = _trees()
    info = xen.vbd_info(1, "xvdb", be, fe)
    assert info.domid == 1 and info.vdev == "xvdb"
    assert info.devid == 51728 == 202 * 256 + 1 * 16  # xvd major 202, minor 16 per disk
    assert info.backend_kind == "vbd" and info.backend_type == "phy"
    assert info.params == "/dev/mapper/lab-lin1-xvdb" and info.physical_device == "fd:0"
    assert info.state_frontend == "4" and info.state_backend == "4"  # XenbusStateConnected
    # blkfront loaded with max_ring_page_order=0 and max_queues=1: no ring-page-order
    # or multi-queue-num-queues node in the frontend, one page and one queue
    assert "/local/domain/1/device/vbd/51728/ring-page-order" not in fe
    assert info.ring_page_order == 0 and info.num_queues == 1
    assert info.ring_capacity == 32
    assert info.max_indirect_segments == 256
    assert info.persistent is True
    assert info.sysfs_name == "vbd-1-51728"


def test_vbd_info_shall_read_the_root_disk_too() -> None:
    be, fe = _trees()
    info = xen.vbd_info(1, "xvda", be, fe)
    assert info.devid == 51712 and info.params == "/dev/vdb" and info.sysfs_name == "vbd-1-51712"


def test_vbd_info_shall_count_every_page_and_queue() -> None:
    be, fe = _trees()
    fe = dict(fe)
    fe["/local/domain/1/device/vbd/51728/ring-page-order"] = "2"
    fe["/local/domain/1/device/vbd/51728/multi-queue-num-queues"] = "2"
    info = xen.vbd_info(1, "xvdb", be, fe)
    assert (info.ring_page_order, info.num_queues, info.ring_capacity) == (2, 2, 32 * 4 * 2)


def test_vbd_info_shall_need_both_sides_for_persistent_grants() -> None:
    be, fe = _trees()
    fe = dict(fe)
    fe["/local/domain/1/device/vbd/51728/feature-persistent"] = "0"
    assert xen.vbd_info(1, "xvdb", be, fe).persistent is False


def _as_qdisk(be: dict[str, str], fe: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    be = {k.replace("/backend/vbd/", "/backend/qdisk/"): v for k, v in be.items()}
    fe = {k: v.replace("/backend/vbd/", "/backend/qdisk/") for k, v in fe.items()}
    return be, fe


def test_a_disk_served_by_qdisk_shall_raise_naming_qdisk() -> None:
    be, fe = _as_qdisk(*_trees())
    with pytest.raises(LabError) as e:
        xen.vbd_info(1, "xvdb", be, fe)
    assert "qdisk" in str(e.value) and e.value.stage == "guest:create"


def test_qdisk_seen_only_from_the_frontend_shall_raise_naming_qdisk() -> None:
    """The backend listing may not show the disk (another backend domain, or it
    was read too early); the frontend's `backend` node still names qdisk."""
    be, fe = _as_qdisk(*_trees())
    be = {k: v for k, v in be.items() if "/qdisk/" not in k}
    assert fe["/local/domain/1/device/vbd/51728/backend"] == "/local/domain/0/backend/qdisk/1/51728"
    with pytest.raises(LabError) as e:
        xen.vbd_info(1, "xvdb", be, fe)
    assert "qdisk" in str(e.value)


def test_a_disk_with_no_backend_shall_raise() -> None:
    _, fe = _trees()
    with pytest.raises(LabError, match="no backend"):
        xen.vbd_info(1, "xvdb", {}, fe)
    with pytest.raises(LabError):
        xen.vbd_info(2, "xvdb", *_trees())  # domain 2 has no disks


def test_vdev_devid_table_shall_follow_the_xvd_numbering() -> None:
    assert xen.VDEV_DEVID["xvda"] == 51712 and xen.VDEV_DEVID["xvdb"] == 51728
    assert xen.VDEV_DEVID["xvdp"] == 51712 + 15 * 16


# ------------------------------------------------------------ xl.cfg
def _cfg(**kw: object) -> str:
    params: dict[str, object] = dict(
        name="lin1", run_id="20261125T225658Z", kernel="/boot-disk/vmlinuz", ramdisk="/boot-disk/initrd.img",
        cmdline="console=hvc0 quiet lab.root=/dev/xvda xen_blkfront.max_ring_page_order=0",
        memory_mib=256, vcpus=2,
        disks=[XlDisk("xvda", "/dev/mapper/lab-lin1-xvda"), XlDisk("xvdb", "/dev/mapper/lab-lin1-xvdb")],
        mac="00:16:3e:00:00:0a",
    )
    params.update(kw)
    return xen.render_xl_cfg(**params)


def test_render_xl_cfg_shall_hold_every_disk_and_the_extra_cmdline() -> None:
    cfg = _cfg()
    assert 'extra = "console=hvc0 quiet lab.root=/dev/xvda xen_blkfront.max_ring_page_order=0"' in cfg
    disk_lines = [ln.strip() for ln in cfg.splitlines() if "vdev=" in ln]
    assert disk_lines == [
        "'format=raw, vdev=xvda, access=rw, target=/dev/mapper/lab-lin1-xvda',",
        "'format=raw, vdev=xvdb, access=rw, target=/dev/mapper/lab-lin1-xvdb',",
    ]
    assert 'name = "lin1"' in cfg and 'type = "pv"' in cfg
    assert 'kernel = "/boot-disk/vmlinuz"' in cfg and 'ramdisk = "/boot-disk/initrd.img"' in cfg
    assert "memory = 256" in cfg and "vcpus = 2" in cfg
    assert "mac=00:16:3e:00:00:0a" in cfg
    assert 'on_crash = "preserve"' in cfg, "a crashed guest stays for evidence"
    assert 'on_reboot = "destroy"' in cfg, "an unplanned reboot must not come back unseen"
    assert 'on_reboot = "restart"' in _cfg(restart_on_reboot=True), "a reboot fault's guest is built again"


@pytest.mark.parametrize(("script", "line"), [
    (None, "vif = [ 'bridge=xenbr0, mac=00:16:3e:00:00:0a' ]"),  # xl's default vif-bridge (a FreeBSD dom0)
    ("/etc/xen/scripts/lab-vif-bridge",
     "vif = [ 'bridge=xenbr0, mac=00:16:3e:00:00:0a, script=/etc/xen/scripts/lab-vif-bridge' ]"),
])
def test_render_xl_cfg_shall_name_the_vif_script_only_when_given(script: str | None, line: str) -> None:
    assert line in _cfg(vif_script=script).splitlines()


@pytest.mark.parametrize("script", ["lab-vif-bridge", "/x y", "/x,bridge=evil", "/x'", '/x"'])
def test_render_xl_cfg_shall_refuse_a_vif_script_that_could_add_a_setting(script: str) -> None:
    with pytest.raises(LabError, match="vif script"):
        _cfg(vif_script=script)


def test_render_xl_cfg_shall_refuse_a_missing_parameter() -> None:
    import jinja2

    params = dict(name="x", run_id="r", kernel="k", ramdisk="r", cmdline="c", memory_mib=1, vcpus=1, disks=[])
    with pytest.raises(jinja2.UndefinedError):
        xen.render_xl_cfg(**params)  # no mac


# ------------------------------------------------------------ xl over a runner
class FakeRunner:
    name = "dom0"

    def __init__(self, replies: dict[str, Result] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.replies = replies or {}

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        self.calls.append(argv)
        return self.replies.get(argv[1] if argv[0] == "xl" else argv[0],
                                Result(tuple(argv), 0, "", "", 0.01))


def test_xl_shall_create_paused_unpause_and_read_the_domid() -> None:
    r = FakeRunner({"domid": Result(("xl", "domid", "lin1"), 0, "1\n", "", 0.01)})
    xl = xen.Xl(r, timeout=10)
    xl.create_paused("/run/lab/lin1.cfg", timeout=60)
    assert xl.domid("lin1") == 1
    xl.unpause("lin1")
    assert r.calls == [["xl", "create", "-p", "/run/lab/lin1.cfg"], ["xl", "domid", "lin1"], ["xl", "unpause", "lin1"]]


def test_xl_create_failure_shall_raise_at_stage_guest_create() -> None:
    r = FakeRunner({"create": Result(("xl", "create"), 3, "", "libxl: error: disk vdev=xvdb", 0.5)})
    with pytest.raises(LabError) as e:
        xen.Xl(r, timeout=10).create_paused("/x.cfg", timeout=60)
    assert e.value.stage == "guest:create" and "libxl: error" in str(e.value)


def test_xenstore_trees_shall_read_each_path_in_one_round_trip(tmp_path: Path) -> None:
    """The composed script run by a real sh, with a stand-in xenstore-ls that
    knows one path and fails (as the real one does) on the other."""
    fake = tmp_path / "xenstore-ls"
    fake.write_text('#!/bin/sh\ncase "$2" in /local/domain/0/backend) echo "$2/vbd/1/51728/state = \\"4\\"";; '
                    '*) echo "xenstore-ls: could not access path" >&2; exit 1;; esac\n')
    fake.chmod(0o755)

    class Sh:
        name = "dom0"
        calls: list[list[str]] = []

        def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
            self.calls.append(argv)
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
            return Result(tuple(argv), p.returncode, p.stdout, p.stderr, 0.01)

    r = Sh()
    be, fe, other = xen.Xl(r, timeout=10).xenstore_trees("/local/domain/0/backend", "/local/domain/3/device/vbd",
                                                          "/local/domain/0/backend")
    assert len(r.calls) == 1
    assert be == other == '/local/domain/0/backend/vbd/1/51728/state = "4"\n'
    assert fe == ""


def test_split_trees_shall_give_empty_text_for_what_a_cut_output_lacks() -> None:
    assert xen.split_trees("", 2) == ["", ""]
    assert xen.split_trees("a = 1\n", 2) == ["a = 1\n", ""]


