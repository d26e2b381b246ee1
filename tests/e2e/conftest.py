"""The e2e tier boots the real nested stack: QEMU (TCG here, KVM where it works),
Debian's Xen 4.17, a Linux dom0 with the stock blkback, Linux PV guests. One run
at a time; each test says what it shall show."""

from __future__ import annotations

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
    # results of e2e runs are kept under results/e2e/ for inspection after a failure
    root = Path("results") / "e2e"
    root.mkdir(parents=True, exist_ok=True)
    return root
