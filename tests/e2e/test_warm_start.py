"""Warm start edge cases on the real stack (nightly: each costs a cold boot)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import l1state, scenario
from lab.pytest_plugin import LabRun

pytestmark = pytest.mark.nightly


def _variant(tmp_path: Path, extra_cmdline: str) -> Path:
    """The default scenario with dom0's command line changed: a new L1 key."""
    raw = scenario.to_toml(scenario.load("default")).replace(
        'cmdline = "console=hvc0 earlyprintk=xen quiet"', f'cmdline = "console=hvc0 earlyprintk=xen quiet {extra_cmdline}"')
    raw = raw.replace('name = "default"', 'name = "default-variant"')
    p = tmp_path / "variant.toml"
    p.write_text(raw)
    return p


def test_changed_input_means_cold_boot_and_new_state(lab_run: LabRun, tmp_path: Path) -> None:
    """A different dom0 command line shall not restore the default's state: the
    record shows a cold boot and a new state, which the next run restores."""
    sc = scenario.load(_variant(tmp_path, f"lab.nonce={secrets.token_hex(4)}"))
    rec = lab_run(sc)
    try:
        assert rec["verdict"] == "PASS", rec.get("summary")
        assert rec["l1"]["start"] == "cold" and rec["l1"]["state_kept"]
        rec2 = lab_run(sc)
        assert rec2["verdict"] == "PASS"
        assert rec2["l1"]["start"] == "restored" and rec2["l1"]["key"] == rec["l1"]["key"]
    finally:
        l1state.remove(rec["l1"]["key"])


def test_interrupt_during_save_leaves_no_state(results: Path, tmp_path: Path) -> None:
    """Ctrl-C while the L1 state is being written shall leave no state a later
    run would load, and nothing running."""
    path = _variant(tmp_path, f"lab.nonce={secrets.token_hex(4)}")
    root = results / f"interrupt-save-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", str(path), "--results", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    building = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and building is None:
            for d in l1state.states_dir().glob(f".*.building-{proc.pid}"):
                if (d / "l1.state").exists():  # the migration has begun writing
                    building = d
            time.sleep(0.05)
        assert building is not None, "never reached the save"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    key = building.name.split(".")[1]
    assert not building.exists(), out
    assert l1state.find(key) is None
    rec = json.loads(((root / "latest").resolve() / "record.json").read_text())
    assert rec["verdict"] == "ERROR" and "interrupted" in rec["error"]
    qemu_pid = rec["qemu"]["pid"]
    assert not Path(f"/proc/{qemu_pid}").exists()
