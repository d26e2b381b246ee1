"""lab/ssh.py's SshRunner.run against a real SSH server (paramiko's server side,
in this process, over a socket pair): the whole SSH protocol between them, with
the server choosing the order of a command's output, exit status and EOF.

The case that made it: on the real stack (results/bench/ring-saturation/
20261201T031649Z) dom0 made the dm device, yet the command's output ended
before its last line (`minor=...`) with rc 0: sshd sent the exit status before
the rest of the output, and run() had stopped at the exit status."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import paramiko
import pytest

from lab import ssh
from lab.timing import Deadline

HOST_KEY = paramiko.RSAKey.generate(1024)
CLIENT_KEY = paramiko.RSAKey.generate(1024)

Script = Callable[[paramiko.Channel], None]


class _Server(paramiko.ServerInterface):
    """Accepts the lab's client key for root, and one exec per channel, which
    `script` answers."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.asbytes() == CLIENT_KEY.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        def run() -> None:
            time.sleep(0.05)  # as sshd: the command's bytes follow the reply to the exec request
            self.script(channel)

        threading.Thread(target=run, daemon=True).start()
        return True


@pytest.fixture
def serve() -> Iterator[Callable[[Script], ssh.SshRunner]]:
    transports: list[paramiko.Transport] = []
    runners: list[ssh.SshRunner] = []

    def start(script: Script) -> ssh.SshRunner:
        def connect(timeout: float) -> socket.socket:
            ours, theirs = socket.socketpair()
            t = paramiko.Transport(theirs)
            t.add_server_key(HOST_KEY)
            # start_server returns once the client has negotiated: beside the client
            threading.Thread(target=t.start_server, kwargs={"server": _Server(script)}, daemon=True).start()
            transports.append(t)
            return ours

        r = ssh.SshRunner("dom0", host_key=HOST_KEY, client_key=CLIENT_KEY, connect=connect)
        r.connect(Deadline(10), stage="test")
        runners.append(r)
        return r

    yield start
    for r in runners:
        r.close()
    for t in transports:
        t.close()


def _status_then_rest(chan: paramiko.Channel) -> None:
    """sshd's order on the real stack: the first line, the exit status, then the
    last line, then EOF."""
    chan.sendall(b"lower=/dev/vdb\n")
    chan.send_exit_status(0)
    time.sleep(0.3)
    chan.sendall(b"minor=0\n")
    chan.shutdown_write()
    chan.close()


def test_output_sent_after_the_exit_status_shall_be_read_up_to_eof(
        serve: Callable[[Script], ssh.SshRunner]) -> None:
    """The last line, sent 0.3 s after the exit status, is in the result."""
    res = serve(_status_then_rest).run(["true"], timeout=10)
    assert (res.rc, res.stdout, res.transport_error) == (0, "lower=/dev/vdb\nminor=0\n", "")


def test_stderr_after_the_exit_status_shall_be_read_too(serve: Callable[[Script], ssh.SshRunner]) -> None:
    """stderr is a stream of the same channel: what comes after the status counts."""
    def script(chan: paramiko.Channel) -> None:
        chan.send_exit_status(1)
        time.sleep(0.2)
        chan.sendall_stderr(b"refcnt 2\n")
        chan.shutdown_write()
        chan.close()

    res = serve(script).run(["true"], timeout=10)
    assert (res.rc, res.stderr) == (1, "refcnt 2\n")


def test_no_eof_after_the_exit_status_shall_end_after_the_grace(
        serve: Callable[[Script], ssh.SshRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    """A background process holding stdout open: no EOF ever comes. The run ends
    EOF_GRACE after the exit status with what came, and is no timeout."""
    monkeypatch.setattr(ssh, "EOF_GRACE", 0.5)
    hold = threading.Event()

    def script(chan: paramiko.Channel) -> None:
        chan.sendall(b"started\n")
        chan.send_exit_status(0)
        hold.wait(10)

    t = time.monotonic()
    res = serve(script).run(["true"], timeout=10)
    hold.set()
    took = time.monotonic() - t
    assert (res.rc, res.stdout, res.timed_out) == (0, "started\n", False)
    assert 0.4 <= took < 3.0


def test_output_before_the_exit_status_shall_not_wait_for_the_grace(
        serve: Callable[[Script], ssh.SshRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual order (output, EOF, status) returns at once, not after EOF_GRACE."""
    monkeypatch.setattr(ssh, "EOF_GRACE", 5.0)

    def script(chan: paramiko.Channel) -> None:
        chan.sendall(b"kernel=6.1.0\n")
        chan.shutdown_write()
        chan.send_exit_status(3)
        chan.close()

    t = time.monotonic()
    res = serve(script).run(["true"], timeout=10)
    assert (res.rc, res.stdout) == (3, "kernel=6.1.0\n") and time.monotonic() - t < 2.0
