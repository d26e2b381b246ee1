"""lab/console.py: crash signatures and boot milestones, on the serial log of a real
`lab run default` and on crafted consoles. Each wait is bounded by a Deadline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from labdata import DATA

from lab import console
from lab.console import DOM0_INIT, DOM0_KERNEL, GUEST_READY, XEN_BANNER, Console
from lab.errors import LabError
from lab.timing import Deadline

XEN_LOG = DATA / "console-xen-default.log"
GUEST_LOG = DATA / "console-lin1-default.log"


# ------------------------------------------------------------ crash signatures
@pytest.mark.parametrize(
    ("text", "kind", "line"),
    [
        (b"[   42.123456] Kernel panic - not syncing: Fatal exception in interrupt\n[   42.2] ---[ end ]---\n",
         "Linux panic", "Kernel panic - not syncing: Fatal exception in interrupt"),
        (b"(XEN) ****************************************\n(XEN) Panic on CPU 0:\n(XEN) FATAL PAGE FAULT\n",
         "Xen panic", "(XEN) Panic on CPU 0"),
        (b"[  101.5] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [fio:412]\n",
         "soft lockup", "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [fio:412]"),
        (b"[   55.0] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1\n", "hard lockup",
         "Watchdog detected hard LOCKUP on cpu 1"),
        (b"[    9.9] BUG: unable to handle page fault for address: ffff888000000000\n", "Linux oops",
         "BUG: unable to handle page fault for address: ffff888000000000"),
        (b"[    9.9] kernel BUG at drivers/block/xen-blkback/blkback.c:1000!\n", "Linux BUG",
         "kernel BUG at drivers/block/xen-blkback/blkback.c:1000!"),
        (b"(XEN) FATAL TRAP: vector = 14 (page fault)\n", "Xen fatal trap", "(XEN) FATAL TRAP: vector = 14 (page fault)"),
        (b"Fatal trap 12: page fault while in kernel mode\n", "FreeBSD fatal trap",
         "Fatal trap 12: page fault while in kernel mode"),
        (b"panic: vm_fault: fault on nofault entry\n", "FreeBSD panic", "panic: vm_fault: fault on nofault entry"),
        # how Linux 6.1 prints a BUG(): the trap's name, then the oops header
        (b"[   40.2] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI\n", "Linux BUG (invalid opcode)",
         "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"),
        (b"[   12.0] INFO: task xenwatch:45 blocked for more than 120 seconds.\n", "hung task",
         "INFO: task xenwatch:45 blocked for more than 120 seconds."),
        (b"[    7.0] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP\n",
         "Linux general protection fault",
         "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP"),
        (b"[    8.0] BUG: scheduling while atomic: xenwatch/45/0x00000002\n", "Linux BUG",
         "BUG: scheduling while atomic: xenwatch/45/0x00000002"),
        # a WARN in the block path, by its file or by the module in the splat
        (b"[   50.1] WARNING: CPU: 1 PID: 45 at drivers/block/xen-blkback/xenbus.c:312 xen_blkif_disconnect+0x1/0x2\n",
         "Linux WARNING in the block path",
         "WARNING: CPU: 1 PID: 45 at drivers/block/xen-blkback/xenbus.c:312 xen_blkif_disconnect+0x1/0x2"),
        (b"[   50.1] WARNING: CPU: 1 PID: 45 at mm/slab.c:9 kfree+0x1/0x2\n[   50.1] Modules linked in: ext4\n"
         b"[   50.1] Call Trace:\n[   50.1]  xen_blkbk_free_caches+0x3/0x9 [xen_blkback]\n",
         "Linux WARNING in the block path", "WARNING: CPU: 1 PID: 45 at mm/slab.c:9 kfree+0x1/0x2"),
    ],
)
def test_find_crash_shall_name_the_kind_and_the_line(text: bytes, kind: str, line: str) -> None:
    assert console.find_crash(b"boot ok\nsome line\n" + text) == (kind, line)


def test_find_crash_shall_report_the_first_signature_in_the_text() -> None:
    text = (b"[ 3.0] Oops: 0002 [#1] PREEMPT SMP NOPTI\n[ 3.1] more\n"
            b"[ 3.2] Kernel panic - not syncing: Fatal exception\n")
    assert console.find_crash(text) == ("Linux oops", "Oops: 0002 [#1] PREEMPT SMP NOPTI")


@pytest.mark.parametrize("log", [XEN_LOG, GUEST_LOG], ids=["xen", "lin1"])
def test_find_crash_shall_find_nothing_on_a_healthy_run(log: Path) -> None:
    assert console.find_crash(log.read_bytes()) is None


@pytest.mark.parametrize(
    "text",
    [
        b"[    0.000000] Kernel command line: console=hvc0 panic=10 oops=panic\n",
        # a WARN elsewhere, even with blkback among the loaded modules
        b"[ 5.0] WARNING: CPU: 0 PID: 1 at mm/slab.c:9 kfree+0x1/0x2\n[ 5.0] Modules linked in: xen_blkback\n",
        b"[ 5.0] hung_task_timeout_secs: 120\n",
        b"(XEN) Xen version 4.17.7 (Debian)\n(XEN) Bootloader: qemu\n",
        b"",
    ],
)
def test_find_crash_shall_ignore_lookalikes(text: bytes) -> None:
    assert console.find_crash(text) is None


def test_tail_text_shall_give_the_last_lines_without_carriage_returns() -> None:
    data = b"".join(b"line %d\r\n" % i for i in range(100))
    tail = console.tail_text(data, 3)
    assert tail == "line 97\nline 98\nline 99"
    assert console.tail_text(b"\xff\xfebad\n", 5) == "\ufffd\ufffdbad"


# ------------------------------------------------------------ milestones
@pytest.fixture
def xen_log(tmp_path: Path) -> Path:
    dst = tmp_path / "console-xen.log"
    shutil.copyfile(XEN_LOG, dst)
    return dst


def test_wait_for_shall_find_the_boot_milestones_in_order(xen_log: Path) -> None:
    con = Console(xen_log, "xen")
    data = xen_log.read_bytes()
    positions = []
    for m in (XEN_BANNER, DOM0_KERNEL, DOM0_INIT):
        t0 = time.monotonic()
        t = con.wait_for(m, Deadline(5))
        assert t0 <= t <= time.monotonic()
        positions.append(con.pos)
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert data[:positions[0]].endswith(b"Xen version 4.17")
    assert data.index(b"lab-dom0: ready") + len(b"lab-dom0: ready") == positions[2]


def test_wait_for_shall_only_look_past_the_last_milestone(xen_log: Path) -> None:
    con = Console(xen_log, "xen")
    con.wait_for(DOM0_INIT, Deadline(5))
    with pytest.raises(LabError) as e:
        con.wait_for(XEN_BANNER, Deadline(0.3))  # the banner is before the current position
    assert e.value.stage == "boot:xen"


def test_wait_for_shall_see_lines_appended_while_waiting(tmp_path: Path) -> None:
    log = tmp_path / "console-guest.log"
    log.write_bytes(b"lab-initramfs: root /dev/xvda mounted, starting /sbin/lab-init\n")
    con = Console(log, "guest lin1")
    import threading

    def append() -> None:
        time.sleep(0.3)
        with open(log, "ab") as f:
            f.write(GUEST_LOG.read_bytes().splitlines(keepends=True)[-1])

    th = threading.Thread(target=append)
    th.start()
    t0 = time.monotonic()
    con.wait_for(GUEST_READY, Deadline(5))
    th.join()
    assert 0.25 <= time.monotonic() - t0 < 3


def test_wait_for_shall_raise_with_stage_and_tail_on_the_deadline(tmp_path: Path) -> None:
    """Xen booted but dom0's init never reported: stage boot:dom0, with the console tail."""
    lines = XEN_LOG.read_bytes().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines) if b"lab-dom0: ready" in ln)
    log = tmp_path / "console-xen.log"
    log.write_bytes(b"".join(lines[:cut]))
    con = Console(log, "xen")
    t0 = time.monotonic()
    with pytest.raises(LabError) as e:
        con.wait_for(DOM0_INIT, Deadline(0.3))
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2
    assert e.value.stage == "boot:dom0"
    assert "dom0's init to report ready" in e.value.message and "xen console" in e.value.message
    assert "Starting Xen daemons" in e.value.tail, "the last console line is quoted"
    assert "--- console tail ---" in str(e.value)
    assert len(e.value.tail.splitlines()) == 30


def test_wait_for_shall_raise_at_once_on_a_lab_fatal_line(tmp_path: Path) -> None:
    log = tmp_path / "console-xen.log"
    log.write_bytes(b"(XEN) Xen version 4.17.7\nlab-initramfs: FATAL: no root device /dev/vda\n")
    con = Console(log, "xen")
    con.wait_for(XEN_BANNER, Deadline(5))
    t0 = time.monotonic()
    with pytest.raises(LabError) as e:
        con.wait_for(DOM0_INIT, Deadline(30))
    assert time.monotonic() - t0 < 1
    assert e.value.stage == "boot:dom0"
    assert "lab-initramfs: FATAL: no root device /dev/vda" in e.value.message


def _fails_at_once(tmp_path: Path, text: bytes, **kw: object) -> LabError:
    """Waiting for dom0's kernel on a console holding `text` shall fail within a
    second (not at the 30 s deadline); returns the error."""
    log = tmp_path / "console-xen.log"
    log.write_bytes(text)
    con = Console(log, "xen")
    t0 = time.monotonic()
    with pytest.raises(LabError) as e:
        con.wait_for(DOM0_KERNEL, Deadline(30), **kw)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 1
    assert e.value.stage == "boot:dom0"
    return e.value


def test_wait_for_shall_raise_at_once_on_a_crash(tmp_path: Path) -> None:
    err = _fails_at_once(tmp_path, b"(XEN) Xen version 4.17.7\n(XEN) Panic on CPU 1:\n(XEN) Assertion failed\n")
    assert "Xen panic" in err.message
    assert "Assertion failed" in err.tail


def test_wait_for_shall_raise_at_once_when_the_vm_is_gone(tmp_path: Path) -> None:
    err = _fails_at_once(tmp_path, b"(XEN) Xen version 4.17.7\n", alive=lambda: False)
    assert "exited" in err.message


def test_wait_for_shall_wait_for_a_console_file_not_yet_created(tmp_path: Path) -> None:
    con = Console(tmp_path / "not-yet.log", "xen")
    assert con.read_all() == b"" and con.size() == 0 and con.tail() == ""
    with pytest.raises(LabError) as e:
        con.wait_for(XEN_BANNER, Deadline(0.2))
    assert e.value.stage == "boot:xen" and "Xen banner" in e.value.message
