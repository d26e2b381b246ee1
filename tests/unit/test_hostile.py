"""Hostile and careless input (issue 12). The lab runs as root, writes what a
scenario says into xl configs, fio jobs and shell scripts, and deletes directories
and kills processes during cleanup. Each class of bad input below shall be refused
with exit 4 (ERROR) and a message naming what was refused, and nothing shall have
started, been deleted or been killed. Every case runs `lab.cli.main` in-process
against a throwaway LAB_CACHE; no VM is started."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from lab import cli, images, l1state, scenario, workload, xen
from lab.errors import LabError, ScenarioError

RUN_DIR = "run-20260101T000000Z-abcd1234"
KEY = "0123456789abcdef0123"  # what l1state.state_key makes: 20 hex digits


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nothing lands in the real cache or results, and no pipeline may start."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE", str(cache))
    return cache


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records any call of the pipeline: a refused scenario shall start nothing."""
    from lab import pipeline

    calls: list[object] = []
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: calls.append(a) or {})
    return calls


# ------------------------------------------------------------ 1. scenario values
BASE = """name = {name}
{top}
[[guests]]
name = "lin1"
{guest}
[[guests.disks]]
vdev = {vdev}
{disk}
[[workloads]]
guest = "lin1"
{workload}
{tail}
"""


def _scenario(tmp_path: Path, **parts: str) -> Path:
    fields = {"name": '"hostile"', "top": "", "guest": "", "vdev": '"xvdb"', "disk": "", "workload": "", "tail": ""}
    fields.update(parts)
    f = tmp_path / "hostile.toml"
    f.write_text(BASE.format(**fields))
    return f


# (what it tries, the TOML parts, the key path named, words the message shall hold)
HOSTILE_VALUES = [
    ("guest cmdline: '\"' and a newline add a bootloader line to xl.cfg",
     {"guest": r'cmdline = "quiet\"\nbootloader = \"/bin/sh\""'}, "guests[0].cmdline", ["'\\n'", "'\"'"]),
    ("xen cmdline: $(...) for the guests' unquoted `for w in $cmdline`",
     {"tail": '[xen]\ncmdline = "console=com1 $(reboot)"'}, "xen.cmdline", ["'$'", "'('"]),
    ("dom0 cmdline: ';' and a backtick", {"tail": '[dom0]\ncmdline = "quiet; `reboot`"'}, "dom0.cmdline",
     ["';'", "'`'"]),
    ("cmdline: a control character", {"guest": r'cmdline = "quiet\u001b[2J"'}, "guests[0].cmdline", ["'\\x1b'"]),
    ("cpu_model: a second QEMU option", {"tail": '[lab]\ncpu_model = "host -monitor stdio"'}, "lab.cpu_model",
     ["QEMU CPU model"]),
    ("kernel path: a newline", {"guest": r'kernel = "/tmp/k\n-append x"'}, "guests[0].kernel", ["control"]),
    ("dom0 kernel path: a space ends QEMU's module path", {"tail": '[dom0]\nkernel = "/tmp/my kernel"'},
     "dom0.kernel", ["first space"]),
    ("freebsd kernconf: a shell command", {"tail": '[freebsd]\nkernconf = "GENERIC; rm -rf /"'},
     "freebsd.kernconf", ["kernel config name"]),
    ("vdev: more disk-spec keys", {"vdev": '"xvdb, target=/etc/passwd"'}, "guests[0].disks[0].vdev", ["xvdb..xvdz"]),
    ("scenario name: a path", {"name": '"../../etc"'}, "name", ["lower-case"]),
    ("bssplit: a newline adds exec_prerun to the fio job",
     {"workload": r'bssplit = "4k/100\nexec_prerun=reboot"'}, "workloads[0].bssplit", ["SIZE/PERCENT"]),
    ("fio size: a newline adds filename", {"workload": r'size = "1G\nfilename=/dev/xvda"'}, "workloads[0].size",
     ["fio size"]),
    ("fio extra: filename points fio at the guest's root disk",
     {"workload": 'extra = { filename = "/dev/xvda" }'}, "workloads[0].extra", ["refused: 'filename'"]),
    ("fio extra: directory, opendir, filename_format",
     {"workload": 'extra = { directory = "/", opendir = "/", filename_format = "x" }'}, "workloads[0].extra",
     ["'directory', 'filename_format', 'opendir'"]),
    ("fio extra: commands and logs written elsewhere",
     {"workload": 'extra = { exec_prerun = "reboot", write_bw_log = "/etc/x", ioengine = "external:/x.so" }'},
     "workloads[0].extra", ["'exec_prerun', 'ioengine', 'write_bw_log'"]),
    ("fio extra: runtime past the lab's deadline, and other timing",
     {"workload": 'extra = { runtime = "99999", time_based = "0", ramp_time = "60", startdelay = "60" }'},
     "workloads[0].extra", ["'ramp_time', 'runtime', 'startdelay', 'time_based'"]),
    ("fio extra: the output the lab parses", {"workload": 'extra = { group_reporting = "0", output = "/x" }'},
     "workloads[0].extra", ["'group_reporting', 'output'"]),
    ("fio extra: a key holding '=' and a space", {"workload": 'extra = { "rate=1 exec_prerun" = "reboot" }'},
     "workloads[0].extra", ["refused: 'rate=1 exec_prerun'"]),
    ("fio extra: a newline in an allowed option's value",
     {"workload": r'extra = { verify = "crc32c\nexec_prerun=reboot" }'}, "workloads[0].extra",
     ["'verify'", "may hold only"]),
    ("fio extra: ${VAR} expansion in a value", {"workload": 'extra = { rate = "${HOME}" }'}, "workloads[0].extra",
     ["'rate'", "may hold only"]),
    ("duration: TOML nan", {"tail": "[watchdog]\ninterval = nan"}, "watchdog.interval", ["finite", "nan"]),
    ("duration: TOML inf disables the hang check", {"tail": "[watchdog]\nstall_window = inf"},
     "watchdog.stall_window", ["finite"]),
    ("duration: a float that overflows to inf", {"tail": "[deadlines]\ndom0_ssh = 1e400"}, "deadlines.dom0_ssh",
     ["finite"]),
    ("duration: 400 digits", {"tail": '[deadlines]\ncommand = "1' + "0" * 400 + 's"'}, "deadlines.command",
     ["finite"]),
    ("duration: years", {"tail": '[deadlines]\ncommand = "99999h"'}, "deadlines.command", ["at most 7 days"]),
    ("deadline: 0 fails every wait", {"tail": "[deadlines]\ncommand = 0"}, "deadlines.command", ["more than 0s"]),
    ("drain window: 0", {"tail": "[watchdog]\ndrain_window = 0"}, "watchdog.drain_window", ["more than 0s"]),
    ("runtime: 500ms is fio runtime=0, no limit", {"workload": 'runtime = "500ms"'}, "workloads[0].runtime",
     ["at least 1s"]),
    ("size: 0 bytes", {"disk": "size = 0"}, "guests[0].disks[0].size", ["more than 0"]),
    ("size: beyond 1024T", {"disk": 'size = "99999T"'}, "guests[0].disks[0].size", ["at most 1024T"]),
    ("memory: under 1 MiB is -m 0M / memory = 0", {"guest": "memory = 1000"}, "guests[0].memory",
     ["at least 1M"]),
    ("fault: a delay the watchdog would call a hang",
     {"tail": '[[faults]]\nkind = "delay"\nguest = "lin1"\ndelay = "10s"'}, "faults[0].delay",
     ["needs watchdog.stall_window of at least 30s", "3x the delay", "it is 15s"]),
    ("fault: a delay near the window", {"tail": '[watchdog]\nstall_window = "20s"\n[[faults]]\nkind = "delay"\n'
                                                'guest = "lin1"\ndelay = "8s"'}, "faults[0].delay",
     ["at least 24s", "it is 20s"]),
]


@pytest.mark.parametrize(("what", "parts", "key", "needles"), HOSTILE_VALUES, ids=[c[0] for c in HOSTILE_VALUES])
def test_hostile_scenario_values_shall_exit_4_naming_key_and_reason_and_start_nothing(
    tmp_path: Path, _isolated: Path, started: list[object], capsys: pytest.CaptureFixture[str],
    what: str, parts: dict[str, str], key: str, needles: list[str],
) -> None:
    f = _scenario(tmp_path, **parts)
    assert cli.main(["run", str(f)]) == 4, what
    out, err = capsys.readouterr()
    assert f"key '{key}'" in err and str(f) in err, err
    for n in needles:
        assert n in err, (n, err)
    assert out == ""
    assert started == [], "the pipeline shall not have been called"
    assert not (_isolated / "runs").exists() and not (tmp_path / "results").exists()


def test_the_base_of_the_hostile_cases_shall_be_valid(tmp_path: Path) -> None:
    """Each case above fails because of its one change."""
    sc = scenario.load(_scenario(tmp_path))
    assert sc.guests[0].disks[0].vdev == "xvdb"
    ok = _scenario(tmp_path, workload='extra = { fsync = "8", verify = "crc32c", rate_iops = 100 }',
                   tail='[[faults]]\nkind = "delay"\nguest = "lin1"\ndelay = "5s"')
    assert scenario.load(ok).faults[0].delay == 5, "a third of the default 15s window is accepted"


def _unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    f = _scenario(tmp_path)
    real = Path.read_text

    def read_text(self: Path, *a: object, **k: object) -> str:
        if self == f:  # root reads a mode-000 file anyway: simulate EACCES
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    return f


def _fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    f = tmp_path / "fifo.toml"
    os.mkfifo(f)
    return f


def _latin1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    f = tmp_path / "latin1.toml"
    f.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))
    return f


def _directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "dir.toml"
    d.mkdir()
    return d


def _under_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "plain").write_text("")
    return tmp_path / "plain" / "x.toml"


@pytest.mark.parametrize(("make", "needle"), [
    (_latin1, "not UTF-8 text"), (_directory, "found a directory"), (_fifo, "found a special file"),
    (_unreadable, "cannot be read: Permission denied"), (_under_a_file, "cannot be read: Not a directory"),
], ids=["non-utf8", "directory", "fifo", "unreadable", "under-a-file"])
def test_files_that_are_no_readable_toml_text_shall_exit_4_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[object], capsys: pytest.CaptureFixture[str],
    make, needle: str,  # type: ignore[no-untyped-def]
) -> None:
    f = make(tmp_path, monkeypatch)
    assert cli.main(["run", str(f)]) == 4
    err = capsys.readouterr().err
    assert str(f) in err and needle in err, err
    assert started == []


# -------------------------------------------- 1b. the writers check again
def test_xl_cfg_shall_escape_quotes_and_refuse_newlines() -> None:
    """A value built in code does not pass the loader: the template escapes."""
    base = dict(name="lin1", run_id="r", kernel="/k", ramdisk="/i", memory_mib=320, vcpus=1, disks=[],
                mac="00:16:3e:00:00:0a")
    cfg = xen.render_xl_cfg(**base, cmdline='quiet" bootloader="/bin/sh')
    (extra,) = [line for line in cfg.splitlines() if line.startswith("extra")]
    assert extra == r'extra = "quiet\" bootloader=\"/bin/sh"'
    assert not any(line.startswith("bootloader") for line in cfg.splitlines())
    assert xen.xl_string("a\\b") == r'"a\\b"'
    for bad in ({"cmdline": 'quiet"\nbootloader="/bin/sh"'}, {"name": "x\ny"}, {"run_id": "r\nbootloader='x'"},
                {"disks": [xen.XlDisk("xvdb", "/dev/x, vdev=xvda")]}, {"disks": [xen.XlDisk("xvda'", "/dev/x")]},
                {"mac": "00:16:3e:00:00:0a, script=/bin/sh"}, {"vcpus": "1\nbootloader='x'"}):
        params = {**base, "cmdline": "quiet", **bad}
        with pytest.raises(LabError) as e:
            xen.render_xl_cfg(**params)
        assert e.value.stage == "guest:create"


def test_fio_job_shall_refuse_newlines_and_option_abuse() -> None:
    w = scenario.WorkloadCfg(guest="lin1", disk="xvdb")
    assert "exec_prerun" not in workload.fio_job(w, "/dev/xvdb")
    for bad, needle in [
        (dict(bssplit="4k/100\nexec_prerun=reboot"), "bssplit"),
        (dict(size="1G\nfilename=/dev/xvda"), "fio size"),
        (dict(extra={"filename": "/dev/xvda"}), "refused: 'filename'"),
        (dict(extra={"runtime": "9999"}), "refused: 'runtime'"),
        (dict(extra={"verify": "crc32c\nexec_prerun=reboot"}), "may hold only"),
        (dict(extra={"a=b": "1"}), "refused: 'a=b'"),
    ]:
        with pytest.raises(ScenarioError, match=needle):
            workload.fio_job(scenario.WorkloadCfg(guest="lin1", disk="xvdb", **bad), "/dev/xvdb")  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match="test disk device"):
        workload.fio_job(w, "/dev/xvdb\nexec_prerun=reboot")


# ------------------------------------------------------------ 2a. lab states rm
def _state(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text('{"created": 1}')
    (d / "l1.state").write_bytes(b"x")
    return d


@pytest.mark.parametrize("keys", [
    ["../precious"], ["PRECIOUS_ABS"], ["."], [""], [".."], ["../.."], [KEY[:-1]], [KEY.upper()], [KEY + "/.."],
    [KEY, "../precious"],  # a good key beside a bad one: nothing at all is deleted
    ["--all"],  # the store holds a directory that is no state key
    ["LINK"],  # a state-key-shaped symlink out of the store
], ids=lambda k: " ".join(k) or "empty")
def test_states_rm_shall_refuse_anything_but_state_keys_and_delete_nothing(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str], keys: list[str],
) -> None:
    store = l1state.states_dir()
    good = _state(store, KEY)
    evil = _state(store, "evil")  # listed by `states list`, but not a key
    precious = _state(_isolated, "precious")  # beside the store: ../precious
    victim = _state(tmp_path, "victim")  # anywhere: an absolute path
    link = "fedcba9876543210fedc"
    (store / link).symlink_to(victim)
    keys = [{"PRECIOUS_ABS": str(victim), "LINK": link}.get(k, k) for k in keys]
    assert cli.main(["states", "rm", *keys]) == 4
    err = capsys.readouterr().err
    assert "nothing deleted" in err and ("not state keys" in err or "symlink" in err), err
    for d in (good, evil, precious, victim):
        assert (d / "l1.state").exists(), d
    assert (store / link).is_symlink()


def test_states_rm_of_a_real_key_shall_delete_only_that_state(_isolated: Path) -> None:
    store = l1state.states_dir()
    good, other = _state(store, KEY), _state(store, "fedcba9876543210fedc")
    assert cli.main(["states", "rm", KEY]) == 0
    assert not good.exists() and other.exists()
    for bad in ("../x", "/", ".", "", KEY.upper()):
        with pytest.raises(LabError, match="not a state key"):
            l1state.remove(bad)


# ------------------------------------------------------------ 2b. lab down, lab ssh
def _kept_lab(tmp_path: Path, cache: Path, **info: object) -> tuple[Path, Path]:
    """A results directory with a lab.json like pipeline._leave_running writes."""
    work = cache / "runs" / RUN_DIR
    work.mkdir(parents=True, exist_ok=True)
    (work / "d0.qcow2").write_bytes(b"x")
    lab = tmp_path / "results" / "kept"
    lab.mkdir(parents=True, exist_ok=True)
    data = {"qemu_pid": 1 << 22, "ssh_port": 2222, "work": str(work), "socket_dirs": [],
            "keys": str(cache / "keys"), "guests": {"lin1": "10.0.2.20"}}
    data.update(info)
    import json

    (lab / "lab.json").write_text(json.dumps(data))
    return lab, work


def _started(p: subprocess.Popen[bytes], argv0: str) -> subprocess.Popen[bytes]:
    """`p` once it has exec'd: until then /proc/PID/cmdline is pytest's own."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] != argv0.encode():
        assert time.monotonic() < deadline, "the helper process did not start"
        time.sleep(0.01)
    return p


def _sleep() -> subprocess.Popen[bytes]:
    """A stranger's process: `sleep 600` in its own session."""
    return _started(subprocess.Popen(["sleep", "600"], start_new_session=True), "sleep")


def _spawn(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A harmless process (Python sleeping) whose command line reads `argv0 args...`,
    in its own session like the lab's QEMU."""
    return _started(subprocess.Popen([argv0, "-c", "import time; time.sleep(600)", *args],
                                     executable=sys.executable, start_new_session=True), argv0)


def _end(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


def _alive(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is None


def test_down_shall_not_kill_a_process_that_is_not_the_labs_qemu(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A reused pid: lab.json names a stranger's `sleep`. Not killed, nothing deleted."""
    sleeper = _sleep()
    try:
        lab, work = _kept_lab(tmp_path, _isolated, qemu_pid=sleeper.pid)
        assert cli.main(["down", str(lab)]) == 4
        err = capsys.readouterr().err
        assert f"process {sleeper.pid} is not qemu-system-x86_64" in err and "sleep 600" in err, err
        assert "nothing was killed or deleted" in err
        time.sleep(0.2)
        assert _alive(sleeper), "the stranger's process shall live"
        assert (work / "d0.qcow2").exists() and (lab / "lab.json").exists()
    finally:
        _end(sleeper)


def test_down_shall_not_kill_another_labs_qemu(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    other = _spawn("qemu-system-x86_64", "-drive", f"file={tmp_path}/elsewhere/d0.qcow2,if=none")
    try:
        lab, work = _kept_lab(tmp_path, _isolated, qemu_pid=other.pid)
        assert cli.main(["down", str(lab)]) == 4
        err = capsys.readouterr().err
        assert "is a QEMU that uses no file of" in err and str(work) in err, err
        time.sleep(0.2)
        assert _alive(other) and (work / "d0.qcow2").exists()
    finally:
        _end(other)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("work", "VICTIM", "not a run directory inside the lab's runs directory"),
    ("work", "RUNS/../../victim", "not a run directory inside"),
    ("work", "RUNS/run-link", "not a run directory inside"),  # a symlink in runs/ to the victim
    ("work", "RUNS", "not a run directory inside"),
    ("work", "victim", "not a run directory inside"),  # relative: resolved against the cwd
    ("work", "", "not a path"),
    ("work", None, "not a path"),
    ("socket_dirs", ["VICTIM"], "not a lab-qmp-* directory under /tmp"),
    ("socket_dirs", ["/tmp/lab-qmp-x/../.."], "not a lab-qmp-* directory under /tmp"),
    ("qemu_pid", "1; reboot", "not a process id"),
    ("qemu_pid", 1, "not a process id"),
    ("qemu_pid", -1, "not a process id"),
], ids=lambda v: str(v))
def test_down_shall_refuse_a_lab_json_that_names_what_the_lab_did_not_make(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, needle: str,
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    runs = _isolated / "runs"
    runs.mkdir(parents=True)
    (runs / "run-link").symlink_to(victim)

    def fill(v: object) -> object:
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, str):
            return v.replace("VICTIM", str(victim)).replace("RUNS", str(runs))
        return v

    lab, work = _kept_lab(tmp_path, _isolated, **{field: fill(value)})
    assert cli.main(["down", str(lab)]) == 4
    err = capsys.readouterr().err
    assert needle in err and "nothing was killed or deleted" in err, err
    assert (victim / "precious").exists() and (work / "d0.qcow2").exists() and (lab / "lab.json").exists()


def test_down_shall_refuse_a_lab_json_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = tmp_path / "kept"
    lab.mkdir()
    (lab / "lab.json").write_bytes(b"\xff{not json")
    assert cli.main(["down", str(lab)]) == 4
    assert "is not a lab.json the lab wrote" in capsys.readouterr().err


def test_down_shall_kill_its_own_qemu_and_delete_only_its_files(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The positive case: a process whose command line is this lab's QEMU's."""
    import tempfile

    sock = Path(tempfile.mkdtemp(prefix="lab-qmp-", dir="/tmp"))
    work = _isolated / "runs" / RUN_DIR
    qemu = _spawn("qemu-system-x86_64", "-drive", f"file={work}/d0.qcow2,if=none,id=d0", "-qmp",
                  f"unix:{sock}/qmp.sock,server=on,wait=off")
    try:
        lab, work = _kept_lab(tmp_path, _isolated, qemu_pid=qemu.pid, socket_dirs=[str(sock)])
        neighbour = _isolated / "runs" / "run-20260101T000001Z-other"
        neighbour.mkdir()
        assert cli.main(["down", str(lab)]) == 0, capsys.readouterr().err
        assert qemu.wait(timeout=10) == -signal.SIGKILL
        assert not work.exists() and not sock.exists() and neighbour.exists()
        assert (lab / "lab.json.down").exists() and not (lab / "lab.json").exists()
    finally:
        _end(qemu)
        if sock.exists():
            sock.rmdir()


def test_down_of_a_lab_whose_qemu_is_gone_shall_delete_its_work_dir(tmp_path: Path, _isolated: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    lab, work = _kept_lab(tmp_path, _isolated, qemu_pid=gone.pid)
    assert cli.main(["down", str(lab)]) == 0
    assert not work.exists()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("keys", "/root/.ssh", "not the lab's key directory"),
    ("ssh_port", "22; reboot", "not a TCP port"),
    ("ssh_port", 70000, "not a TCP port"),
    ("guests", {"lin1": "10.0.2.20 -oProxyCommand=reboot"}, "IPv4"),
    ("work", "/etc", "not a run directory inside"),
], ids=lambda v: str(v))
def test_ssh_shall_refuse_a_lab_json_that_names_what_the_lab_did_not_make(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, needle: str,
) -> None:
    lab, _ = _kept_lab(tmp_path, _isolated, **{field: value})
    assert cli.main(["ssh", "dom0", "--lab", str(lab)]) == 4
    assert needle in capsys.readouterr().err


def test_ssh_shall_not_take_a_strangers_process_for_the_labs_qemu(
    tmp_path: Path, _isolated: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    sleeper = _sleep()
    try:
        lab, _ = _kept_lab(tmp_path, _isolated, qemu_pid=sleeper.pid)
        assert cli.main(["ssh", "dom0", "--lab", str(lab)]) == 4
        assert "is no longer running" in capsys.readouterr().err
        assert _alive(sleeper)
    finally:
        _end(sleeper)


# ------------------------------------------------------------ 3. keys and image modes
def test_private_keys_shall_be_created_0600_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        fd = real_open(path, flags, mode, **kw)  # type: ignore[arg-type]
        created.append((os.fspath(path), flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(images.os, "open", spy)
    keys = images.ensure_keys(tmp_path)
    private = [(p, fl, m) for p, fl, m in created if not p.endswith((".pub", ".lock"))]
    assert len(private) == 3
    for path, flags, mode in private:
        assert flags & os.O_CREAT and flags & os.O_EXCL, path
        assert mode == 0o600, f"{path} was {oct(mode)} when created"
    for path in (keys.client, keys.host("dom0"), keys.host("guest")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in keys.dir.iterdir() if ".building-" in p.name]


def _keys_behind_barrier(base: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    images.ensure_keys(Path(base))


def test_concurrent_first_key_generation_shall_leave_matching_pairs(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_keys_behind_barrier, args=(str(tmp_path), barrier)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    keys = images.Keys(tmp_path / "keys")
    for path in (keys.client, keys.host("dom0"), keys.host("guest")):
        key = paramiko.Ed25519Key.from_private_key_file(str(path))
        assert keys.public(path).split()[1] == key.get_base64(), f"{path}: the pair does not match"
    assert not [p for p in keys.dir.iterdir() if ".building-" in p.name]


def test_image_files_holding_the_host_key_shall_be_readable_by_root_only(tmp_path: Path) -> None:
    for name in ("root.img", "initrd.img", "vmlinuz", "xen", "manifest.json"):
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / name).chmod(0o444)  # what images built before this rule have
    images.restrict_modes(tmp_path)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
    assert modes == {"root.img": 0o400, "initrd.img": 0o400, "vmlinuz": 0o444, "xen": 0o444, "manifest.json": 0o444}
