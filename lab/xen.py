"""The toolstack, over a Runner: render xl.cfg, `xl create -p` / `unpause` (so no
console output is lost), destroy, and read what blkfront and blkback negotiated
from xenstore."""

from __future__ import annotations

import re
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from lab.errors import LabError
from lab.runner import Runner

if TYPE_CHECKING:
    from lab.scenario import GuestCfg

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def xl_string(value: object) -> str:
    """`value` as a double-quoted string of xl's config syntax (libxlu_cfg_l.l; its
    dequoting, xlu__cfgl_dequote, reads backslash escapes): backslash and double
    quote escaped. A newline or other control character is refused rather than
    escaped: no name, path or kernel command line the lab writes needs one, and
    the scenario loader already refuses them."""
    text = str(value)
    if _CONTROL.search(text):
        raise LabError("guest:create", f"xl config value {text!r}: control characters (newline, tab, ...) refused")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_line(value: object) -> str:
    """Text for a `#` comment: it ends at the line's end, so no control characters."""
    text = str(value)
    if _CONTROL.search(text):
        raise LabError("guest:create", f"xl config comment {text!r}: control characters refused")
    return text


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
_env.filters["xl_string"] = xl_string
_env.filters["one_line"] = _one_line

# blkif ring: a 4 KiB page holds 32 request slots (__CONST_RING_SIZE(blkif, 4096)).
REQUESTS_PER_RING_PAGE = 32


def _devid(disk: int) -> int:
    """xenstore device id of xvd disk number `disk` (xvda = 0): the xvd major 202
    for the first 16, then the extended form (docs/misc/vbd-interface.txt)."""
    return (202 << 8) + (disk << 4) if disk < 16 else (1 << 28) + (disk << 8)


VDEV_DEVID = {f"xvd{c}": _devid(i) for i, c in enumerate(string.ascii_lowercase)}

# A disk spec is itself a comma-separated KEY=VALUE list inside a quoted string
# (xl-disk-configuration.5): its parts may hold no ',', '=', quote or space.
_VDEV = re.compile(r"xvd[a-z]")
_TARGET = re.compile(r"/dev/(?!.*\.\.)[A-Za-z0-9_./+-]+")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_SCRIPT = re.compile(r"/[A-Za-z0-9_./-]+")  # a hotplug script's path (xl's script=)


@dataclass(frozen=True)
class XlDisk:
    vdev: str
    target: str


def render_xl_cfg(**params: object) -> str:
    """The guest's xl config. Strings go through `xl_string`; the parts of a disk
    spec, the MAC and the numbers are checked here against what they may hold."""
    disks = params.get("disks", [])  # missing: jinja's StrictUndefined names it
    if not isinstance(disks, list | tuple):
        raise LabError("guest:create", f"xl config: disks {disks!r} is not a list")
    for d in disks:
        if not isinstance(d, XlDisk) or not _VDEV.fullmatch(d.vdev) or not _TARGET.fullmatch(d.target):
            raise LabError("guest:create", f"xl disk {d!r}: expected vdev xvdX and a /dev/... target "
                           "without ',', '=', quotes or spaces")
    if "mac" in params and not _MAC.fullmatch(str(params["mac"])):
        raise LabError("guest:create", f"xl config: MAC {params['mac']!r} is not like 00:16:3e:00:00:0a")
    for k in ("memory_mib", "vcpus"):
        v = params.get(k)
        if k in params and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise LabError("guest:create", f"xl config: {k} {v!r} is not a positive integer")
    script = params.get("vif_script")
    if script is not None and not _SCRIPT.fullmatch(str(script)):
        raise LabError("guest:create", f"xl config: vif script {script!r} is not an absolute path without ',', "
                       "'=', quotes or spaces")
    return _env.get_template("xl-linux-pv.cfg.j2").render(**{"restart_on_reboot": False, "vif_script": None,
                                                               **params})


def parse_xenstore_ls(text: str) -> dict[str, str]:
    """`xenstore-ls -f` lines ('/path/to/node = "value"') into {path: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        path, sep, value = line.partition(" = ")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out[path.strip()] = value
    return out


@dataclass(frozen=True)
class VbdInfo:
    """What xenstore says about one virtual block device."""

    domid: int
    devid: int
    vdev: str
    backend_kind: str  # "vbd" (kernel blkback) or "qdisk" (QEMU)
    backend_type: str  # "phy" for a block device target
    params: str
    physical_device: str
    state_frontend: str
    state_backend: str
    ring_page_order: int
    num_queues: int
    max_indirect_segments: int
    persistent: bool
    # what the backend offered (-1: it did not say)
    max_ring_page_order_offered: int = -1
    max_queues_offered: int = -1
    persistent_offered: bool = False

    @property
    def ring_capacity(self) -> int:
        """Request slots across all rings of this vbd."""
        return REQUESTS_PER_RING_PAGE * (1 << self.ring_page_order) * self.num_queues

    @property
    def sysfs_name(self) -> str:
        return f"vbd-{self.domid}-{self.devid}"


def vbd_info(domid: int, vdev: str, backend: dict[str, str], frontend: dict[str, str]) -> VbdInfo:
    """Combine the backend tree (/local/domain/0/backend) and the guest's frontend
    tree (/local/domain/<domid>/device) for one vdev. Raises LabError if the disk
    is not served by the kernel backend."""
    devid = VDEV_DEVID[vdev]
    fe = f"/local/domain/{domid}/device/vbd/{devid}"
    kinds = [k for k in ("vbd", "qdisk", "vbd3") if f"/local/domain/0/backend/{k}/{domid}/{devid}/state" in backend]
    # the frontend's `backend` node has no trailing slash: add one before matching
    if not kinds and any(f"/backend/qdisk/{domid}/{devid}/" in v + "/" for v in frontend.values()):
        kinds = ["qdisk"]
    if kinds != ["vbd"]:
        raise LabError(
            "guest:create",
            f"domain {domid} disk {vdev} is served by {kinds or 'no backend'}, not the dom0 kernel's blkback (vbd)",
        )
    be = f"/local/domain/0/backend/vbd/{domid}/{devid}"

    def fnode(name: str, default: str = "") -> str:
        return frontend.get(f"{fe}/{name}", default)

    queues = int(fnode("multi-queue-num-queues", "1") or 1)
    return VbdInfo(
        domid=domid,
        devid=devid,
        vdev=vdev,
        backend_kind="vbd",
        backend_type=backend.get(f"{be}/type", ""),
        params=backend.get(f"{be}/params", ""),
        physical_device=backend.get(f"{be}/physical-device", ""),
        state_frontend=fnode("state"),
        state_backend=backend.get(f"{be}/state", ""),
        ring_page_order=int(fnode("ring-page-order", "0") or 0),
        num_queues=queues,
        max_indirect_segments=int(backend.get(f"{be}/feature-max-indirect-segments", "0") or 0),
        persistent=backend.get(f"{be}/feature-persistent", "0") == "1" and fnode("feature-persistent", "0") == "1",
        max_ring_page_order_offered=int(backend.get(f"{be}/max-ring-page-order", "-1") or -1),
        max_queues_offered=int(backend.get(f"{be}/multi-queue-max-queues", "-1") or -1),
        persistent_offered=backend.get(f"{be}/feature-persistent", "0") == "1",
    )


def negotiation_problems(want: GuestCfg, info: VbdInfo, vcpus: int) -> list[str]:
    """What a connected vbd negotiated that its frontend's parameters and the
    backend's offer do not allow (-1 parameters: the driver's default, not
    checked). blkfront takes the smaller of its limit and the backend's offer,
    and no more queues than it has vCPUs; it asks for persistent grants only if
    allowed to, and both ends must agree to use them."""
    out = []
    if want.max_ring_page_order >= 0:
        offered = info.max_ring_page_order_offered
        expect = min(want.max_ring_page_order, offered) if offered >= 0 else 0
        if info.ring_page_order != expect:
            out.append(f"ring-page-order {info.ring_page_order}, expected {expect} (frontend's limit "
                       f"{want.max_ring_page_order}, backend offers {offered})")
    if want.max_queues >= 1:
        offered = info.max_queues_offered
        expect = min(want.max_queues, vcpus, offered if offered >= 1 else 1)
        if info.num_queues != expect:
            out.append(f"{info.num_queues} queue(s), expected {expect} (frontend's limit {want.max_queues}, "
                       f"{vcpus} vCPUs, backend offers {offered})")
    if want.feature_persistent == 0 and info.persistent:
        out.append("persistent grants in use although the frontend turned them off")
    if want.feature_persistent == 1 and info.persistent_offered and not info.persistent:
        out.append("persistent grants not in use although both ends offer them")
    return out


class Xl:
    def __init__(self, dom0: Runner, timeout: float) -> None:
        self.dom0 = dom0
        self.timeout = timeout

    def create_paused(self, cfg_path: str, *, timeout: float) -> None:
        self.dom0.run(["xl", "create", "-p", cfg_path], timeout=timeout).check("guest:create")

    def unpause(self, name: str) -> None:
        self.dom0.run(["xl", "unpause", name], timeout=self.timeout).check("guest:create")

    def domid(self, name: str) -> int:
        res = self.dom0.run(["xl", "domid", name], timeout=self.timeout).check("guest:create")
        return int(res.stdout.strip())

    def destroy(self, name: str) -> None:
        self.dom0.run(["xl", "destroy", name], timeout=self.timeout)

    def xenstore_raw(self, path: str) -> str:
        res = self.dom0.run(["xenstore-ls", "-f", path], timeout=self.timeout)
        return res.stdout if res.ok else ""

    def xenstore_trees(self, *paths: str) -> list[str]:
        """`xenstore-ls -f` of each path in one round trip (each costs 0.3-0.5 s
        under TCG); a path that does not exist reads as "", as in xenstore_raw."""
        res = self.dom0.run(["sh", "-c", trees_script(*paths) + "; true"], timeout=self.timeout)
        return split_trees(res.stdout if res.ok else "", len(paths))


def trees_script(*paths: str) -> str:
    """sh: `xenstore-ls -f` of each path, split_trees' input."""
    return f"; echo {_TREE_SPLIT}; ".join(f"xenstore-ls -f {shlex.quote(p)} 2>/dev/null" for p in paths)


_TREE_SPLIT = "@@lab-xenstore-tree@@"


def split_trees(out: str, n: int) -> list[str]:
    """xenstore_trees' output back into one text per path; a cut-short output
    (the transport lost) gives "" for what is missing."""
    parts = out.split(_TREE_SPLIT + "\n") if out else []
    return (parts + [""] * n)[:n]
