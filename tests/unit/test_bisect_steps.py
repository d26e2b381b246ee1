"""lab/bisect.py with a FreeBSD dom0 (issue 16): the bisected tree goes where the
dom0 platform says (the dom0 kernel's [freebsd] src; [backend] source on Linux),
a machine without FreeBSD media ends at once with `lab run`'s ERROR (exit 4,
before git is touched), and `--plan` lists the per-step work. No VM, no network:
the media check is told the publishers are unreachable, the release is fixed."""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

import pytest

from lab import bisect, cli, scenario
from lab.errors import LabError
from lab.platform import freebsd as fb
from lab.platform.freebsd import media


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A git tree shaped like FreeBSD's where blkback lives: 8 commits, tags good (first) and bad (last)."""
    repo = tmp_path / "freebsd-src"
    (repo / "sys/dev/xen/blkback").mkdir(parents=True)
    git(repo.parent, "init", "-q", str(repo))
    for i in range(1, 9):
        (repo / "sys/dev/xen/blkback/blkback.c").write_text(f"/* rev {i} */\n")
        git(repo, "add", "-A")
        git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", f"blkback: change {i}")
    git(repo, "tag", "good", "HEAD~7")
    git(repo, "tag", "bad", "HEAD")
    return repo


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No publisher reachable, an empty cache, the release fixed (no index lookup)."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fb, "media_or_error", functools.partial(media.media_or_error, reachable=lambda url: False))
    monkeypatch.setattr(fb, "freebsd_version", lambda sc: ("14.3", "fixed by the test"))
    monkeypatch.setattr(media, "freebsd_version", lambda sc, **kw: ("14.3", "fixed by the test"))


def test_a_freebsd_step_shall_build_the_dom0_kernel_from_the_repository(tree: Path) -> None:
    sc = bisect.with_source(scenario.load("freebsd-dom0-ring-saturation"), tree)
    assert sc.freebsd.src == str(tree) and sc.backend.source == ""
    assert sc.freebsd.fail_on_request_shortages  # the seed's regression oracle decides


def test_a_linux_step_shall_keep_building_the_backend_source(tmp_path: Path) -> None:
    (tmp_path / "drivers" / "block" / "xen-blkback").mkdir(parents=True)
    sc = bisect.with_source(scenario.load("default"), tmp_path)
    assert sc.backend.source == str(tmp_path)


def test_a_tree_without_linuxs_blkback_shall_be_refused(tree: Path) -> None:
    with pytest.raises(LabError) as e:
        bisect.with_source(scenario.load("default"), tree)
    assert e.value.stage == "bisect" and "drivers/block/xen-blkback" in e.value.message


def test_a_tree_without_freebsds_blkback_shall_be_refused(tmp_path: Path) -> None:
    with pytest.raises(LabError) as e:
        bisect.with_source(scenario.load("freebsd-dom0"), tmp_path)
    assert e.value.stage == "bisect" and "sys/dev/xen/blkback/blkback.c" in e.value.message


def test_bisect_without_media_shall_end_at_once_with_the_error_of_lab_run(
        tree: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    t = time.monotonic()
    code = cli.main(["bisect", "--scenario", "freebsd-dom0-ring-saturation", "--repo", str(tree),
                     "--good", "good", "--bad", "bad", "--results", str(tmp_path / "results")])
    took = time.monotonic() - t
    err = capsys.readouterr().err
    assert code == 4 and took < 10
    assert "lab: ERROR: [image] FreeBSD 14.3 dom0" in err and "media missing on this machine" in err
    assert "[freebsd] image = PATH" in err and "[freebsd] packages = DIR" in err
    assert subprocess.run(["git", "-C", str(tree), "bisect", "log"], capture_output=True).returncode != 0
    assert not (tmp_path / "results").exists()
    # `lab run` says the same
    code = cli.main(["run", "freebsd-dom0-ring-saturation", "--results", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 4
    missing = err.split("media missing on this machine:", 1)[1].strip().splitlines()[0]
    assert "stage image" in out and missing in out


def test_bisect_plan_shall_list_each_steps_build_boot_and_decision(
        tree: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    steps = bisect.plan("freebsd-dom0-ring-saturation", tree, "good", "bad", runs=2)
    by = {s["step"]: s for s in steps}
    assert by["bisect-start"]["what"].startswith("7 commits in good..bad")
    assert by["bisect-start"]["command"][-2:] == [git(tree, "rev-parse", "bad"), git(tree, "rev-parse", "good")]
    run = by["bisect-run"]["command"]
    assert run[:5] == ["git", "-C", str(tree), "bisect", "run"] and "lab.bisect" in run and str(tree) in run
    assert by["each step: source"]["command"][:3] == ["tar", "-C", str(tree)]
    assert "hashed (sys/ + patches + KERNCONF) first" in by["each step: source"]["what"]
    assert any("buildkernel" in line for line in by["each step: build"]["script"])
    assert by["each step: boot"]["milestones"][0] == "FreeBSD's loader"
    assert "request_shortages growth is FAIL" in by["each step: decide"]["what"]
    assert "125 (skip)" in by["each step: verdict"]["what"] and "128" in by["each step: verdict"]["what"]
    order = [s["step"] for s in steps]
    assert order.index("each step: build") < order.index("each step: boot") < order.index("each step: decide")
    assert order[-2:] == ["confirm", "reset"]
    assert subprocess.run(["git", "-C", str(tree), "bisect", "log"], capture_output=True).returncode != 0
    assert cli.main(["bisect", "--scenario", "freebsd-dom0-ring-saturation", "--repo", str(tree),
                     "--good", "good", "--bad", "bad", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# bisect freebsd-dom0-ring-saturation over ") and "nothing has been run" in out
    assert "[each step: build]" in out and "$ git -C" in out


def test_the_freebsd_plan_shall_refuse_an_unsupported_release(tmp_path: Path) -> None:
    toml = tmp_path / "old.toml"
    toml.write_text('name = "old"\n[dom0]\nos = "freebsd"\n[freebsd]\nversion = "13.5"\n'
                    '[[guests]]\nname = "lin1"\n[[workloads]]\nguest = "lin1"\n')
    with pytest.raises(LabError) as e:
        fb.FreeBsdPlatform().plan(scenario.load(str(toml)))
    assert e.value.stage == "scenario" and "supported: 14.3 and later" in e.value.message
