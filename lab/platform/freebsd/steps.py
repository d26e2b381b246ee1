"""One list of steps for what the lab builds on L0 (the provisioned dom0
image, the kernel): the run executes it, `--plan` prints it (style.md 16: tmt's
--dry), so the plan cannot drift from what runs. A step carries what the plan
shows (its exact command, URL, script, milestones) and the action that does it;
a step with a `command` and no action runs that very command (and `then`).

Also the L0 actions the two builds share: a checked command and the config disk."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lab.errors import LabError
from lab.platform.freebsd.render import cidata_argv, render_meta_data
from lab.runner import Result, Runner


@dataclass(frozen=True)
class Step:
    step: str  # the plan's name of the step
    what: str
    show: Mapping[str, Any] = field(default_factory=dict)  # command, then, script, milestones, ... as printed
    action: Callable[[], object] | None = None  # None: run show["command"] (then show["then"]), or nothing
    phase: Literal["build", "verify"] = "build"  # verify: lab.cache.put's check before the rename
    timeout: float = 300

    def plan(self) -> dict[str, Any]:
        return {"step": self.step, "what": self.what, **self.show}


def run_steps(steps: Sequence[Step], *, runner: Runner, stage: str, phase: str = "build") -> dict[str, object]:
    """Execute the steps of `phase` in order; returns each action's result by step name."""
    done: dict[str, object] = {}
    for s in steps:
        if s.phase != phase:
            continue
        if s.action is not None:
            done[s.step] = s.action()
            continue
        for key in ("command", "then"):
            argv = s.show.get(key)
            if isinstance(argv, list):
                check(runner, [str(a) for a in argv], stage, timeout=s.timeout)
    return done


def plan(steps: Sequence[Step]) -> list[dict[str, Any]]:
    return [s.plan() for s in steps]


class _PlanRunner:
    """The runner the plan's steps are made with: a plan never executes a step."""

    name = "plan"

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        raise AssertionError(f"a plan ran {argv}")


NO_RUNNER: Runner = _PlanRunner()


def check(runner: Runner, argv: list[str], stage: str, *, timeout: float = 300) -> str:
    res = runner.run(argv, timeout=timeout)
    if not res.ok:
        raise LabError(stage, f"{argv[0]} failed (rc {res.rc}): {(res.stderr or res.stdout).strip()[-400:]}")
    return res.stdout


def stage_cidata(staging: Path, *, user_data: str, instance_id: str,
                 files: Sequence[tuple[Path, str]] = (), texts: Mapping[str, str] | None = None) -> None:
    """The config disk's files in a directory: user-data, meta-data, `files`
    (source, path on the disk) and `texts` (path on the disk: content)."""
    staging.mkdir(parents=True)
    (staging / "user-data").write_text(user_data)
    (staging / "meta-data").write_text(render_meta_data(instance_id=instance_id))
    for src, rel in files:
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)  # no copy of ~100 MB of packages when on the same filesystem
        except OSError:
            shutil.copyfile(src, dst)
    for rel, text in (texts or {}).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(text)


def make_cidata(staging: Path, iso: Path, runner: Runner) -> None:
    res = runner.run(cidata_argv(staging, iso), timeout=300)
    if not res.ok:
        raise LabError("image", f"genisoimage could not make the config disk: {res.stderr.strip()[-400:]}")


def build_cidata(staging: Path, iso: Path, runner: Runner, *, user_data: str, instance_id: str,
                 files: Sequence[tuple[Path, str]] = (), texts: Mapping[str, str] | None = None) -> None:
    """The config disk (cidata ISO) from its files, the staging directory removed."""
    stage_cidata(staging, user_data=user_data, instance_id=instance_id, files=files, texts=texts)
    make_cidata(staging, iso, runner)
    shutil.rmtree(staging)


def put_built(final: Path, make: Callable[[Path], Sequence[Step]], *, runner: Runner, stage: str) -> Path:
    """The cache entry `final` (a directory), built by the steps `make(work)`
    gives for lab.cache's work directory: the build steps, then the verify ones,
    then the atomic rename, under the entry's lock (lab.cache.put)."""
    from lab import cache

    made: dict[Path, Sequence[Step]] = {}

    def build(work: Path) -> None:
        made[work] = make(work)
        run_steps(made[work], runner=runner, stage=stage)

    def verify(work: Path) -> None:
        run_steps(made[work], runner=runner, stage=stage, phase="verify")

    return cache.put(final, build, verify=verify)


def qcow2_check(runner: Runner, image: Path, stage: str, *, name: str = "check") -> Step:
    """The verify step of a flattened image: a qcow2 that stands alone (no
    backing file: the work directory's overlays are about to be deleted)."""
    argv = ["qemu-img", "info", "--output=json", str(image)]

    def action() -> None:
        import json

        info = json.loads(check(runner, argv, stage, timeout=120))
        if info.get("format") != "qcow2" or info.get("backing-filename"):
            raise LabError(stage, f"{image}: not a standalone qcow2 (format {info.get('format')!r}, "
                           f"backing file {info.get('backing-filename')!r})")
        if not (image.parent / "manifest.json").is_file():
            raise LabError(stage, f"{image.parent}: no manifest.json")

    return Step(name, "verify the image is a standalone qcow2 with its manifest, then rename the work directory "
                "into the cache atomically, under the entry's lock (lab.cache.put)",
                {"command": argv}, action, phase="verify")


@dataclass(frozen=True)
class Dom0Image:
    path: Path  # read-only qcow2: the dom0's disk, booted through FreeBSD's loader
    key: str
    version: str
    kernel_id: str | None  # the source tree's hash when the kernel was built from it
    manifest: dict


@dataclass(frozen=True)
class VmJob:
    """Where and how a one-job FreeBSD VM (provisioning, kernel build) runs."""

    accel: str
    cpus: int
    runner: Runner
    results: Path  # console logs and QEMU argv
    loader_timeout: float = 120  # up to FreeBSD's loader on the console
