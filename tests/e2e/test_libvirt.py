"""The libvirt L0 driver on the real stack (issue 15): the Xen VM as a transient
libvirt domain rendered from the same VmSpec. `default` through libvirt shall
PASS and `stall` through libvirt shall be a HANG, with the record saying which
driver ran, the domain's name and uuid, what went through the passthrough, the
domain XML kept beside qemu-argv.json, and no domain and no overlay of the run
left once it is over.

The first run with no libvirt state of its L1 boots cold and saves one (libvirt's
save: the domain stops; then restored at once onto new overlays, the run going
on in a new QEMU); the next restores it. Either order is checked where it ran.

Skipped, saying why, without the libvirt packages or libvirt-python (`make deps
venv`), without root, or when libvirt's QEMU user (libvirt-qemu) cannot reach
the lab's cache: it cannot enter /root, where the default LAB_CACHE
(~/.cache/xen-blklab) lives. Run them with a cache it can reach, e.g.

    LAB_CACHE=/var/cache/xen-blklab .venv/bin/python -m pytest tests/e2e/test_libvirt.py -v

(the images are built there on first use; or move the existing cache there and
point LAB_CACHE at it: saved states and images keep their keys)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import images, libvirt_host, pipeline, scenario
from lab.errors import LabError
from lab.libvirt import PREFIX, parse_domain_xml
from lab.pytest_plugin import LabRun

URI = "qemu:///system"


def _why_skip() -> str | None:
    path = "/usr/sbin:/sbin:" + os.environ.get("PATH", "")
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool, path=path) is None:
            return (f"{tool} is missing: the libvirt driver needs libvirt-daemon-system, libvirt-daemon-driver-qemu "
                    "and libvirt-clients (`make deps`)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not importable: `make deps venv` (it builds against libvirt-dev)"
    if os.geteuid() != 0:
        return "qemu:///system and its daemons need root"
    cache = Path(os.path.abspath(images.cache_dir()))
    user = libvirt_host.qemu_user()
    try:
        libvirt_host.check_readable([libvirt_host.Need(cache, "LAB_CACHE", False)], user=user)
    except LabError as e:
        return (f"LAB_CACHE={cache} is out of reach of libvirt's QEMU user {user}: {e.message} "
                "(LAB_CACHE=/var/cache/xen-blklab runs these tests)")
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")


def _through_libvirt(name: str) -> scenario.Scenario:
    sc = scenario.load(name)
    return dataclasses.replace(sc, lab=dataclasses.replace(sc.lab, driver="libvirt"))


def _virsh_uuids() -> set[str]:
    res = subprocess.run(["virsh", "-c", URI, "list", "--all", "--uuid"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return {line.strip() for line in res.stdout.splitlines() if line.strip()}


def _check_libvirt_record(rec: dict) -> None:
    """The record says the libvirt driver ran which domain, with what passed
    through; the domain XML is kept; nothing of the run is left afterwards."""
    d = Path(rec["results_dir"])
    l0 = rec["l0"]
    assert l0["driver"] == "libvirt" and l0["uri"] == URI, l0
    name, uuid = l0["domain"]["name"], l0["domain"]["uuid"]
    assert name.startswith(PREFIX) and re.fullmatch(r"[0-9a-f-]{36}", uuid), l0
    assert l0["domain_xml"] == "domain.xml" and (d / "qemu-argv.json").is_file()
    xml = parse_domain_xml((d / "domain.xml").read_text())
    assert (xml["name"], xml["uuid"]) == (name, uuid)
    # Xen's multiboot kernel and modules and the restricted user network go through
    # <qemu:commandline>: the record says so, and QEMU got them
    assert l0["passthrough"][0] == "-kernel" and "-initrd" in l0["passthrough"], l0
    assert any("restrict=on" in a for a in l0["passthrough"])
    argv = json.loads((d / "qemu-argv.json").read_text())
    assert Path(argv[0]).name == "qemu-system-x86_64" and "-kernel" in argv, argv[:4]
    assert l0["daemons"]["daemons"] and all(x["action"] in ("already running", "was starting", "started")
                                            for x in l0["daemons"]["daemons"]), l0["daemons"]
    if rec["l1"]["start"] == "cold" and rec["l1"].get("state_kept"):
        # the state was saved through libvirt and the run went on in a restored domain
        assert l0["restarted"]["restore_s"] > 0 and (d / "domain-restored.xml").is_file(), l0
        assert rec["qemu"]["pid"] == l0["restarted"]["qemu_pid"]
    assert "restore_failed" not in rec["l1"], rec["l1"]
    # nothing of the run left: no domain defined or running, no work directory (its overlays)
    assert uuid not in _virsh_uuids()
    for w in pipeline.runs_dir().glob("run-*"):
        owner = w / "owner.json"
        assert not (owner.is_file() and json.loads(owner.read_text()).get("results") == str(d)), w


def test_default_through_libvirt_passes(lab_run: LabRun) -> None:
    """`default` with the Xen VM as a libvirt domain shall PASS as it does under
    the qemu driver, leaving no domain and no overlay behind."""
    rec = lab_run(_through_libvirt("default"))
    print(json.dumps({k: rec.get(k) for k in ("verdict", "summary", "l0", "l1", "phases")}, indent=1, default=str))
    assert rec["verdict"] == "PASS", json.dumps(rec, indent=1, default=str)[:4000]
    _check_libvirt_record(rec)
    wl = rec["workloads"][0]
    assert wl["outstanding"] >= 4 * wl["ring_capacity"] and wl["result"]["errors"] == 0
    vbd = rec["guests"]["lin1"]["vbds"]["xvdb"]
    assert vbd["backend_kind"] == "vbd"


def test_stall_through_libvirt_is_a_hang(lab_run: LabRun) -> None:
    """`stall` through libvirt shall be a HANG within the stall window, as under
    the qemu driver: the driver changes how L1 runs, never the verdict."""
    sc = scenario.load("stall")
    rec = lab_run(_through_libvirt("stall"))
    print(json.dumps({k: rec.get(k) for k in ("verdict", "summary", "hang", "l0", "l1")}, indent=1, default=str))
    assert rec["verdict"] == "HANG", rec.get("summary")
    hang = rec["hang"]
    assert hang["detected_after_from"] == "fault stall"
    assert 0 < hang["detected_after_s"] <= sc.watchdog.stall_window + sc.watchdog.interval + 3, hang
    _check_libvirt_record(rec)
