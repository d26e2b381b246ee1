"""The round trips folded into one: a workload's output back on its own command
(lab/observe.py), the guests' consoles on dom0's liveness probe
(lab/evidence.py), the attach's wait for Connected and the adopted guest's
clock (lab/guests.py, the Linux guest platform), the teardown's leftover checks
on the unload's round trip (lab/platform/linux/dom0.py, lab/teardown.py), and
the run's qcow2 layers with 4 KiB clusters (lab/qemu.py). The scripts run here
under a real sh, with stand-in commands on PATH written into tmp_path; paths
that only exist in L1 (/run/lab, /var/log/xen/console, /sys/...) are pointed
into tmp_path by a plain string replace on the script."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab import evidence, guests, observe, qemu, scenario, teardown
from lab.console import Console
from lab.errors import LabError
from lab.platform import Backing
from lab.platform.linux.dom0 import LinuxDom0
from lab.platform.linux.guest import LinuxGuest
from lab.runner import Result
from lab.timing import Background, Deadline
from lab.watchdog import Track


# ------------------------------------------------------------------ helpers
def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    """An executable `name` on the test's PATH: a sh script with `body`."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


class ShRunner:
    """A runner that runs each argv for real (sh, the stand-ins in `bin_dir`
    first on PATH), with L1's paths replaced by `swap` in every argument."""

    name = "sh"

    def __init__(self, bin_dir: Path, swap: dict[str, str] | None = None, env: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.swap = swap or {}
        self.env = env or {}
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        self.calls.append(argv)
        real = []
        for a in argv:
            for old, new in self.swap.items():
                a = a.replace(old, new)
            real.append(a)
        env = {**os.environ, **self.env, "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}
        t = time.monotonic()
        p = subprocess.run(real, capture_output=True, text=True, input=input, env=env, timeout=timeout)
        return Result(tuple(argv), p.returncode, p.stdout, p.stderr, time.monotonic() - t)


class Canned:
    """A runner that answers every command with one result, and keeps the argvs."""

    name = "canned"

    def __init__(self, stdout: str = "", rc: int = 0, stderr: str = "", **kw: Any) -> None:
        self.answer = (rc, stdout, stderr, kw)
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        self.calls.append(argv)
        rc, out, err, kw = self.answer
        return Result(tuple(argv), rc, out, err, 0.01, **kw)


# ------------------------------------------------------------------ lab/observe.py
def test_split_output_shall_part_the_tools_stdout_from_its_structured_output() -> None:
    """The text after OUTPUT_FOLLOWS is the tool's output file, the text before it the tool's stdout."""
    own, out = observe.split_output(f"fio: starting\n{observe.OUTPUT_FOLLOWS}\n{{\"jobs\": []}}\n")
    assert (own, out) == ("fio: starting\n", '{"jobs": []}\n')


def test_split_output_without_the_marker_shall_have_no_structured_output() -> None:
    """A command cut short (timed out, session lost) never printed the marker: None, all stdout the tool's."""
    assert observe.split_output("fio: starting\n{\"jobs\"") == ("fio: starting\n{\"jobs\"", None)


def test_split_output_with_an_empty_output_file_shall_be_empty_not_none() -> None:
    """The command ended but the tool wrote nothing: "" (it got that far), not None."""
    assert observe.split_output(f"err\n{observe.OUTPUT_FOLLOWS}\n") == ("err\n", "")


def _fio(tmp_path: Path, body: str) -> tuple[ShRunner, Path]:
    """A stand-in fio in tmp_path/bin, with /run/lab/ pointed at tmp_path/run."""
    run = tmp_path / "run"
    run.mkdir()
    _stand_in(tmp_path / "bin", "fio", body)
    return ShRunner(tmp_path / "bin", {"/run/lab/": f"{run}/"}), run


# fio's way of being called: --output=<file> among the options, the job file last
_FIO_ARGS = 'for a; do case "$a" in --output=*) out=${a#--output=};; esac; job=$a; done\n'


def test_a_workloads_json_shall_come_back_on_its_own_command_with_the_tools_rc(tmp_path: Path) -> None:
    """The job goes in on stdin, the stand-in's JSON comes back after the marker, and the rc is the tool's."""
    runner, run = _fio(tmp_path, _FIO_ARGS + 'printf "fio read %s" "$(cat "$job")"\n'
                       'printf \'{"jobs": [{"jobname": "lab"}]}\\n\' > "$out"\nexit 3\n')
    res = runner.run(observe.workload_argv("fio", 2), timeout=10, input="[global]\nrw=randrw\n")
    own, out = observe.split_output(res.stdout)
    assert res.rc == 3
    assert own == "fio read [global]\nrw=randrw"  # no newline of its own: the marker still splits
    assert out is not None and json.loads(out) == {"jobs": [{"jobname": "lab"}]}
    assert (run / "fio-2.job").read_text() == "[global]\nrw=randrw\n"


def test_a_tool_that_wrote_no_output_shall_give_an_empty_output_and_its_rc(tmp_path: Path) -> None:
    """fio failing before it writes its file: rc 1 and "" after the marker (the command did end)."""
    runner, _ = _fio(tmp_path, "echo 'fio: bad job' >&2; exit 1\n")
    res = runner.run(observe.workload_argv("fio", 0), timeout=10, input="x\n")
    assert res.rc == 1 and observe.split_output(res.stdout) == ("", "")


def test_a_job_file_that_cannot_be_written_shall_be_the_labs_failure(tmp_path: Path) -> None:
    """No /run/lab to write the job in: JOB_NOT_WRITTEN and rc 97, and the tool never runs."""
    _stand_in(tmp_path / "bin", "fio", f"touch {tmp_path}/fio-ran\n")
    runner = ShRunner(tmp_path / "bin", {"/run/lab/": f"{tmp_path}/missing/"})
    res = runner.run(observe.workload_argv("fio", 0), timeout=10, input="x\n")
    assert res.rc == 97 and observe.JOB_NOT_WRITTEN in res.stdout.splitlines()
    assert not (tmp_path / "fio-ran").exists()
    assert observe.split_output(res.stdout)[1] is None


def _job(thread: threading.Thread | None, result: Result | None) -> observe.Job:
    cfg = scenario.GuestCfg(name="lin1")
    gu = guests.Guest(cfg, "10.99.0.10", 1, Canned(), LinuxGuest())  # type: ignore[arg-type]
    return observe.Job(scenario.WorkloadCfg(guest="lin1"), gu, Track("lin1", "xvdb", "vbd-1-51728", 32), 0, 5.0,
                       thread=thread, result=result)


def _finished() -> threading.Thread:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return t


@pytest.mark.parametrize(("kw", "ended"), [
    ({}, True),
    ({"rc": 1}, True),  # the tool failed, but its command returned by itself
    ({"rc": -1, "timed_out": True}, False),
    ({"rc": 255, "transport_error": "Connection reset"}, False),
])
def test_a_workload_shall_have_ended_only_when_its_command_returned_by_itself(kw: dict[str, Any],
                                                                              ended: bool) -> None:
    """_ended: a finished thread with a result that neither timed out nor lost its session."""
    res = Result(("sh",), kw.pop("rc", 0), "", "", 1.0, **kw)
    assert observe._ended(_job(_finished(), res)) is ended


def test_a_workload_still_running_or_never_started_shall_not_have_ended() -> None:
    """A thread still alive (even with a result) or no thread at all: not ended."""
    release = threading.Event()
    alive = threading.Thread(target=release.wait, args=(5,))
    alive.start()
    try:
        assert observe._ended(_job(alive, Result(("sh",), 0, "", "", 1.0))) is False
    finally:
        release.set()
        alive.join()
    assert observe._ended(_job(None, Result(("sh",), 0, "", "", 1.0))) is False
    assert observe._ended(_job(_finished(), None)) is False


# ------------------------------------------------------------------ lab/evidence.py
def test_split_consoles_shall_give_each_guest_its_text() -> None:
    """Text before the first marker is nobody's; a guest with an empty console maps to ""
    (the script prints a newline before each marker: the console's text keeps its own)."""
    m = evidence.CONSOLE_MARK
    out = evidence.split_consoles(f"motd\n\n{m}lin1\nboot\nlogin: ok\n\n{m}lin2\n")
    assert out == {"lin1": "boot\nlogin: ok\n", "lin2": ""}


class _Dom0:
    def __init__(self, runner: Canned | ShRunner, alive: bool = True) -> None:
        self.runner = runner
        self.is_alive = alive

    def alive(self) -> bool:
        return self.is_alive

    def run(self, argv: list[str], *, timeout: float) -> Result:
        return self.runner.run(argv, timeout=timeout)


def _consoles_dir(tmp_path: Path, logs: dict[str, str]) -> tuple[ShRunner, Path]:
    con = tmp_path / "xencon"
    con.mkdir()
    for name, text in logs.items():
        (con / f"guest-{name}.log").write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    return ShRunner(tmp_path / "bin", {"/var/log/xen/console/": f"{con}/"}), results


def test_the_probe_shall_bring_each_guests_console_on_its_round_trip(tmp_path: Path) -> None:
    """The script's output under sh: one console-<guest>.log per guest with text, none for a missing log."""
    runner, results = _consoles_dir(tmp_path, {"lin1": "Linux version 6.1\nlogin:\n"})
    answers, cons = evidence.l1_answers_with_consoles(SimpleNamespace(dom0=_Dom0(runner)),  # type: ignore[arg-type]
                                                      ["lin1", "lin2"], results)
    assert answers is True and list(cons) == ["lin1"] and len(runner.calls) == 1
    assert cons["lin1"].path == results / "console-lin1.log" and cons["lin1"].name == "guest lin1"
    assert (results / "console-lin1.log").read_text() == "Linux version 6.1\nlogin:\n"
    assert not (results / "console-lin2.log").exists()


def test_a_console_ending_without_a_newline_shall_not_swallow_the_next_guests(tmp_path: Path) -> None:
    """A console log's last line is often a prompt with no newline: the next guest's marker must still split."""
    runner, results = _consoles_dir(tmp_path, {"lin1": "lin1 boot\nlin1 login: ", "lin2": "lin2 boot\n"})
    _, cons = evidence.l1_answers_with_consoles(SimpleNamespace(dom0=_Dom0(runner)),  # type: ignore[arg-type]
                                                ["lin1", "lin2"], results)
    assert sorted(cons) == ["lin1", "lin2"]
    assert "lin2 boot" not in (results / "console-lin1.log").read_text()
    assert (results / "console-lin2.log").read_text() == "lin2 boot\n"


def test_a_failed_probe_shall_say_dom0_does_not_answer(tmp_path: Path) -> None:
    """A probe that fails (here: lost its session) is (False, {}), and nothing is written."""
    dom0 = _Dom0(Canned(f"{evidence.CONSOLE_MARK}lin1\ntext\n", rc=255, transport_error="reset"))
    assert evidence.l1_answers_with_consoles(SimpleNamespace(dom0=dom0), ["lin1"],  # type: ignore[arg-type]
                                             tmp_path) == (False, {})
    assert list(tmp_path.iterdir()) == []


def test_a_dom0_not_alive_shall_not_be_probed(tmp_path: Path) -> None:
    """dom0's session already gone (or no L1): (False, {}) without a command."""
    canned = Canned(f"{evidence.CONSOLE_MARK}lin1\ntext\n")
    l1 = SimpleNamespace(dom0=_Dom0(canned, alive=False))
    assert evidence.l1_answers_with_consoles(l1, ["lin1"], tmp_path) == (False, {})  # type: ignore[arg-type]
    assert canned.calls == []
    assert evidence.l1_answers_with_consoles(None, ["lin1"], tmp_path) == (False, {})


# ------------------------------------------------------------------ lab/guests.py: until_settled
def _settle(tmp_path: Path, be: str, fe: str, seconds: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """until_settled under sh; the state nodes are files, read by a stand-in xenstore-read."""
    _stand_in(tmp_path / "bin", "xenstore-read", 'cat "$1"\n')
    (tmp_path / "be").write_text(be + "\n")
    (tmp_path / "fe").write_text(fe + "\n")
    script = guests.until_settled(str(tmp_path / "be"), str(tmp_path / "fe"), seconds) + "; echo settled"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    t = time.monotonic()
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=10)
    return p, time.monotonic() - t


@pytest.mark.parametrize(("be", "fe"), [("4", "4"), ("6", "1"), ("2", "5")])
def test_until_settled_shall_return_at_once_when_connected_or_giving_up(tmp_path: Path, be: str, fe: str) -> None:
    """Both Connected, or either end Closing/Closed: the wait ends on the first poll."""
    p, took = _settle(tmp_path, be, fe, 1.5)
    assert p.returncode == 0 and p.stdout == "settled\n"
    assert took < 0.6


@pytest.mark.parametrize(("be", "fe"), [("1", "2"), ("4", "3")])
def test_until_settled_shall_give_up_after_its_seconds(tmp_path: Path, be: str, fe: str) -> None:
    """Ends still setting up (or only one Connected): the wait goes on for about `seconds`, then ends."""
    p, took = _settle(tmp_path, be, fe, 0.5)
    assert p.returncode == 0 and p.stdout == "settled\n"
    assert 0.35 <= took < 2.0


def test_until_settled_shall_see_the_ends_connect_while_it_waits(tmp_path: Path) -> None:
    """Both ends reach Connected 0.3 s in: the wait ends soon after, well before its 1.5 s."""
    timer = threading.Timer(0.3, lambda: [(tmp_path / f).write_text("4\n") for f in ("be", "fe")])
    timer.start()
    try:
        p, took = _settle(tmp_path, "3", "3", 1.5)
    finally:
        timer.cancel()
    assert p.returncode == 0 and 0.25 <= took < 1.0


# ------------------------------------------------------------------ lab/guests.py: after_clock
def _clocked(tmp_path: Path, clock_rc: int) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "clock", f'echo "clock out $1"; echo "clock err" >&2; exit {clock_rc}\n')
    _stand_in(bin_dir, "then", f'touch {tmp_path}/then-ran; echo "then got [$1]"; exit 7\n')
    argv = guests.after_clock(["clock", "@1700000000"], ["then", "two words; true"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=10)


def test_after_clock_shall_be_the_then_command_once_the_clock_is_set(tmp_path: Path) -> None:
    """Clock set: the command's stdout and rc are `then`'s (its argument intact), the clock's stdout dropped."""
    p = _clocked(tmp_path, 0)
    assert p.returncode == 7 and p.stdout == "then got [two words; true]\n"


def test_after_clock_shall_not_run_then_when_the_clock_fails(tmp_path: Path) -> None:
    """Clock failed: rc CLOCK_FAILED, its stderr kept, and `then` never ran."""
    p = _clocked(tmp_path, 1)
    assert p.returncode == guests.CLOCK_FAILED and p.stdout == "" and "clock err" in p.stderr
    assert not (tmp_path / "then-ran").exists()


# ------------------------------------------------------------------ lab/guests.py: load_frontend
def _frontend(tmp_path: Path, *, date_rc: int = 0) -> tuple[ShRunner, guests.Guest]:
    """A guest whose `date` and `modprobe` are stand-ins and whose blkfront parameters are files."""
    params = tmp_path / "params"
    params.mkdir()
    for k, v in (("max_ring_page_order", "0"), ("max_queues", "1"), ("feature_persistent", "Y")):
        (params / k).write_text(v + "\n")
    _stand_in(tmp_path / "bin", "date", f'echo "$*" > {tmp_path}/date-args; echo "date: cannot set" >&2; '
              f"exit {date_rc}\n")
    _stand_in(tmp_path / "bin", "modprobe", f'echo "$*" >> {tmp_path}/modprobe-args\n')
    runner = ShRunner(tmp_path / "bin", {"/sys/module/xen_blkfront/parameters": str(params)})
    gu = guests.Guest(scenario.GuestCfg(name="lin1"), "10.99.0.10", 1, runner, LinuxGuest(),  # type: ignore[arg-type]
                      from_state=True, clock_pending=True)
    return runner, gu


def test_load_frontend_shall_set_an_adopted_guests_clock_on_its_round_trip(tmp_path: Path) -> None:
    """One command: the clock from L0's time first, then blkfront loaded and its parameters read."""
    runner, gu = _frontend(tmp_path)
    before = int(time.time())
    guests.load_frontend(scenario.load("default"), gu)
    after = int(time.time())
    assert len(runner.calls) == 1
    argv = runner.calls[0]
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith("date -u -s @")
    assert argv[2].endswith(shlex.join(LinuxGuest.frontend_argv(gu.cfg)))
    epoch = int((tmp_path / "date-args").read_text().split("@")[1])
    assert before <= epoch <= after
    assert "xen_blkfront max_ring_page_order=0 max_queues=1" in (tmp_path / "modprobe-args").read_text()
    assert gu.clock_pending is False and gu.frontend_loaded is True
    assert gu.blkfront == {"max_ring_page_order": "0", "max_queues": "1", "feature_persistent": "1"}


def test_load_frontend_shall_not_touch_the_clock_of_a_guest_booted_now(tmp_path: Path) -> None:
    """No clock pending: the command is the frontend's own, no `date`."""
    runner, gu = _frontend(tmp_path)
    gu.clock_pending = False
    guests.load_frontend(scenario.load("default"), gu)
    assert runner.calls == [LinuxGuest.frontend_argv(gu.cfg)]
    assert not (tmp_path / "date-args").exists() and gu.frontend_loaded is True


def test_a_clock_that_cannot_be_set_shall_be_the_restores_failure(tmp_path: Path) -> None:
    """`date` failing: LabError at guest:restore with its message, blkfront untouched and still pending."""
    _, gu = _frontend(tmp_path, date_rc=1)
    with pytest.raises(LabError) as e:
        guests.load_frontend(scenario.load("default"), gu)
    assert e.value.stage == "guest:restore" and "date: cannot set" in str(e.value)
    assert not (tmp_path / "modprobe-args").exists()
    assert gu.clock_pending is True and gu.frontend_loaded is False


# ------------------------------------------------------------------ lab/platform/linux/guest.py
def test_disk_present_without_a_wait_shall_be_a_plain_test() -> None:
    """wait_s=0: `test -b`, no shell loop."""
    assert LinuxGuest.disk_present_argv("xvdb") == ["test", "-b", "/dev/xvdb"]
    assert LinuxGuest.disk_present_argv("xvdb", wait_s=0) == ["test", "-b", "/dev/xvdb"]


def test_disk_present_with_a_wait_shall_give_up_on_a_missing_disk(tmp_path: Path) -> None:
    """A device that never appears: rc 1 once the wait is over, not before it and not long after."""
    argv = LinuxGuest.disk_present_argv("xvdzz", wait_s=0.5)
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    took = time.monotonic() - t
    assert argv[:2] == ["sh", "-c"] and p.returncode == 1 and 0.3 <= took < 2.0


def test_disk_present_with_a_wait_shall_find_a_disk_that_is_there() -> None:
    """A block device that is there (the loop's test is `test -b`): rc 0 at once."""
    dev = next((d for d in ("loop0", "sda", "vda", "nvme0n1") if Path(f"/dev/{d}").is_block_device()), None)
    if dev is None:
        pytest.skip("no block device under /dev on this host")
    t = time.monotonic()
    p = subprocess.run(LinuxGuest.disk_present_argv(dev, wait_s=1.5), timeout=10)
    assert p.returncode == 0 and time.monotonic() - t < 0.6


# ------------------------------------------------------------------ lab/platform/linux/dom0.py
def _backings() -> list[Backing]:
    return [Backing("lab-lin1-xvdb", "/dev/mapper/lab-lin1-xvdb", "/dev/vdc", "dm-0"),
            Backing("lab-lin2-xvdb", "/dev/mapper/lab-lin2-xvdb", "/dev/vdd", "dm-1")]


def test_nothing_left_and_unloaded_shall_be_no_leftover_and_no_problem() -> None:
    """`unload-rc=0` and no leftover line: ([], None)."""
    dom0 = LinuxDom0(Canned("open:lab-lin1-xvdb:0\nunload-rc=0\nunload:\n"), timeout=5)
    assert dom0.leftovers_then_unload([1], _backings()[:1]) == ([], None)


def test_a_leftover_node_and_a_refused_unload_shall_both_be_told() -> None:
    """A node of a listed domain stays (one of another domain does not count), and rmmod refused: both said."""
    out = ('xs:/local/domain/0/backend/vbd/1/51728/state = "6"\n'
           'xs:/local/domain/0/backend/vbd/9/51728/state = "4"\n'
           "unload-rc=1\nunload:rmmod: ERROR: Module xen_blkback is in use\nunload:refcnt 2\n")
    left, problem = LinuxDom0(Canned(out), timeout=5).leftovers_then_unload([1], [])
    assert left == ["/local/domain/0/backend/vbd/1/51728 still in xenstore"]
    assert problem is not None and "refuses to unload" in problem and problem.endswith("refcnt 2")


def test_an_answer_cut_short_shall_be_an_unload_problem() -> None:
    """No `unload-rc=` line (the session died mid-script): a problem, not a clean unload."""
    out = 'xs:/local/domain/0/backend/vbd/1/51728/state = "4"\n'
    left, problem = LinuxDom0(Canned(out, rc=255, transport_error="reset"),
                              timeout=5).leftovers_then_unload([1], [])
    assert left == ["/local/domain/0/backend/vbd/1/51728 still in xenstore"]
    assert problem is not None and "(no answer)" in problem


def _dom0_stand_ins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "xenstore-ls", 'printf \'%s\\n\' "/local/domain/0/backend/vbd/1/51728/state = \\"6\\""\n')
    _stand_in(bin_dir, "ps", "printf '%s\\n' sshd 1.xvdb-0 kworker/0:1 7.xvdc-1\n")
    _stand_in(bin_dir, "dmsetup", 'for a; do n=$a; done; case "$n" in lab-lin1-xvdb) echo "  1";; *) echo 0;; esac\n')
    return bin_dir


def test_the_leftovers_and_unload_script_shall_report_under_sh(tmp_path: Path) -> None:
    """The real script with stand-ins: the node, the ring thread and the open device of domain 1; no blkback module here: unloaded."""
    assert not Path("/sys/module/xen_blkback/refcnt").exists()
    runner = ShRunner(_dom0_stand_ins(tmp_path))
    left, problem = LinuxDom0(runner, timeout=10).leftovers_then_unload([1], _backings())
    assert problem is None and len(runner.calls) == 1
    assert left == ["/local/domain/0/backend/vbd/1/51728 still in xenstore",
                    "blkback ring thread 1.xvdb-0 still running",
                    "backing device lab-lin1-xvdb still held open (1 opener(s)): blkback did not release it"]


def test_a_refused_rmmod_under_sh_shall_carry_the_refcount(tmp_path: Path) -> None:
    """The real script with a module loaded (refcnt a file here) and rmmod refusing: the problem names refcnt 2."""
    bin_dir = _dom0_stand_ins(tmp_path)
    _stand_in(bin_dir, "rmmod", "echo 'rmmod: ERROR: Module xen_blkback is in use' >&2; exit 1\n")
    (tmp_path / "refcnt").write_text("2\n")
    runner = ShRunner(bin_dir, {"/sys/module/xen_blkback/refcnt": str(tmp_path / "refcnt")})
    left, problem = LinuxDom0(runner, timeout=10).leftovers_then_unload([7], [])
    assert left == ["blkback ring thread 7.xvdc-1 still running"]
    assert problem is not None and "is in use" in problem and problem.endswith("refcnt 2")


# ------------------------------------------------------------------ lab/teardown.py
class _GuestRunner(Canned):
    def close(self) -> None:
        self.calls.append(["close"])


def _teardown(tmp_path: Path, unfinished: set[str] | None, dom0_out: str = "unload-rc=0\n",
              ) -> tuple[teardown.Teardown, dict[str, _GuestRunner]]:
    """teardown.run on two guests without test disks: a canned dom0 under the real LinuxDom0 ops."""
    runners = {n: _GuestRunner() for n in ("lin1", "lin2")}
    gs = [guests.Guest(scenario.GuestCfg(name=n), f"10.99.0.{10 + i}", i + 1, r, LinuxGuest())  # type: ignore[arg-type]
          for i, (n, r) in enumerate(runners.items())]
    dom0 = Canned(dom0_out)
    (tmp_path / "xen.log").write_text("(XEN) boot\n")
    l1 = SimpleNamespace(dom0=dom0, ops=LinuxDom0(dom0, timeout=5),
                         xen_console=Console(tmp_path / "xen.log", "xen"))
    td = teardown.run(scenario.load("default"), l1, gs, phases={}, unfinished=unfinished)  # type: ignore[arg-type]
    return td, runners


def _pkilled(r: Canned) -> bool:
    return ["sh", "-c", "pkill -x fio; true"] in r.calls


@pytest.mark.parametrize(("unfinished", "killed"), [
    ({"lin2"}, {"lin2"}),
    (set(), set()),
    (None, {"lin1", "lin2"}),
])
def test_teardown_shall_stop_fio_only_in_guests_whose_workload_did_not_end(
        tmp_path: Path, unfinished: set[str] | None, killed: set[str]) -> None:
    """pkill goes to the guests named in `unfinished`; None (not known) sends it to all."""
    _, runners = _teardown(tmp_path, unfinished)
    assert {n for n, r in runners.items() if _pkilled(r)} == killed
    assert all(["close"] in r.calls for r in runners.values())


def test_teardown_shall_take_leftovers_and_the_unload_from_one_round_trip(tmp_path: Path) -> None:
    """The unload step fails with the refusal, which joins the leftover node in the record."""
    out = ('xs:/local/domain/0/backend/vbd/2/51728/state = "6"\n'
           "unload-rc=1\nunload:refcnt 2\n")
    td, _ = _teardown(tmp_path, set(), out)
    last = td.steps[-1]
    assert last.kind == "unload" and last.ok is False and last.detail.endswith("refcnt 2")
    assert td.leftovers[0] == "/local/domain/0/backend/vbd/2/51728 still in xenstore"
    assert td.leftovers[-1] == last.detail and len(td.leftovers) == 2


# ------------------------------------------------------------------ lab/timing.py
def test_a_background_steps_timeout_shall_say_what_it_ran_beside() -> None:
    """`beside` is in the message of a step that outlived the deadline."""
    release = threading.Event()
    job = Background("guest:attach", lambda: release.wait(5), beside="the attach")
    try:
        with pytest.raises(LabError) as e:
            job.result(Deadline(0.1))
    finally:
        release.set()
    assert e.value.stage == "guest:attach" and "run beside the attach" in str(e.value)


# ------------------------------------------------------------------ lab/qemu.py
_NO_QEMU_IMG = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def _info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    info: dict[str, Any] = json.loads(out)
    return info


@_NO_QEMU_IMG
def test_a_runs_disk_shall_be_qcow2_with_4k_clusters(tmp_path: Path) -> None:
    """create_disk: qemu-img reports a qcow2 of the size asked, with 4096-byte clusters."""
    qemu.create_disk(tmp_path / "disk.qcow2", 8 * 1024 * 1024)
    info = _info(tmp_path / "disk.qcow2")
    assert (info["format"], info["cluster-size"], info["virtual-size"]) == ("qcow2", 4096, 8 * 1024 * 1024)


@_NO_QEMU_IMG
def test_a_runs_overlay_shall_have_4k_clusters_over_its_base(tmp_path: Path) -> None:
    """create_overlay: 4096-byte clusters, backed by the base in its format."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1024 * 1024))
    qemu.create_overlay(base, tmp_path / "ov.qcow2")
    info = _info(tmp_path / "ov.qcow2")
    assert (info["format"], info["cluster-size"]) == ("qcow2", 4096)
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "raw"


# ------------------------------------------------------------------ lab/timing.py: sh_poll
def test_sh_poll_shall_stop_at_success_or_run_on_timeout_after_its_seconds(tmp_path: Path) -> None:
    """The shared remote wait: done at once when the condition holds, else
    `on_timeout` after about `seconds` (it ends the loop: here with exit 7)."""
    from lab.timing import sh_poll

    flag = tmp_path / "flag"
    flag.touch()
    t = time.monotonic()
    ok = subprocess.run(["sh", "-c", sh_poll(f"test -e {flag}", 5.0, "exit 7") + "; echo done"],
                        capture_output=True, text=True, timeout=10)
    assert (ok.returncode, ok.stdout) == (0, "done\n") and time.monotonic() - t < 1.0
    flag.unlink()
    t = time.monotonic()
    late = subprocess.run(["sh", "-c", sh_poll(f"test -e {flag}", 0.5, "exit 7") + "; echo done"],
                          capture_output=True, text=True, timeout=10)
    assert (late.returncode, late.stdout) == (7, "") and 0.3 <= time.monotonic() - t < 3.0
