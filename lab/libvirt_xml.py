"""The domain XML of the `libvirt` L0 driver (lab/libvirt.py), pure: a `qemu.VmSpec`
rendered as libvirt's XML, and the facts read back from a domain XML.

One VM, two drivers: whatever `qemu.build_argv(spec)` says, this says too, in
libvirt's words where libvirt has them (machine, CPU, translation cache, memory,
virtio disks with their serials and PCI slots, serial file, lifecycle) and
through libvirt's QEMU command-line namespace where it has not; `passthrough`
lists the latter for the run's record: Xen's multiboot kernel and modules
(libvirt's <initrd> takes one path; Xen needs `-initrd "mod1 args,mod2"`), the
user network (libvirt 9 cannot say `restrict=on`), and `spec.extra`.

Every device has an explicit PCI slot, the one QEMU gives the qemu driver's i-th
-device (2+i: disks in order, then the NIC): QEMU 7.2 creates legacy `-device
a=b` options before libvirt's JSON ones, so an unaddressed passthrough NIC took
slot 2 and the first disk failed ("PCI: slot 2 function 0 not available")."""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jinja2

from lab import qemu
from lab.libvirt_host import process_start

PREFIX = "xen-blklab-"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OWNER_NS = "https://xen-blklab.invalid/libvirt/owner/1"
# PCI slots on `pc`: 00 host bridge, 01 PIIX3; QEMU gives the qemu driver's i-th
# -device slot 2+i (disks in order, then the NIC). 31 is the last slot of bus 0.
FIRST_SLOT, LAST_SLOT = 2, 31
_FEATURE = {"+": "require", "-": "disable"}


# ------------------------------------------------------------ what the XML says
def absolute(spec: qemu.VmSpec) -> qemu.VmSpec:
    """The spec with absolute paths. libvirtd and the QEMU it starts do not run in
    the lab's working directory: a relative LAB_CACHE must not reach them as is."""
    def a(p: Path) -> Path:
        return Path(os.path.abspath(p))
    return dataclasses.replace(
        spec, xen=a(spec.xen) if spec.xen is not None else None,
        modules=[(a(p), args) for p, args in spec.modules],
        drives=[dataclasses.replace(d, path=a(d.path)) for d in spec.drives],
        console_log=a(spec.console_log))


def cpu_xml(accel: str, cpu_model: str = "") -> dict[str, Any]:
    """The qemu driver's `-cpu` (qemu.accel_args: one place decides the model) in
    libvirt's words: `host` is host-passthrough, `max` the maximum mode, anything
    else a custom model; `+f`/`f=on` require a feature, `-f`/`f=off` disable it."""
    argv = qemu.accel_args(accel, cpu_model)
    model, *opts = argv[argv.index("-cpu") + 1].split(",")
    if model == "host":
        if opts:
            raise ValueError(f"-cpu host with features {opts} has no libvirt form here")
        return {"mode": "host-passthrough", "model": "", "features": []}
    features = []
    for o in opts:
        if o[:1] in _FEATURE:
            features.append({"policy": _FEATURE[o[0]], "name": o[1:]})
        elif o.endswith(("=on", "=off")):
            name, _, value = o.partition("=")
            features.append({"policy": "require" if value == "on" else "disable", "name": name})
        else:
            raise ValueError(f"CPU option {o!r} of {cpu_model!r} has no libvirt form (only +f, -f, f=on, f=off)")
    if model == "max":
        return {"mode": "maximum", "model": "", "features": features}
    return {"mode": "custom", "model": model, "features": features}


def tb_cache_mib(accel: str) -> int | None:
    """The qemu driver's TCG translation cache (tb-size, MiB), read from its own
    -accel so the two drivers cannot drift. `thread=multi` has no libvirt form
    and needs none: QEMU 7.2 runs x86 guests on x86 hosts multi-threaded by
    default (measured: one `CPU n/TCG` thread per vCPU under libvirt)."""
    argv = qemu.accel_args(accel)
    m = re.search(r"(?:^|,)tb-size=(\d+)", argv[argv.index("-accel") + 1])
    return int(m.group(1)) if m else None


def _slot(i: int) -> int:
    slot = FIRST_SLOT + i
    if slot > LAST_SLOT:
        raise ValueError(f"device {i} needs PCI slot {slot}: bus 0 ends at {LAST_SLOT}")
    return slot


def nic_args(spec: qemu.VmSpec) -> list[str]:
    """qemu.net_args (user networking, restrict=on, SSH forward on 127.0.0.1) with
    the NIC's slot said: the slot the qemu driver's NIC gets, after the disks."""
    argv = qemu.net_args(spec.ssh_port)
    argv[-1] += f",addr=0x{_slot(len(spec.drives)):02x}"
    return argv


def passthrough(spec: qemu.VmSpec) -> list[str]:
    """What libvirt cannot say, as QEMU arguments: the run's record keeps it."""
    spec = absolute(spec)
    return [
        *(qemu.multiboot_args(xen=spec.xen, xen_cmdline=spec.xen_cmdline, modules=spec.modules)
          if spec.xen is not None else []),
        *(nic_args(spec) if spec.network else []),
        *spec.extra,
    ]


def _target(i: int) -> str:
    """vda, vdb, ..., vdz, vdaa: libvirt's names (a hint; the guest numbers disks
    in PCI order, which the slots fix)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return "vd" + s


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("lab", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_domain_xml(spec: qemu.VmSpec, *, name: str, uuid: str,
                      owner: tuple[int, int] | None = None) -> str:
    """The domain that `qemu.build_argv(spec)` is. Pure. `owner`: (pid, start
    time in clock ticks) of the lab process that owns the domain; this process if
    None. `spec.qmp_sock` is not used: libvirt owns QEMU's monitor (`LibvirtVm.qmp`)."""
    spec = absolute(spec)
    pid, start = owner if owner is not None else (os.getpid(), process_start(os.getpid()) or 0)
    disks = [{"path": str(d.path), "serial": d.serial, "fmt": d.fmt, "readonly": d.readonly, "boot": d.boot,
              "target": _target(i), "slot": _slot(i)} for i, d in enumerate(spec.drives)]
    if spec.network:
        _slot(len(spec.drives))  # refuse a NIC without a slot before rendering
    return _env().get_template("libvirt-domain.xml.j2").render(
        domain_type={"tcg": "qemu", "kvm": "kvm"}[spec.accel], name=name, uuid=uuid,
        owner_ns=OWNER_NS, owner_pid=pid, owner_start=start, memory_mib=spec.memory_mib, cpus=spec.cpus,
        tb_cache_mib=tb_cache_mib(spec.accel) if spec.accel == "tcg" else None,
        cpu=cpu_xml(spec.accel, spec.cpu_model), disks=disks, console_log=str(spec.console_log),
        passthrough=passthrough(spec))


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def _mib(el: ET.Element | None) -> int | None:
    if el is None or el.text is None:
        return None
    return int(el.text) * _UNITS[el.get("unit", "KiB").lower()] // (1 << 20)  # libvirt's default unit: KiB


def _attr(el: ET.Element | None, name: str) -> str | None:
    return None if el is None else el.get(name)


def parse_domain_xml(text: str) -> dict[str, Any]:
    """The facts of a domain XML (ours, or libvirt's live one) a test or a record
    compares with the VmSpec."""
    root = ET.fromstring(text)
    cpu = root.find("cpu")
    tb = root.find("features/tcg/tb-cache")
    owner = root.find(f"metadata/{{{OWNER_NS}}}owner")
    serial = root.find("devices/serial")
    disks = []
    for d in root.findall("devices/disk"):
        drv, src, tgt, addr = d.find("driver"), d.find("source"), d.find("target"), d.find("address")
        boot, alias = d.find("boot"), d.find("alias")
        disks.append({
            "path": src.get("file") if src is not None else None,
            "format": drv.get("type") if drv is not None else None,
            "cache": drv.get("cache") if drv is not None else None,
            "discard": drv.get("discard") if drv is not None else None,
            "serial": d.findtext("serial"), "readonly": d.find("readonly") is not None,
            "boot_order": int(boot.get("order", "0")) if boot is not None else None,
            "alias": alias.get("name") if alias is not None else None,
            "target": tgt.get("dev") if tgt is not None else None, "bus": tgt.get("bus") if tgt is not None else None,
            "slot": int(addr.get("slot", "-1"), 0) if addr is not None else None,
        })
    return {
        "name": root.findtext("name"), "uuid": root.findtext("uuid"), "type": root.get("type"),
        "machine": _attr(root.find("os/type"), "machine"),
        "memory_mib": _mib(root.find("memory")), "cpus": int(root.findtext("vcpu") or 0),
        "cpu": None if cpu is None else {
            "mode": cpu.get("mode"), "check": cpu.get("check"), "model": cpu.findtext("model"),
            "features": {f.get("name"): f.get("policy") for f in cpu.findall("feature")}},
        "tb_cache_mib": _mib(tb), "acpi": root.find("features/acpi") is not None,
        "on_poweroff": root.findtext("on_poweroff"), "on_reboot": root.findtext("on_reboot"),
        "on_crash": root.findtext("on_crash"), "disks": disks,
        "console": None if serial is None else {"type": serial.get("type"),
                                                "path": _attr(serial.find("log"), "file"),
                                                "append": _attr(serial.find("log"), "append"),
                                                "virsh_console": root.find("devices/console[@type='pty']") is not None},
        "usb": [c.get("model") for c in root.findall("devices/controller[@type='usb']")],
        "memballoon": [m.get("model") for m in root.findall("devices/memballoon")],
        "graphics": len(root.findall("devices/graphics")), "interfaces": len(root.findall("devices/interface")),
        "passthrough": [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")],
        "owner": None if owner is None else {"pid": int(owner.get("pid", "0")), "start": int(owner.get("start", "0")),
                                             "kept": owner.get("kept") == "yes"},
    }
