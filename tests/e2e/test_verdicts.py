"""The verdict never lies, on the real stack: each path below is forced for real
and shall end in the verdict that describes it. A crash anywhere is CRASH even
when the workload passed; the lab losing its own sampler or transport is ERROR
(bisect: skip), never HANG or FAIL; a backend that refuses the test disk is
FAIL (the guests boot from their initramfs, so they come up without it), and
`lab bisect` names the commit that made it refuse."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from blkback_series import make_series  # noqa: E402

from lab import bisect, cli, images  # noqa: E402
from lab.backend import LinuxBackendBuilder, pristine_tree  # noqa: E402
from lab.observe import Started  # noqa: E402
from lab.pytest_plugin import LabRun  # noqa: E402

OOPS_C = """#include <linux/module.h>
#include <linux/bug.h>

/* xen-blklab's e2e test: a kernel BUG in a guest, which keeps running */
static int __init lab_oops_init(void)
{
\tpr_crit("lab_oops: BUG() now\\n");
\tBUG();
\treturn 0;
}
module_init(lab_oops_init);
MODULE_LICENSE("GPL");
"""


def _after(seconds: float, fn: object) -> None:
    def go() -> None:
        time.sleep(seconds)
        fn()  # type: ignore[operator]

    threading.Thread(target=go, daemon=True).start()


def _oops_module(tmp: Path) -> Path:
    """A module whose init runs BUG(), built against the guest kernel's headers."""
    abi = images.ensure_image("linux-guest").manifest["kernel_abi"]
    b = LinuxBackendBuilder(abi)
    b.ensure_headers()
    (tmp / "lab_oops.c").write_text(OOPS_C)
    (tmp / "Kbuild").write_text("obj-m := lab_oops.o\n")
    subprocess.run(["make", "-C", str(b.headers), f"M={tmp}", "modules"], check=True, capture_output=True,
                   timeout=600)
    return tmp / "lab_oops.ko"


def test_a_guest_oops_on_an_otherwise_passing_run_is_crash(lab_run: LabRun, tmp_path: Path) -> None:
    """A BUG() in the guest kernel 10 s into fio (a module whose init hits it; the
    guest and fio keep running): the verdict shall be CRASH, naming the guest's
    console and the BUG line, although every workload finished and drained."""
    ko = base64.b64encode(_oops_module(tmp_path).read_bytes()).decode()
    done: dict[str, object] = {}

    def hook(run: Started) -> None:
        g = run.guests["lin1"].runner

        def oops() -> None:
            g.run(["sh", "-c", "base64 -d > /run/lab/lab_oops.ko"], timeout=60, input=ko).check("test")
            done["insmod"] = g.run(["insmod", "/run/lab/lab_oops.ko"], timeout=60).rc

        _after(10, oops)

    rec = lab_run("default", on_workload_started=hook)
    assert "insmod" in done, done
    assert rec["verdict"] == "CRASH", json.dumps(rec, indent=1)[:3000]
    assert rec["exit_code"] == 3 and rec["bisect_code"] == 1
    assert "lin1 console" in rec["summary"] and ("kernel BUG at" in rec["summary"]
                                                  or "invalid opcode" in rec["summary"]), rec["summary"]
    assert all((w["result"] or {}).get("errors") == 0 for w in rec["workloads"]), rec["workloads"]


@pytest.mark.nightly
def test_the_guest_sampler_killed_mid_workload_is_error_not_hang(lab_run: LabRun) -> None:
    def hook(run: Started) -> None:
        g = run.guests["lin1"].runner
        _after(8, lambda: g.run(["sh", "-c", "kill $(pidof -x lab-sample)"], timeout=30))

    rec = lab_run("default", on_workload_started=hook)
    assert rec["verdict"] == "ERROR", json.dumps(rec, indent=1)[:3000]
    assert rec["bisect_code"] == 125 and rec["rule"] == "sampler-died", rec["summary"]
    assert "lin1" in rec["summary"]


@pytest.mark.nightly
def test_dom0s_ssh_transport_dropped_mid_fio_is_error_not_fail(lab_run: LabRun) -> None:
    """dom0's sshd session processes killed inside dom0: every channel of the lab
    (dom0's sampler, the guests' tunnels, fio's) drops at once."""
    def hook(run: Started) -> None:
        _after(8, lambda: run.dom0.run(["sh", "-c", "pkill -f 'sshd: root@'"], timeout=30))

    rec = lab_run("default", on_workload_started=hook)
    assert rec["verdict"] == "ERROR", json.dumps(rec, indent=1)[:3000]
    assert rec["bisect_code"] == 125 and rec["rule"] in ("sampler-died", "transport"), rec["summary"]


def test_an_unknown_preset_with_bisect_exit_is_skip() -> None:
    """Anything that is not a verdict: 125 for `git bisect run` (which reads 4 as bad)."""
    assert cli.main(["run", "no-such-preset", "--bisect-exit"]) == 125
    assert cli.main(["run", "no-such-preset"]) == 4
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--no-such-flag", "x", "--bisect-exit"])
    assert e.value.code == 125


@pytest.mark.nightly
def test_a_backend_that_refuses_the_test_disk_is_fail_and_bisect_names_it(results: Path, tmp_path: Path,
                                                                          lab_run: LabRun) -> None:
    m = images.ensure_image("linux-dom0").manifest
    repo = tmp_path / "blkback"
    shas = make_series(repo, pristine_tree(m["packages"][f"linux-image-{m['kernel_abi']}"]), bad_at=2, total=3,
                       bug="refuse")
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", shas[2]], check=True)
    rec = lab_run("default", backend=str(repo))
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "main"], check=True)
    assert rec["verdict"] == "FAIL", json.dumps(rec, indent=1)[:3000]
    assert rec["stage"] == "guest:attach" and "lin1/xvdb" in rec["summary"], rec["summary"]
    res = bisect.bisect("default", repo, shas[0], shas[-1], runs=1, results_root=results)
    print("\n".join(bisect.summary_lines(res)))
    assert res["first_bad"] == shas[2], json.dumps(res, indent=1)


@pytest.mark.nightly
@pytest.mark.parametrize(("bug", "catches", "verdict"), [
    ("stale-ring", "ring-reconnect", "CRASH"),  # refused reconnect, then a WARN in xen_blkif_disconnect
    ("busy-forgets", "destroy-under-load", "FAIL"),  # a ring busy at destroy is never released
    ("free-order", "default", "CRASH"),  # every disconnect after I/O is a kernel BUG
])
def test_a_seeded_lifecycle_bug_gets_its_verdict_on_the_preset_that_exercises_it(
        tmp_path: Path, lab_run: LabRun, bug: str, catches: str, verdict: str) -> None:
    """Each seeded lifecycle bug (tests/e2e/blkback_series.py) is caught by the
    preset that runs its path; the bugs that a plain run does not reach pass
    `default`."""
    m = images.ensure_image("linux-dom0").manifest
    repo = tmp_path / "blkback"
    shas = make_series(repo, pristine_tree(m["packages"][f"linux-image-{m['kernel_abi']}"]), bad_at=1, total=1,
                       bug=bug)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", shas[1]], check=True)
    rec = lab_run(catches, backend=str(repo))
    assert rec["verdict"] == verdict, rec["summary"]
    if catches != "default":
        assert lab_run("default", backend=str(repo))["verdict"] == "PASS"
