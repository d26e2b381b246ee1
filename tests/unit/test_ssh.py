"""lab/ssh.py, the parts that need no machine: the remote command line (quoting
once, under `timeout -k` so it dies remotely too, paramiko#2510) and the pinned
host key."""

from __future__ import annotations

import shlex
from pathlib import Path

import paramiko
import pytest

from lab import images, ssh


@pytest.mark.parametrize(
    ("timeout", "secs"),
    [(10, 10), (10.0, 10), (10.2, 11), (0.2, 1), (0, 1), (59.999, 60), (3600, 3600)],
)
def test_remote_command_shall_wrap_in_timeout_k5_with_whole_seconds(timeout: float, secs: int) -> None:
    line = ssh.remote_command(["xl", "list"], timeout)
    assert line == f"timeout -k 5 {secs} xl list"
    assert secs >= timeout, "the remote side never gives up before the client"


@pytest.mark.parametrize(
    "argv",
    [
        ["sh", "-c", "cat > /run/lab/fio-0.job"],
        ["echo", "two words", "$(rm -rf /)", "`id`", "a;b", "it's", "", "*"],
        ["dmsetup", "create", "lab-lin1-xvdb", "--table", "0 2097152 linear /dev/vdc 0"],
    ],
)
def test_remote_command_shall_shell_quote_every_argument(argv: list[str]) -> None:
    line = ssh.remote_command(argv, 30)
    assert shlex.split(line) == ["timeout", "-k", "5", "30", *argv]
    assert line.startswith("timeout -k 5 30 ")


def test_load_pinned_key_shall_read_the_labs_public_host_key(tmp_path: Path) -> None:
    keys = images.ensure_keys(tmp_path)
    host = keys.host("dom0")
    pinned = ssh.load_pinned_key(Path(str(host) + ".pub"))
    private = paramiko.Ed25519Key.from_private_key_file(str(host))
    assert pinned.get_name() == "ssh-ed25519"
    assert pinned.asbytes() == private.asbytes()
    other = ssh.load_pinned_key(Path(str(keys.host("guest")) + ".pub"))
    assert other.asbytes() != pinned.asbytes()


def test_a_host_key_mismatch_shall_be_an_ssh_stage_lab_error() -> None:
    e = ssh.HostKeyMismatch("dom0: host key is not the lab's")
    assert e.stage == "ssh" and "not the lab's" in str(e)
