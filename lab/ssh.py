"""SSH with paramiko: one long-lived transport per machine (a key exchange costs
seconds under TCG), host keys pinned (no auto-accept), every command bounded by a
deadline. Guests are reached through dom0's transport (`direct-tcpip`).

Three traps shape this file: `recv_exit_status()` ignores the channel timeout
(paramiko#1815), so we poll with our own deadline; a remote command keeps
running after the client gives up (paramiko#2510), so commands are wrapped in
`timeout -k` on the remote side; and sshd may send a command's exit status
before the last of its output, so a command's output is read up to EOF."""

from __future__ import annotations

import logging
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko

from lab.errors import LabError
from lab.runner import CommandLog, Result
from lab.timing import Deadline

log = logging.getLogger("lab.ssh")
EOF_GRACE = 2.0  # after the exit status, how long the rest of the output (up to EOF) is waited for


def load_pinned_key(pub_path: Path) -> paramiko.PKey:
    kind, b64 = pub_path.read_text().split()[:2]
    return paramiko.PKey.from_type_string(kind, __import__("base64").b64decode(b64))


def remote_command(argv: list[str], timeout: float) -> str:
    """The shell line sent to the remote side: the command under `timeout -k`, so it
    dies there too when the client's deadline passes (paramiko#2510)."""
    secs = max(1, int(timeout + 0.999))
    return f"timeout -k 5 {secs} {shlex.join(argv)}"


class SshRunner:
    """Runs argument lists on one machine over a pinned, long-lived SSH transport."""

    def __init__(
        self,
        name: str,
        *,
        host_key: paramiko.PKey,
        client_key: paramiko.PKey,
        log_: CommandLog | None = None,
        connect: Callable[[float], socket.socket | paramiko.Channel],  # a fresh socket per (re)connect
    ) -> None:
        self.name = name
        self.host_key = host_key
        self.client_key = client_key
        self.log = log_ or CommandLog(None)
        self._connect_sock = connect
        self.transport: paramiko.Transport | None = None
        self.logger = logging.getLogger(f"lab.{name}")
        self._lock = threading.Lock()

    # -------------------------------------------------------- connection
    def connect(self, deadline: Deadline, *, stage: str, abort: Callable[[], None] | None = None) -> float:
        """Connect, retrying until `deadline` (the only place that retries: the
        machine may still be booting). Returns the seconds it took. `abort` is
        called between attempts and raises to stop waiting at once (a console
        that already shows why the machine will never answer)."""
        start = time.monotonic()
        last: Exception | None = None
        while not deadline.expired():
            if abort is not None and last is not None:  # the first try costs less than a look at the console
                abort()
            try:
                self._open(timeout=min(30.0, max(1.0, deadline.remaining())))
                return time.monotonic() - start
            except HostKeyMismatch:
                raise
            except (OSError, paramiko.SSHException, EOFError) as e:
                last = e
                time.sleep(min(1.0, deadline.remaining()))
        raise LabError(stage, f"{self.name}: no SSH login within {deadline.seconds:.0f}s (last error: {last})")

    def reconnect(self, deadline: Deadline, *, stage: str,
                  connect: Callable[[float], socket.socket | paramiko.Channel] | None = None) -> float:
        """A new session to a machine whose TCP state is gone (L1 went on in a new
        QEMU process: the libvirt driver's save and restore), through `connect`
        if its address changed. As `connect`, retrying until `deadline`."""
        if connect is not None:
            self._connect_sock = connect
        self.close()
        return self.connect(deadline, stage=stage)

    def _open(self, timeout: float) -> None:
        sock = self._connect_sock(timeout)
        t = paramiko.Transport(sock)
        t.banner_timeout = timeout
        t.auth_timeout = timeout
        try:
            t.start_client(timeout=timeout)
            key = t.get_remote_server_key()
            if key.get_name() != self.host_key.get_name() or key.asbytes() != self.host_key.asbytes():
                raise HostKeyMismatch(
                    f"{self.name}: host key {key.get_name()} {key.get_base64()[:16]}... is not the "
                    "lab's pinned key for this machine"
                )
            t.auth_publickey("root", self.client_key)
            t.set_keepalive(5)
        except BaseException:
            t.close()
            raise
        if self.transport is not None:
            self.transport.close()
        self.transport = t

    def alive(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def _channel(self, timeout: float) -> paramiko.Channel:
        if not self.alive():
            # one reconnect at the edge; a second failure is the caller's problem
            self.logger.warning("transport lost, reconnecting once")
            self._open(timeout=min(timeout, 30))
        assert self.transport is not None
        return self.transport.open_session(timeout=timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -------------------------------------------------------- commands
    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> Result:
        start = time.monotonic()
        deadline = Deadline(timeout)
        out, err = bytearray(), bytearray()
        rc, timed_out, lost = -1, False, ""
        try:
            chan = self._channel(timeout=max(1.0, deadline.remaining()))
            try:
                chan.settimeout(0.5)
                chan.exec_command(remote_command(argv, timeout))
                if input is not None:
                    chan.sendall(input.encode())
                    chan.shutdown_write()
                eof_wait: Deadline | None = None
                while True:
                    got = False
                    while chan.recv_ready():
                        out += chan.recv(65536)
                        got = True
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                        got = True
                    if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                        # sshd may send the exit status before the last of the output
                        # (seen: a dm device made, its `minor=` line missing, rc 0):
                        # the output is whole at EOF. A background process that keeps
                        # stdout open never sends one: EOF_GRACE, then what came.
                        eof_wait = eof_wait or Deadline(EOF_GRACE)
                        if chan.eof_received or chan.closed or eof_wait.expired():
                            rc = chan.recv_exit_status()
                            break
                    if deadline.expired():
                        timed_out = True
                        break
                    if not got and (chan.closed or not (self.transport and self.transport.is_active())):
                        # the channel or the transport went away without an exit status
                        lost = "the SSH channel closed without an exit status"
                        break
                    if not got:
                        time.sleep(0.02)
            finally:
                chan.close()
        except (OSError, paramiko.SSHException, EOFError) as e:
            lost = f"{type(e).__name__}: {e}"
            timed_out = timed_out or deadline.expired()
        if lost:
            err += f"\n[lab] ssh transport error: {lost}".encode()
        result = Result(
            tuple(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"),
            time.monotonic() - start, timed_out, lost,
        )
        self.log.write(self.name, result)
        self.logger.debug("%s rc=%s %.2fs", shlex.join(argv), rc, result.elapsed)
        return result

    def stream(self, argv: list[str], *, timeout: float) -> Iterator[str]:
        """Start a long-lived command and yield its stdout lines as they come.
        Ends when the command ends, the transport drops or `timeout` passes."""
        chan = self._channel(timeout=30)
        chan.settimeout(1.0)
        chan.exec_command(remote_command(argv, timeout))
        deadline = Deadline(timeout)
        buf = b""
        try:
            while not deadline.expired():
                try:
                    chunk = chan.recv(65536)
                except TimeoutError:  # socket.timeout: nothing new this second
                    continue
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    yield line.decode(errors="replace")
        finally:
            chan.close()

    def put_file(self, local: Path, remote: str, *, timeout: float) -> float:
        """Copy a file over SFTP on the open transport. Returns seconds taken."""
        start = time.monotonic()
        if not self.alive():
            self._open(timeout=30)
        assert self.transport is not None
        try:
            sftp = paramiko.SFTPClient.from_transport(self.transport)
            assert sftp is not None
            try:
                chan = sftp.get_channel()
                if chan is not None:
                    chan.settimeout(timeout)
                sftp.put(str(local), remote)
            finally:
                sftp.close()
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise LabError("ssh", f"{self.name}: copying {local} to {remote} failed: {type(e).__name__}: {e}") from None
        return time.monotonic() - start

    def get_text(self, remote: str, *, timeout: float) -> str:
        res = self.run(["cat", remote], timeout=timeout)
        return res.stdout if res.ok else ""

    def open_tunnel(self, host: str, port: int, timeout: float) -> paramiko.Channel:
        """A direct-tcpip channel from this machine to host:port (to reach guests)."""
        if not self.alive():
            self._open(timeout=30)
        assert self.transport is not None
        return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)


class HostKeyMismatch(LabError):
    def __init__(self, message: str) -> None:
        super().__init__("ssh", message)


def tcp_connect(port: int, host: str = "127.0.0.1") -> Callable[[float], socket.socket]:
    def connect(timeout: float) -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)

    return connect


def via(runner: SshRunner, host: str, port: int = 22) -> Callable[[float], paramiko.Channel]:
    def connect(timeout: float) -> paramiko.Channel:
        return runner.open_tunnel(host, port, timeout)

    return connect
