"""The host side of the `libvirt` L0 driver: libvirt's daemons, and what QEMU
may read when libvirt runs it.

Daemons: on a machine without systemd nothing starts libvirtd (facts/xen-under-
qemu.md, "libvirt on this machine"): the lab starts `virtlogd -d`, then
`libvirtd -d` (not `-l`: listening on TCP needs TLS certificates), and says so in
the record. A daemon that answers is used as it is; one the lab did not start is
never stopped (`stop_daemons` ends only pids from its own record, checked again).

Access: libvirt runs QEMU as an unprivileged user (Debian: libvirt-qemu) and, with
dynamic ownership, chowns each disk image (and its backing chain) to it while the
domain runs; it does not touch the directories on the way, nor the files that go
through <qemu:commandline> (Xen and dom0's kernel and initrd). When the domain
stops it gives the writable top image back, but read-only images and backing
layers stay owned by libvirt-qemu (measured, 9.0: they may be shared). QEMU's own
error names the file, not the directory that blocks it, and only once libvirt
has started it: `check_readable` says which directory blocks which file before
the domain is created."""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat as statmod
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lab import qemu
from lab.errors import LabError
from lab.runner import LocalRunner, Runner
from lab.timing import Deadline, wait_until

log = logging.getLogger("lab.libvirt")
RUN = Path("/run/libvirt")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


# ------------------------------------------------------------ processes and paths
def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or
    None if it is gone or a zombie: with the pid, it names one process (pids are
    reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # state ppid pgrp ... (field 3 onwards)
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def run_paths(uri: str, name: str) -> tuple[Path, Path]:
    """(pid file, log) libvirt keeps for domain `name`: /run/libvirt/qemu and
    /var/log/libvirt/qemu for qemu:///system; under the user's runtime and cache
    directories for qemu:///session."""
    if "/session" in uri:
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return runtime / "libvirt/qemu/run" / f"{name}.pid", cache / "libvirt/qemu/log" / f"{name}.log"
    return RUN / "qemu" / f"{name}.pid", Path("/var/log/libvirt/qemu") / f"{name}.log"


def _conf_value(conf: Path, key: str, default: str) -> str:
    """A `key = "value"` setting of libvirt's qemu.conf, or libvirt's default."""
    try:
        text = conf.read_text()
    except OSError:
        text = ""
    m = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else default


def qemu_user(conf: Path = QEMU_CONF) -> str:
    """The user libvirt runs QEMU as (qemu.conf `user = "..."`; Debian's default)."""
    return _conf_value(conf, "user", "libvirt-qemu")


def stdio_handler(conf: Path = QEMU_CONF) -> str:
    """Who opens QEMU's log and file-backed serial ports (qemu.conf
    `stdio_handler`): "logd" (virtlogd, as root: libvirt's default) or "file"
    (QEMU itself, as its user)."""
    return _conf_value(conf, "stdio_handler", "logd")


# ------------------------------------------------------------ access checks (pure with a stat)
@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gids: frozenset[int]


def account(user: str) -> Account | None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return Account(user, pw.pw_uid, frozenset(os.getgrouplist(user, pw.pw_gid)))


def allows(st: os.stat_result, acct: Account, bit: int) -> bool:
    """Whether mode bits give `acct` the permission `bit` (4 read, 1 search) on a
    file with stat `st`: owner, else group, else other (as the kernel picks;
    ACLs are not read). Root may do anything."""
    if acct.uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == acct.uid:
        return bool(mode & (bit << 6))
    if st.st_gid in acct.gids:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


@dataclass(frozen=True)
class Need:
    path: Path
    what: str  # human words: "the Xen kernel", "disk lab-root"
    read: bool  # QEMU opens it itself (passthrough); else libvirt chowns it and only the way must be open


def access_needs(spec: qemu.VmSpec, *, chain: Callable[[Path], list[Path]] | None = None,
                 console: bool = True) -> list[Need]:
    """What libvirt's QEMU user must reach for `spec` (absolute paths): the
    multiboot files (read: they go through the passthrough, libvirt leaves them
    alone), every disk and every layer under it (the way only), and the
    console's directory (`console`: only where QEMU opens it, stdio_handler "file")."""
    chain = chain or backing_chain
    needs = []
    if spec.xen is not None:
        needs.append(Need(spec.xen, "the Xen kernel", True))
    needs += [Need(p, f"multiboot module {i}", True) for i, (p, _) in enumerate(spec.modules)]
    for d in spec.drives:
        needs.append(Need(d.path, f"disk {d.serial}", False))
        needs += [Need(b, f"a backing layer of disk {d.serial}", False) for b in chain(d.path)]
    # virtlogd (root) opens the console file under Debian's qemu.conf, so results
    # under /root do; with stdio_handler="file" QEMU does, as its user
    if console:
        needs.append(Need(spec.console_log.parent, "the console log's directory", False))
    return needs


def let_through(d: Path, *, user: str) -> None:
    """Let `user` (libvirt's QEMU user) enter directory `d`, one the lab made for
    this run (its work directory, 0700 from mkdtemp): group = the user's primary
    group, mode 0710 (enter, not list). Nothing else of the host is changed."""
    try:
        gid = pwd.getpwnam(user).pw_gid
    except KeyError:
        return  # check_readable names the missing user
    os.chown(d, -1, gid)
    d.chmod(0o710)


def readable_by(path: Path, *, user: str, stat: Callable[[Path], os.stat_result] = os.stat) -> bool:
    """Whether `user` can reach and read file `path` (check_readable's rule)."""
    try:
        check_readable([Need(path, "", True)], user=user, stat=stat)
    except LabError:
        return False
    return True


def backing_chain(path: Path) -> list[Path]:
    """The layers under image `path`, top first (qemu-img's JSON: structured
    output, never its human text). -U: a running QEMU may hold the image."""
    infos = json.loads(qemu.qemu_img(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
                                      stage="boot:libvirt", timeout=30))
    return [Path(i["filename"]) for i in (infos if isinstance(infos, list) else [infos])[1:]]


def _describe(st: os.stat_result) -> str:
    """`drwx------ root:root`: what `ls -l` would show of the blocking path."""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{statmod.filemode(st.st_mode)} {user}:{group}"


def check_readable(needs: Iterable[Need], *, user: str = "libvirt-qemu",
                   stat: Callable[[Path], os.stat_result] = os.stat, acct: Account | None = None) -> None:
    """Raise LabError naming the first path `user` cannot reach: every directory
    from / down must be searchable by it, and a `read` file readable. `stat` and
    `acct` are stand-ins for tests."""
    acct = acct or account(user)
    if acct is None:
        raise LabError("boot:libvirt", f"user {user!r} does not exist: libvirt runs QEMU as it "
                       "(Debian: libvirt-daemon-system creates it; `make deps`)")
    if acct.uid == 0:
        return
    fix = (f"Put the lab's files where {user} can reach them (e.g. LAB_CACHE=/var/cache/xen-blklab), or let it "
           "through (chmod o+x on the blocking directory)")
    for need in needs:
        path = Path(need.path)
        if not path.is_absolute():
            raise LabError("boot:libvirt", f"{need.what}: {path} is not an absolute path")
        parts = path.parts
        for i in range(1, len(parts)):
            d = Path(*parts[:i])
            try:
                st = stat(d)
            except OSError as e:
                raise LabError("boot:libvirt", f"{need.what} {path}: {d}: {e.strerror}") from None
            if not allows(st, acct, 1):
                raise LabError("boot:libvirt", f"libvirt runs QEMU as {user}, which cannot enter {d} "
                               f"({_describe(st)}), so it cannot reach {need.what} {path}. {fix}.")
        try:
            st = stat(path)
        except OSError as e:
            raise LabError("boot:libvirt", f"{need.what} {path}: {e.strerror}") from None
        if statmod.S_ISDIR(st.st_mode) and not allows(st, acct, 1):
            raise LabError("boot:libvirt", f"libvirt runs QEMU as {user}, which cannot enter {path} "
                           f"({_describe(st)}), {need.what}. {fix}.")
        if need.read and not allows(st, acct, 4):
            raise LabError("boot:libvirt", f"libvirt runs QEMU as {user}, which cannot read {need.what} {path} "
                           f"({_describe(st)}): it goes through <qemu:commandline>, which libvirt does not "
                           f"chown. {fix} (chmod o+r on the file).")


def kvm_warning(*, user: str, stat: Callable[[Path], os.stat_result] = os.stat,
                acct: Account | None = None, dev: Path = Path("/dev/kvm")) -> str | None:
    """libvirt 9.0 probes QEMU with KVM when /dev/kvm exists, then finds that its
    QEMU user cannot open it and throws its capability cache away on every call
    ("KVM was enabled when probing ..., but it is not available now"): each API
    call that needs the capabilities probes QEMU again. Measured on a host whose
    /dev/kvm is root:root 0600 (no udev): about 50 s per domain start instead of
    0.3 s. udev's rule makes it root:kvm 0660, and libvirt-qemu is in group kvm."""
    try:
        st = stat(dev)
    except OSError:
        return None
    acct = acct or account(user)
    if acct is None or (allows(st, acct, 4) and allows(st, acct, 2)):
        return None
    return (f"{dev} ({_describe(st)}) exists but {user} cannot open it: libvirt re-probes QEMU on every call "
            f"(about 50 s per domain start measured). Fix as udev would: chgrp kvm {dev}; chmod 0660 {dev}")


# ------------------------------------------------------------ the daemons
@dataclass(frozen=True)
class Daemon:
    name: str
    sockets: tuple[Path, ...]  # any of them answering means the service is there
    pidfile: Path
    log: Path


# virtlogd first: libvirtd's QEMU driver hands QEMU's stderr and file-backed serial
# ports to it (qemu.conf stdio_handler="logd"), and a domain fails to start without it.
# libvirtd's socket, or the modular virtqemud's (a systemd host): either serves qemu:///system.
SYSTEM_DAEMONS = (
    Daemon("virtlogd", (RUN / "virtlogd-sock",), Path("/run/virtlogd.pid"), Path("/var/log/libvirt/virtlogd.log")),
    Daemon("libvirtd", (RUN / "libvirt-sock", RUN / "virtqemud-sock"), Path("/run/libvirtd.pid"),
           Path("/var/log/libvirt/libvirtd.log")),
)
RUNNING, STARTING, START = "already running", "was starting", "started"


def is_local_system(uri: str) -> bool:
    return uri in ("qemu:///system", "qemu+unix:///system")


def answers(sock: Path) -> bool:
    """A daemon accepts on `sock` (a socket file left by a dead daemon refuses)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def pid_in(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 1 else None


def decide(d: Daemon, *, answers: Callable[[Path], bool], pid_in: Callable[[Path], int | None],
           alive: Callable[[int], bool]) -> str:
    """RUNNING: a socket answers (use it). STARTING: its pid file names a live
    process that does not answer yet (wait for it: a second one would fail on the
    pid file's lock). START: neither."""
    if any(answers(s) for s in d.sockets):
        return RUNNING
    pid = pid_in(d.pidfile)
    if pid is not None and alive(pid):
        return STARTING
    return START


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_answers(d: Daemon, deadline: Deadline) -> None:
    wait_until(lambda: any(answers(s) for s in d.sockets), deadline, stage="boot:libvirt",
               what=f"{d.name} to answer on {' or '.join(map(str, d.sockets))}", tail=lambda: _log_tail(d.log))


def ensure_daemons(uri: str, *, deadline: Deadline | None = None, runner: Runner | None = None,
                   daemons: tuple[Daemon, ...] = SYSTEM_DAEMONS) -> dict:
    """For a local qemu:///system: start virtlogd and libvirtd if nothing answers,
    wait until they do, and say what was found and done (pids, seconds). Other
    URIs: nothing to manage here (a session daemon starts itself on connection)."""
    record: dict = {"uri": uri, "managed": is_local_system(uri), "daemons": [], "warnings": []}
    if not record["managed"]:
        return record
    deadline = deadline or Deadline(60)
    runner = runner or LocalRunner(name="l0")
    t0 = time.monotonic()
    for d in daemons:
        action = decide(d, answers=answers, pid_in=pid_in, alive=lambda p: process_start(p) is not None)
        if action == START:
            exe = shutil.which(d.name) or shutil.which(d.name, path="/usr/sbin:/sbin")
            if exe is None:
                raise LabError("boot:libvirt", f"{d.name} is not installed (Debian: libvirt-daemon-system, "
                               "libvirt-daemon-driver-qemu; `make deps`)")
            # -d: it forks into the background and this returns; its own setsid puts it
            # out of the runner's process group, so nothing of the lab's kills it
            res = runner.run([exe, "-d"], timeout=max(1.0, deadline.remaining()))
            if not res.ok:
                raise LabError("boot:libvirt", f"`{d.name} -d` exited {res.rc}: {res.stderr.strip()[-500:]}",
                               tail=_log_tail(d.log))
        _wait_answers(d, deadline)
        pid = pid_in(d.pidfile)
        record["daemons"].append({"name": d.name, "action": action, "pid": pid,
                                  "start": process_start(pid) if pid else None})
        log.info("%s %s (pid %s)", d.name, action, pid)
    record["waited_s"] = round(time.monotonic() - t0, 3)
    if warning := kvm_warning(user=qemu_user()):
        record["warnings"].append(warning)
        log.warning("%s", warning)
    return record


def stop_daemons(record: dict, *, timeout: float = 15) -> list[str]:
    """Stop the daemons `record` says the lab started, newest first, each only if
    its pid is still that process (same name, same start time): SIGTERM, then
    SIGKILL at the deadline. Returns what was done, one line each."""
    done = []
    for d in reversed(record.get("daemons", [])):
        if d.get("action") != START or not d.get("pid"):
            continue
        pid, name = int(d["pid"]), str(d["name"])
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            done.append(f"{name} pid {pid}: already gone")
            continue
        if comm != name[:15] or process_start(pid) != d.get("start"):
            done.append(f"{name} pid {pid}: now another process ({comm}), left alone")
            continue
        os.kill(pid, signal.SIGTERM)
        end = Deadline(timeout)
        while not end.expired() and process_start(pid) == d.get("start"):
            time.sleep(0.1)
        if process_start(pid) == d.get("start"):
            os.kill(pid, signal.SIGKILL)
            done.append(f"{name} pid {pid}: killed (no exit {timeout:.0f} s after SIGTERM)")
        else:
            done.append(f"{name} pid {pid}: stopped")
    return done
