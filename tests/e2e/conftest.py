"""The e2e tier boots the real nested stack: QEMU (TCG here, KVM where it works),
Debian's Xen 4.17, a Linux dom0 with the stock blkback, Linux PV guests. Each test
says what it shall show, and runs its scenarios through the pytest plugin's
`lab_run` (lab/pytest_plugin.py), which puts each run's verdict, summary, results
directory and report.html into the test's JUnit properties; tests of the CLI
itself (Ctrl-C, exit codes, bisect) run `lab`.

Parallel labs (pytest-xdist: `make test-e2e-all JOBS=N` runs `-n N --dist
loadfile`): each worker boots its own labs and writes under its own results root
(results/e2e/gwN/, with its own `latest`). What workers share the lab makes safe
for concurrent runs: image, key and backend builds under a lock in the cache
directory (lab/cache.py), saved L1 states promoted atomically (lab/l1state.py),
SSH ports chosen at run time, one work directory per run. `loadfile` keeps a test
file on one worker, in order: test_default's restored runs follow its cold run,
and the FreeBSD tests share their cache directory. (Not `--dist loadgroup` with
xdist_group marks: with pytest 9.2 it silently stops grouping, pytest-xdist#1386.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def _needs_qemu() -> None:
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run `make deps` (the e2e tier needs the real stack)")


@pytest.fixture
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # results of e2e runs are kept under results/e2e/ for inspection after a failure;
    # under xdist under results/e2e/<worker>/, so a worker's `latest` is its own run
    root = Path("results") / "e2e" / os.environ.get("PYTEST_XDIST_WORKER", "")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def lab_results_root(results: Path) -> Path:
    """The plugin's `lab_run` writes where the tests' own runs do."""
    return results
