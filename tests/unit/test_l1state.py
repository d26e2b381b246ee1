"""Warm-start keys and the life of a saved state (no VM: the save/restore itself
is shown by tests/e2e/test_default.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lab import l1state, qemu


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(qemu, "qemu_version", lambda: "QEMU emulator version 7.2.0 (test)")
    monkeypatch.setattr(l1state.shutil, "which", lambda name: str(tmp_path / "qemu-bin"))
    (tmp_path / "qemu-bin").write_bytes(b"qemu")
    return tmp_path


def _files(tmp: Path) -> dict[str, Path]:
    out = {}
    for name, data in (("xen", b"xen"), ("vmlinuz", b"kernel"), ("initrd", b"initrd"), ("root.img", b"root")):
        p = tmp / "img-abc" / name
        p.parent.mkdir(exist_ok=True)
        if not p.exists():  # made once: a rewrite is a change of input
            p.write_bytes(data)
        out[name] = p
    return out


def _spec(tmp: Path, *, port: int = 1000, where: str = "a", cmdline: str = "console=hvc0",
          memory: int = 1536) -> tuple[qemu.VmSpec, list[l1state.Slot]]:
    f = _files(tmp)
    slots = [l1state.Slot("dom0-root", "lab-dom0-root", base=f["root.img"]),
             l1state.Slot("lin1-xvdb", "lab-lin1-xvdb", size=1 << 30)]
    drives = [qemu.Drive(tmp / where / f"{s.name}.qcow2", s.serial) for s in slots]
    drives.append(qemu.Drive(tmp / where / "boot.img", "lab-boot", fmt="raw", readonly=True))
    spec = qemu.VmSpec(
        accel="tcg", cpus=2, memory_mib=memory, xen=f["xen"], xen_cmdline="console=com1",
        modules=[(f["vmlinuz"], cmdline), (f["initrd"], "")], drives=drives, ssh_port=port,
        console_log=tmp / where / "console.log", qmp_sock=tmp / where / "qmp.sock",
    )
    return spec, slots


def _key(spec: qemu.VmSpec, slots: list[l1state.Slot]) -> str:
    return l1state.state_key(l1state.key_inputs(spec, slots))


def test_key_ignores_what_changes_every_run(cache: Path) -> None:
    """Ports and per-run file paths shall not change the key (every run has new ones)."""
    a = _key(*_spec(cache, port=1000, where="run1"))
    b = _key(*_spec(cache, port=2000, where="run2"))
    assert a == b


@pytest.mark.parametrize("change", ["cmdline", "memory", "kernel", "slot_size", "xen_cmdline", "cpu", "qemu"])
def test_key_changes_with_every_input(cache: Path, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any input that decides what the saved state holds shall change the key."""
    spec, slots = _spec(cache)
    before = _key(spec, slots)
    if change == "cmdline":
        spec, slots = _spec(cache, cmdline="console=hvc0 loglevel=8")
    elif change == "memory":
        spec, slots = _spec(cache, memory=2048)
    elif change == "kernel":
        os.utime(spec.modules[0][0], ns=(1, 1))
        spec.modules[0][0].write_bytes(b"another kernel")
    elif change == "slot_size":
        slots = [slots[0], dataclasses.replace(slots[1], size=2 << 30)]
    elif change == "xen_cmdline":
        spec = dataclasses.replace(spec, xen_cmdline="console=com1 loglvl=all")
    elif change == "cpu":
        spec = dataclasses.replace(spec, cpu_model="qemu64,+svm")
    elif change == "qemu":
        monkeypatch.setattr(qemu, "qemu_version", lambda: "QEMU emulator version 8.0.0")
    assert _key(spec, slots) != before


def test_an_unfinished_state_is_never_found(cache: Path) -> None:
    """A state being built (or left by a run that died) shall not be loadable."""
    st = l1state.begin("k1")
    (st.dir / "l1.state").write_bytes(b"x")
    (st.dir / "meta.json").write_text("{}")
    assert l1state.find("k1") is None


@pytest.mark.parametrize("verdict,kept", [("PASS", True), ("HANG", True), ("FAIL", True),
                                          ("ERROR", False), ("CRASH", False)])
def test_promotion_only_after_a_decision(cache: Path, verdict: str, kept: bool) -> None:
    """A state shall be kept only when the run that saved it reached PASS, FAIL or HANG."""
    st = l1state.begin("k2")
    (st.dir / "l1.state").write_bytes(b"x")
    (st.dir / "meta.json").write_text("{}")
    res = l1state.promote(st, verdict)
    assert (res is not None) == kept
    assert (l1state.find("k2") is not None) == kept
    assert not st.dir.exists()


def test_stale_building_dirs_of_dead_runs_are_removed(cache: Path) -> None:
    root = l1state.states_dir()
    root.mkdir(parents=True)
    dead = root / ".k3.building-999999999"  # no such PID
    dead.mkdir()
    alive = root / f".k4.building-{os.getppid()}"
    alive.mkdir()
    l1state.begin("k5")
    assert not dead.exists()
    assert alive.exists()


def test_list_and_remove(cache: Path) -> None:
    st = l1state.begin("0123456789abcdef0123")
    (st.dir / "l1.state").write_bytes(b"x" * 4096)
    (st.dir / "meta.json").write_text('{"created": 1}')
    l1state.promote(st, "PASS")
    listed = l1state.list_states()
    assert [s["key"] for s in listed] == ["0123456789abcdef0123"] and listed[0]["bytes"] >= 4096
    assert l1state.remove("0123456789abcdef0123") and not l1state.remove("0123456789abcdef0123")
    assert l1state.list_states() == []
