"""Does KVM really work here? /dev/kvm existing proves nothing: on PVM hosts (no
hardware nesting) a stock kernel hangs after the BIOS and Xen dies on its first
shadow-stack instruction (facts/xen-under-qemu.md). So boot the lab's own Xen and
dom0 kernel under KVM and see whether dom0's kernel banner shows; cache the answer
per host (kernel, QEMU, CPU, Xen binary)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from lab import cache as lab_cache
from lab import console, images, qemu
from lab.errors import LabError
from lab.timing import Deadline

PROBE_SECONDS = 45  # a working KVM reaches dom0's banner in a few seconds


def host_key(xen: Path) -> str:
    cpu = ""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    modules = ""
    try:
        modules = " ".join(sorted(line.split()[0] for line in Path("/proc/modules").read_text().splitlines()
                                  if line.startswith("kvm")))
    except OSError:
        pass
    h = hashlib.sha256("|".join([platform.release(), qemu.qemu_version(), cpu, modules]).encode())
    h.update(xen.read_bytes())
    return h.hexdigest()[:16]


def kvm_works(xen: Path, kernel: Path, initrd: Path) -> tuple[bool, str]:
    why = qemu.kvm_usable_quick()
    if why:
        return False, f"TCG: {why}"
    cache = images.cache_dir() / "kvm-probe.json"
    key = host_key(xen)
    try:
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            return known["ok"], known["why"] + " (cached probe)"
    except (OSError, ValueError, KeyError):
        pass
    ok, why = _probe(xen, kernel, initrd)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # aside, then renamed: a run reading the answer while another writes it sees
    # a whole file (a torn one would read as "no answer" and probe again)
    tmp = lab_cache.aside(cache)
    try:
        tmp.write_text(json.dumps({"key": key, "ok": ok, "why": why, "at": time.time()}))
        tmp.replace(cache)
    finally:
        tmp.unlink(missing_ok=True)
    return ok, why


def _probe(xen: Path, kernel: Path, initrd: Path) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="lab-kvmprobe-") as d:
        w = Path(d)
        spec = qemu.VmSpec(
            accel="kvm", cpus=1, memory_mib=1024, xen=xen,
            xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=512M loglvl=warning noreboot",
            modules=[(kernel, "console=hvc0 earlyprintk=xen"), (initrd, "")], drives=[],
            ssh_port=qemu.free_port(), console_log=w / "serial.log", qmp_sock=w / "qmp.sock",
        )
        t = time.monotonic()
        try:
            vm = qemu.start(spec, w / "stderr.log")
        except (LabError, OSError, subprocess.SubprocessError) as e:
            return False, f"TCG: QEMU with -accel kvm failed to start ({str(e).splitlines()[0]})"
        try:
            c = console.Console(spec.console_log, "probe")
            # QEMU reports a KVM emulation failure on stderr and freezes the VM:
            # treat that as "dead" instead of waiting out the probe's deadline.
            def alive() -> bool:
                return vm.alive() and "KVM internal error" not in vm.stderr_tail(50)

            c.wait_for(console.DOM0_KERNEL, Deadline(PROBE_SECONDS), alive=alive)
            return True, f"KVM: the lab's Xen booted dom0 under KVM in {time.monotonic() - t:.1f}s"
        except LabError as e:
            err = vm.stderr_tail(3).replace("\n", " ")
            return False, f"TCG: KVM probe failed ({e.message}{'; ' + err if err else ''})"
        finally:
            vm.stop()
