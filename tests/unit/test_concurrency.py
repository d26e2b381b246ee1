"""Concurrent runs, interrupts, orphans and quoted paths (issue 12, items 3, 4, 5, 7).

Concurrency: processes started behind a multiprocessing barrier race for results
directories, the hash memo and the promotion of one saved state. (Concurrent
first-time key generation is tested the same way in test_hostile.py.)

Interrupts and orphans: no QEMU is ever started. A "QEMU" here is a harmless
stand-in (`sleep`, or Python sleeping under another name), started by the test
and killed only by its pid."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lab import bisect, images, l1state, orphans, qemu, report
from lab.errors import Interrupted, LabError

CTX = multiprocessing.get_context("fork")
FAKE_QEMU = "lab-test-qemu"  # what counts as QEMU for the orphan tests: never a real one


def _join_all(procs: list[multiprocessing.process.BaseProcess], timeout: float = 60) -> list[int | None]:
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


# ------------------------------------------------------------ results directories
def _results_dir_behind_barrier(root: str, barrier: multiprocessing.synchronize.Barrier,
                                q: multiprocessing.Queue[str]) -> None:
    barrier.wait()
    q.put(str(report.make_results_dir(Path(root), "default")))


def test_80_runs_started_at_once_shall_each_get_their_own_results_directory(tmp_path: Path) -> None:
    n = 80
    barrier = CTX.Barrier(n)
    q: multiprocessing.Queue[str] = CTX.Queue()
    procs = [CTX.Process(target=_results_dir_behind_barrier, args=(str(tmp_path), barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in range(n)]
    assert _join_all(procs) == [0] * n, "no make_results_dir shall fail"
    assert len(set(got)) == n, "every run shall have its own directory"
    assert all(Path(d).is_dir() and Path(d).parent == tmp_path / "default" for d in got)
    latest = tmp_path / "latest"
    assert latest.is_symlink() and str(latest.resolve()) in got
    assert not list(tmp_path.glob(".latest.*")), "no temporary link left behind"


# ------------------------------------------------------------ the hash memo
def _file_ids_behind_barrier(files: list[str], barrier: multiprocessing.synchronize.Barrier,
                             q: multiprocessing.Queue[dict[str, str]]) -> None:
    barrier.wait()
    q.put({f: l1state._file_id(Path(f)) for f in files})


def test_runs_hashing_at_once_shall_never_read_a_torn_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    files = []
    for i in range(12):
        f = tmp_path / f"kernel-{i}"
        f.write_bytes(os.urandom(1000) * (i + 1))
        files.append(str(f))
    n = 12
    barrier = CTX.Barrier(n)
    q: multiprocessing.Queue[dict[str, str]] = CTX.Queue()
    # each process hashes the files in another order, so the memo is rewritten all along
    procs = [CTX.Process(target=_file_ids_behind_barrier, args=(files[i:] + files[:i], barrier, q)) for i in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in range(n)]
    assert _join_all(procs) == [0] * n
    want = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    assert all(g == want for g in got)
    memo = images.cache_dir() / "hash-memo.json"
    json.loads(memo.read_text())  # whole
    assert [p.name for p in memo.parent.iterdir() if p.name != "hash-memo.json"] == []


# ------------------------------------------------------------ state promotion
KEY = "0123456789abcdef0123"


def _state_behind_barrier(barrier: multiprocessing.synchronize.Barrier, q: multiprocessing.Queue[str]) -> None:
    st = l1state.begin(KEY)
    (st.dir / "l1.state").write_text(f"ram of {os.getpid()}")
    (st.dir / "meta.json").write_text(json.dumps({"pid": os.getpid()}))
    barrier.wait()  # every state built aside, now all promote at once
    kept = l1state.promote(st, "PASS")
    assert kept is not None
    q.put(f"{os.getpid()} {st.dir} {kept.dir}")


def test_runs_saving_the_same_state_at_once_shall_keep_exactly_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    n = 8
    barrier = CTX.Barrier(n)
    q: multiprocessing.Queue[str] = CTX.Queue()
    procs = [CTX.Process(target=_state_behind_barrier, args=(barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60).split() for _ in range(n)]
    assert _join_all(procs) == [0] * n, "no promotion shall raise"
    final = l1state.states_dir() / KEY
    assert {kept for _, _, kept in got} == {str(final)}, "every run shall be told the one state kept"
    entries = [p.name for p in l1state.states_dir().iterdir() if not p.name.endswith(".lock")]
    assert entries == [KEY], f"exactly one state, no building directory left: {entries}"
    winner = json.loads((final / "meta.json").read_text())["pid"]
    assert (final / "l1.state").read_text() == f"ram of {winner}", "the kept state is one whole build"
    assert str(winner) in {pid for pid, _, _ in got}
    assert not any(Path(aside).exists() for _, aside, _ in got)


# ------------------------------------------------------------ exec: URIs
@pytest.mark.parametrize("name", ["cache with space", "cache$HOME", "c;touch pwned", "it's `x` $(x)"])
def test_state_uris_shall_reach_the_shell_as_one_path(tmp_path: Path, name: str) -> None:
    """QEMU runs an exec: URI as `/bin/sh -c COMMAND`; so does this test."""
    state = tmp_path / name / "l1-states" / "k" / "l1.state"
    state.parent.mkdir(parents=True)
    save, load = l1state.save_uri(state), l1state.load_uri(state)
    assert save.startswith("exec:") and load.startswith("exec:")
    subprocess.run(["/bin/sh", "-c", save.removeprefix("exec:")], input=b"RAM", check=True, cwd=tmp_path)
    assert state.read_bytes() == b"RAM"
    out = subprocess.run(["/bin/sh", "-c", load.removeprefix("exec:")], capture_output=True, check=True,
                         cwd=tmp_path)
    assert out.stdout == b"RAM"
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not [m for m in made if not m.startswith(name)], f"the shell made something else: {made}"


# ------------------------------------------------------------ QEMU is never unowned
@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`qemu-system-x86_64` for lab/qemu.py: a script that sleeps."""
    exe = tmp_path / "fake-qemu"
    exe.write_text("#!/bin/sh\nexec sleep 60\n")
    exe.chmod(0o755)
    monkeypatch.setattr(qemu, "QEMU", str(exe))
    return exe


def _spec(tmp_path: Path) -> qemu.VmSpec:
    return qemu.VmSpec(accel="tcg", cpus=1, memory_mib=64, xen=None, xen_cmdline="", modules=[], drives=[],
                       ssh_port=1, console_log=tmp_path / "console.log", qmp_sock=None, network=False)


def _spy_popen(monkeypatch: pytest.MonkeyPatch, after: object = None) -> list[subprocess.Popen[bytes]]:
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(*a: object, **kw: object) -> subprocess.Popen[bytes]:
        p = real(*a, **kw)  # type: ignore[call-overload]
        started.append(p)
        if callable(after):
            after()
        return p  # type: ignore[no-any-return]

    monkeypatch.setattr(qemu.subprocess, "Popen", popen)
    return started


def _gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    """Clean up after a failed assertion: only a process this test started."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_ctrl_c_during_the_start_check_shall_stop_qemu(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = _spy_popen(monkeypatch)

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    import types

    # the start check's sleep only (Popen.wait sleeps too)
    monkeypatch.setattr(qemu, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    with pytest.raises(KeyboardInterrupt):
        qemu.start(_spec(tmp_path), tmp_path / "stderr.log")
    assert len(started) == 1
    try:
        assert started[0].poll() is not None, "QEMU shall be stopped, not left running"
    finally:
        _kill(started[0].pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_popen_returns_shall_be_held_until_qemu_is_owned(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch, sig: int,
) -> None:
    """The signal comes right after fork/exec, before `start` could bind the Vm:
    it is raised once the Vm is owned, and that QEMU is stopped."""
    import contextlib

    from lab.pipeline import signals_as_interrupts

    started = _spy_popen(monkeypatch, after=lambda: os.kill(os.getpid(), sig))
    owner = contextlib.ExitStack()
    with signals_as_interrupts(), pytest.raises((KeyboardInterrupt, Interrupted)):
        qemu.start(_spec(tmp_path), tmp_path / "stderr.log", owner=owner)
    assert len(started) == 1
    try:
        assert started[0].poll() is not None, "QEMU shall be stopped, not left running"
        owner.close()  # the owner's own stop: safe a second time
    finally:
        _kill(started[0].pid)


CHILD_QEMU = """
import sys, time
from pathlib import Path
from lab import qemu
qemu.QEMU = sys.argv[1]
tmp = Path(sys.argv[2])
spec = qemu.VmSpec(accel="tcg", cpus=1, memory_mib=64, xen=None, xen_cmdline="", modules=[], drives=[],
                   ssh_port=1, console_log=tmp / "console.log", qmp_sock=None, network=False)
vm = qemu.start(spec, tmp / "stderr.log")
print(vm.pid, flush=True)
time.sleep(60)
"""

CHILD_RUNNER = """
import sys
from lab.runner import LocalRunner
print("go", flush=True)
LocalRunner().run(["sleep", "61"], timeout=120)
"""


def _children(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (t / "children").read_text().split()]
    return kids


@pytest.mark.parametrize("what", ["qemu", "runner"])
def test_children_shall_die_with_a_lab_killed_by_sigkill(tmp_path: Path, fake_qemu: Path, what: str) -> None:
    """QEMU and the tools run in their own sessions (a deadline kills the group):
    PR_SET_PDEATHSIG still ends them when `lab` is SIGKILLed."""
    argv = ([sys.executable, "-c", CHILD_QEMU, str(fake_qemu), str(tmp_path)] if what == "qemu"
            else [sys.executable, "-c", CHILD_RUNNER])
    lab = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    child = 0
    try:
        assert lab.stdout is not None
        line = lab.stdout.readline().strip()
        deadline = time.monotonic() + 10
        while not child and time.monotonic() < deadline:
            kids = _children(lab.pid)
            child = int(line) if what == "qemu" else (kids[0] if kids else 0)
            if what == "runner" and child:
                # until exec the child's cmdline is Python's
                while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            time.sleep(0.05)
        assert child, "the lab's child did not start"
        assert child in _children(lab.pid)
        lab.kill()
        lab.wait(10)
        assert _gone(child), f"pid {child} outlived the lab"
    finally:
        lab.kill()
        lab.wait(10)
        if child:
            _kill(child)


# ------------------------------------------------------------ orphans of dead runs
def _spawn(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A harmless process (Python sleeping) whose command line reads `argv0 args...`,
    in its own session like the lab's QEMU."""
    p = subprocess.Popen([argv0, "-c", "import time; time.sleep(60)", *args], executable=sys.executable,
                         start_new_session=True)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] != argv0.encode():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    return p


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _run_dir(runs: Path, name: str, **owner: object) -> Path:
    d = runs / f"run-20260101T000000Z-{name}"
    d.mkdir(parents=True)
    (d / "dom0-root.qcow2").write_bytes(b"x")
    if owner:
        (d / "owner.json").write_text(json.dumps(owner))
    return d


@pytest.fixture
def procs() -> list[subprocess.Popen[bytes]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started  # type: ignore[misc]
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_the_sweep_shall_end_the_qemu_of_a_dead_run_and_remove_its_files(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    runs = tmp_path / "runs"
    d = runs / "run-20260101T000000Z-dead"
    sock = Path(tempfile.mkdtemp(prefix="lab-qmp-", dir="/tmp"))
    q = _spawn(FAKE_QEMU, "-drive", f"file={d}/dom0-root.qcow2,if=none", "-qmp",
               f"unix:{sock}/qmp.sock,server=on,wait=off")
    procs.append(q)
    _run_dir(runs, "dead", pid=_dead_pid(), qemu_pid=q.pid, results=str(tmp_path / "results"))
    got = orphans.sweep_runs(runs, qemu_name=FAKE_QEMU)
    assert q.wait(timeout=10) == -signal.SIGKILL
    assert got == {"ended": [{"pid": q.pid, "run": str(d)}], "removed": [str(d)], "left": []}
    assert not d.exists() and not sock.exists()


def test_the_sweep_shall_find_an_orphan_the_owner_file_does_not_name(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    """Killed between starting QEMU and writing its pid: the command line proves it."""
    runs = tmp_path / "runs"
    d = runs / "run-20260101T000000Z-early"
    q = _spawn(FAKE_QEMU, "-drive", f"file={d}/boot.img,if=none")
    procs.append(q)
    _run_dir(runs, "early", pid=_dead_pid(), qemu_pid=None)
    got = orphans.sweep_runs(runs, qemu_name=FAKE_QEMU)
    assert q.wait(timeout=10) == -signal.SIGKILL
    assert got["ended"] == [{"pid": q.pid, "run": str(d)}] and not d.exists()


def test_the_sweep_shall_never_signal_what_it_cannot_prove_is_that_runs_qemu(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    runs = tmp_path / "runs"
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the reused pid of a dead QEMU
    other = _spawn(FAKE_QEMU, "-drive", f"file={tmp_path}/elsewhere/d0.qcow2,if=none")  # another lab's
    procs += [stranger, other]  # type: ignore[list-item]
    a = _run_dir(runs, "a", pid=_dead_pid(), qemu_pid=stranger.pid)
    b = _run_dir(runs, "b", pid=_dead_pid(), qemu_pid=other.pid)
    got = orphans.sweep_runs(runs, qemu_name=FAKE_QEMU)
    time.sleep(0.2)
    assert stranger.poll() is None and other.poll() is None, "nothing unproven shall be signalled"
    assert got["ended"] == [] and sorted(got["removed"]) == [str(a), str(b)]


def test_the_sweep_shall_leave_live_runs_kept_labs_and_young_directories(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    runs = tmp_path / "runs"
    live_dir = runs / "run-20260101T000000Z-live"
    live_q = _spawn(FAKE_QEMU, "-drive", f"file={live_dir}/d.qcow2,if=none")
    kept_dir = runs / "run-20260101T000000Z-kept"
    kept_q = _spawn(FAKE_QEMU, "-drive", f"file={kept_dir}/d.qcow2,if=none")
    procs += [live_q, kept_q]
    _run_dir(runs, "live", pid=os.getpid(), qemu_pid=live_q.pid)  # this process: a run in progress
    results = tmp_path / "results" / "kept"
    results.mkdir(parents=True)
    (results / "lab.json").write_text(json.dumps({"qemu_pid": kept_q.pid, "work": str(kept_dir)}))
    _run_dir(runs, "kept", pid=_dead_pid(), qemu_pid=kept_q.pid, results=str(results))
    young = _run_dir(runs, "young")  # made a moment ago by a run that has not written owner.json yet
    old = _run_dir(runs, "old")  # no owner.json and old: a run killed before it wrote one
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    (runs / "run-link").symlink_to(victim)
    got = orphans.sweep_runs(runs, qemu_name=FAKE_QEMU)
    time.sleep(0.2)
    assert live_q.poll() is None and kept_q.poll() is None
    assert got == {"ended": [], "removed": [str(old)], "left": []}
    assert live_dir.exists() and kept_dir.exists() and young.exists() and (victim / "precious").exists()


def test_lab_down_and_the_sweep_share_one_proof() -> None:
    from lab import cli

    assert cli._lab_qemu_problem is orphans.lab_qemu_problem


# ------------------------------------------------------------ SIGTERM to lab bisect
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    _git(tmp_path, "init", "-q", "-b", "work", str(r))
    for i in range(6):
        (r / "f").write_text(f"{i}\n")
        _git(r, "add", "f")
        _git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", f"change {i}")
    return r


def _bisect_in_child(repo: str, results: str, pidfile: str, q: multiprocessing.Queue[str]) -> None:
    """`lab bisect` with a stand-in step: a shell that writes its pid and sleeps."""
    import types

    sc = types.SimpleNamespace(name="stand-in", source="stand-in.toml", dom0=types.SimpleNamespace(os="linux"))
    bisect.scenario.load = lambda spec: sc  # type: ignore[assignment,return-value]
    bisect.preflight = lambda s: None  # type: ignore[assignment]
    bisect.with_source = lambda s, r: s  # type: ignore[assignment]
    bisect._step_argv = lambda *a: ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]  # type: ignore[assignment]
    try:
        bisect.bisect("stand-in", Path(repo), "HEAD~5", "HEAD", runs=1, results_root=Path(results))
        q.put("returned")
    except Interrupted as e:
        q.put(f"interrupted: {e}")
    except LabError as e:
        q.put(f"error: {e}")


def test_sigterm_to_bisect_shall_end_git_bisect_run_and_restore_the_repository(repo: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "step.pid"
    q: multiprocessing.Queue[str] = CTX.Queue()
    p = CTX.Process(target=_bisect_in_child, args=(str(repo), str(tmp_path / "results"), str(pidfile), q))
    p.start()
    step = 0
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline and p.is_alive(), "the bisect step never started"
            time.sleep(0.05)
        step = int(pidfile.read_text())
        assert (repo / ".git" / "BISECT_LOG").exists(), "mid-bisect"
        assert p.pid is not None
        os.kill(p.pid, signal.SIGTERM)
        assert q.get(timeout=60) == "interrupted: signal SIGTERM"
        p.join(30)
        assert p.exitcode == 0
        assert _gone(step), "the step (and its sleep) shall be ended, not left running"
        assert _git(repo, "symbolic-ref", "--short", "HEAD") == "work"
        assert not list((repo / ".git").glob("BISECT_*"))
        assert _git(repo, "status", "--porcelain") == ""
        rec = json.loads(next((tmp_path / "results" / "bisect").glob("*/bisect.json")).read_text())
        assert rec["repository"] == "restored: on branch work, no BISECT_* state"
    finally:
        if p.is_alive():
            p.kill()
        if step:
            _kill(step)


def test_what_is_left_of_a_bisection_shall_be_named(repo: Path) -> None:
    assert bisect._left_in(repo, "work", branch=True) == []
    _git(repo, "bisect", "start", "HEAD", "HEAD~5")
    left = bisect._left_in(repo, "work", branch=True)
    assert any("BISECT_LOG" in x for x in left) and any("not on branch work" in x for x in left), left
    assert any("refs/bisect/" in x for x in left)
    assert bisect._put_back(repo, "work", branch=True, stray=[]) == []
    assert _git(repo, "symbolic-ref", "--short", "HEAD") == "work"
