"""lab/runner.py: one Result type, the local runner (deadline kills the whole
process group) and commands.log. Only short local commands run here."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.runner import CommandLog, LocalRunner, Result, kill_group


def test_local_runner_shall_give_rc_stdout_and_stderr() -> None:
    r = LocalRunner().run(["sh", "-c", "echo hi; echo oops >&2; exit 3"], timeout=10)
    assert r.rc == 3 and r.stdout == "hi\n" and r.stderr == "oops\n"
    assert r.argv == ("sh", "-c", "echo hi; echo oops >&2; exit 3")
    assert not r.ok and not r.timed_out
    assert 0 <= r.elapsed < 5


def test_local_runner_shall_pass_input_env_and_cwd(tmp_path: Path) -> None:
    run = LocalRunner()
    assert run.run(["cat"], timeout=10, input="line 1\nline 2\n").stdout == "line 1\nline 2\n"
    assert run.run(["sh", "-c", 'echo "$LAB_T:$HOME"'], timeout=10, env={"LAB_T": "x"}).stdout == \
        f"x:{os.environ.get('HOME', '')}\n", "env adds to the inherited environment"
    assert run.run(["pwd"], timeout=10, cwd=tmp_path).stdout.strip() == str(tmp_path)


def test_a_command_without_input_shall_not_wait_on_stdin() -> None:
    r = LocalRunner().run(["cat"], timeout=5)
    assert r.ok and r.stdout == "" and r.elapsed < 4


def test_a_command_past_its_timeout_shall_be_killed() -> None:
    t0 = time.monotonic()
    r = LocalRunner().run(["sleep", "30"], timeout=0.5)
    elapsed = time.monotonic() - t0
    assert r.timed_out and r.rc == -1 and not r.ok
    assert 0.5 <= r.elapsed < 5 and elapsed < 5


def _gone(pid: int, within: float = 3.0) -> bool:
    """True once `pid` no longer runs (absent, or a zombie awaiting its reaper)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_a_timeout_shall_kill_the_children_too(tmp_path: Path) -> None:
    """The shell's background child holds stdout open: without killing the whole
    process group, reading its output would wait for the child's 30 s."""
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = LocalRunner().run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert r.timed_out and time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    assert _gone(child), f"child sleep {child} survived the deadline"


def test_kill_group_of_a_finished_group_shall_be_harmless() -> None:
    r = LocalRunner().run(["true"], timeout=5)
    assert r.ok
    kill_group(2**22 + 12345)  # above any pid_max: no such process group, nothing happens


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (Result(("false",), 1, "", "disk full\n", 0.1), "exited 1: disk full"),
        (Result(("sh", "-c", "x y"), 2, "only stdout\n", "", 0.1), "exited 2: only stdout"),
        (Result(("sleep", "30"), -1, "", "", 0.5, timed_out=True), "timed out"),
        (Result(("true",), 0, "", "", 0.5, timed_out=True), "timed out"),
    ],
)
def test_check_shall_raise_lab_error_with_the_stage_command_and_reason(result: Result, why: str) -> None:
    with pytest.raises(LabError) as e:
        result.check("guest:create")
    assert e.value.stage == "guest:create"
    assert why in e.value.message
    assert e.value.message.startswith(f"`{shlex.join(result.argv)}` ")


def test_check_shall_return_the_result_when_ok() -> None:
    r = Result(("true",), 0, "out", "", 0.1)
    assert r.check("x") is r


def test_check_shall_quote_the_argv_as_a_shell_would() -> None:
    with pytest.raises(LabError) as e:
        Result(("sh", "-c", "exit 1"), 1, "", "", 0.1).check("s")
    assert "`sh -c 'exit 1'` exited 1" in e.value.message


def test_check_shall_keep_only_the_end_of_a_long_error() -> None:
    err = "x" * 5000 + "THE END"
    with pytest.raises(LabError) as e:
        Result(("cmd",), 1, "", err, 0.1).check("s")
    assert e.value.message.endswith("THE END") and len(e.value.message) < 1600


def test_commands_log_shall_get_one_json_line_per_command(tmp_path: Path) -> None:
    path = tmp_path / "commands.log"
    run = LocalRunner(CommandLog(path), name="l0")
    run.run(["sh", "-c", "exit 3"], timeout=5)
    run.run(["echo", "two words"], timeout=5)
    run.run(["sleep", "5"], timeout=0.2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [ln["argv"] for ln in lines] == [["sh", "-c", "exit 3"], ["echo", "two words"], ["sleep", "5"]]
    assert [ln["rc"] for ln in lines] == [3, 0, -1]
    assert [ln["timed_out"] for ln in lines] == [False, False, True]
    assert all(ln["machine"] == "l0" and ln["elapsed"] >= 0 and ln["t"] > 1.7e9 for ln in lines)


def test_command_log_without_a_path_shall_write_nothing(tmp_path: Path) -> None:
    CommandLog(None).write("l0", Result(("true",), 0, "", "", 0.0))
    assert list(tmp_path.iterdir()) == []
