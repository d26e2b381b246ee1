"""Nothing outlives a run: Ctrl-C (and SIGTERM) in the middle of the workload
tears everything down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import images


def _interrupt_mid_workload(results: Path, sig: int) -> None:
    env = {**os.environ}
    root = results / f"interrupt-{sig}-{time.time_ns()}"  # a fresh root: `latest` must be this run
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "run", "default", "--results", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    run_dir = None
    qemu_pid = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:  # the workload has begun once dom0's sampler writes
            latest = root / "latest"
            if latest.exists():
                run_dir = latest.resolve()
                if (run_dir / "samples-dom0.jsonl").exists():
                    break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(1)
        else:
            pytest.fail("the workload never started")
        owner = [json.loads((d / "owner.json").read_text()) for d in (images.cache_dir() / "runs").glob("run-*")
                 if (d / "owner.json").exists()]
        mine = [o for o in owner if o["pid"] == proc.pid]
        assert mine and mine[0]["qemu_pid"], owner
        qemu_pid = mine[0]["qemu_pid"]
        time.sleep(3)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (130, 143, -sig, 4), out
    assert "torn down" in out or proc.returncode == 4, out
    # QEMU is gone (not merely a zombie), and so is the run's work directory
    assert not Path(f"/proc/{qemu_pid}").exists() or "Z" in Path(f"/proc/{qemu_pid}/stat").read_text().split()[2]
    leftovers = [d for d in (images.cache_dir() / "runs").glob("run-*")
                 if (d / "owner.json").exists() and json.loads((d / "owner.json").read_text())["pid"] == proc.pid]
    assert leftovers == []
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["verdict"] == "ERROR" and "interrupted" in rec["error"], rec


def test_ctrl_c_mid_workload_leaves_nothing(results: Path) -> None:
    """SIGINT during fio shall stop QEMU, remove the overlays and still write a
    record that says the run was interrupted."""
    _interrupt_mid_workload(results, signal.SIGINT)


@pytest.mark.nightly
def test_sigterm_mid_workload_leaves_nothing(results: Path) -> None:
    _interrupt_mid_workload(results, signal.SIGTERM)
