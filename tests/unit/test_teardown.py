"""lab/teardown.py: the detach and destroy steps fold their "is it gone yet"
polls into the step's own round trip. The scripts run here under a real sh,
with stand-in `xl` and `xenstore-exists` that answer as the real ones do
(exit 0 while the thing exists, non-zero once it is gone). XL_LIST's lines are
`xl list` in the dom0 of a kept `stall` lab (2026-11-30, Xen 4.17.7); the
"(null)" line is how xl lists a domain Xen still holds, written here by hand."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import teardown

XL_LIST = ("Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
           "Domain-0                                     0   512     2     r-----      86.4\n")


def _sh(tmp_path: Path, argv: list[str], *, exists: int, domid_rc: int, list_out: str) -> subprocess.CompletedProcess:
    (tmp_path / "xenstore-exists").write_text(f"#!/bin/sh\nexit {exists}\n")
    (tmp_path / "xl").write_text(
        "#!/bin/sh\ncase \"$1\" in\n"
        "  block-detach|destroy) exit ${XL_RC:-0};;\n"
        f"  domid) exit {domid_rc};;\n"
        f"  list) printf '%s' \"$XL_LIST\";;\n"
        "esac\n")
    for f in ("xenstore-exists", "xl"):
        (tmp_path / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "XL_LIST": list_out}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(autouse=True)
def _short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teardown, "GONE_SECONDS", 1.0)  # two tries, not thirty


def test_detach_shall_wait_for_the_node_and_say_when_it_stays(tmp_path: Path) -> None:
    argv = teardown.detach_argv("lin1", "xvdb", "/local/domain/0/backend/vbd/1/51728")
    gone = _sh(tmp_path, argv, exists=1, domid_rc=1, list_out=XL_LIST)
    assert gone.returncode == 0 and "lab-left:node" not in gone.stdout
    stays = _sh(tmp_path, argv, exists=0, domid_rc=1, list_out=XL_LIST)
    assert stays.returncode == 0 and stays.stdout.splitlines() == ["lab-left:node"]


def test_a_failed_detach_shall_be_the_steps_rc(tmp_path: Path) -> None:
    argv = teardown.detach_argv("lin1", "xvdb", "/n")
    os.environ["XL_RC"] = "3"
    try:
        res = _sh(tmp_path, argv, exists=0, domid_rc=1, list_out=XL_LIST)
    finally:
        del os.environ["XL_RC"]
    assert res.returncode == 3 and "lab-left" not in res.stdout


def test_destroy_shall_find_nothing_left_when_the_domain_went(tmp_path: Path) -> None:
    res = _sh(tmp_path, teardown.destroy_argv("lin1", 1), exists=1, domid_rc=1, list_out=XL_LIST)
    assert res.returncode == 0
    assert teardown.destroy_leftovers(res.stdout, "lin1", 1) == []


def test_destroy_shall_report_a_domain_xen_still_holds(tmp_path: Path) -> None:
    dying = XL_LIST + "(null)                                       1     0     2     --p--d       9.7\n"
    res = _sh(tmp_path, teardown.destroy_argv("lin1", 1), exists=1, domid_rc=1, list_out=dying)
    left = teardown.destroy_leftovers(res.stdout, "lin1", 1)
    assert left == ["domain 1 still held by Xen after destroy: (null)                                       "
                    "1     0     2     --p--d       9.7"]


def test_destroy_shall_report_a_domain_still_listed(tmp_path: Path) -> None:
    res = _sh(tmp_path, teardown.destroy_argv("lin1", 4), exists=1, domid_rc=0, list_out=XL_LIST)
    assert teardown.destroy_leftovers(res.stdout, "lin1", 4) == ["domain 4 (lin1) still listed 1s after `xl destroy`"]
