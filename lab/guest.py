"""Guests per OS, picked from a plain table: the test disk's device and the
guest's own view of it (completed and in-flight I/O)."""

from __future__ import annotations

from lab.runner import Runner

# /sys/block/X/stat fields (Documentation/block/stat.rst), 0-based
_READS, _WRITES, _INFLIGHT, _DISCARDS, _FLUSHES = 0, 4, 8, 11, 15


def parse_block_stat(text: str | None) -> dict[str, int] | None:
    """/sys/block/X/stat into completed (reads+writes+discards+flushes) and inflight."""
    if text is None:
        return None
    f = text.split()
    if len(f) < 11 or not all(x.isdigit() for x in f):
        return None
    n = [int(x) for x in f]
    get = lambda i: n[i] if i < len(n) else 0  # noqa: E731  (older kernels have fewer fields)
    return {
        "reads": n[_READS],
        "writes": n[_WRITES],
        "discards": get(_DISCARDS),
        "flushes": get(_FLUSHES),
        "completed": n[_READS] + n[_WRITES] + get(_DISCARDS) + get(_FLUSHES),
        "inflight": n[_INFLIGHT],
        "sectors_read": n[_READS + 2],
        "sectors_written": n[_WRITES + 2],
    }


class LinuxGuest:
    os = "linux"

    def __init__(self, name: str, runner: Runner, *, timeout: float) -> None:
        self.name = name
        self.r = runner
        self.timeout = timeout

    @staticmethod
    def disk_device(vdev: str) -> str:
        return f"/dev/{vdev}"

    def stat_paths(self, vdev: str) -> list[str]:
        return [f"/sys/block/{vdev}/stat"]

    def blkfront_params(self) -> dict[str, str]:
        res = self.r.run(
            ["sh", "-c", "cd /sys/module/xen_blkfront/parameters && grep -H . *"], timeout=self.timeout
        )
        out = {}
        for line in res.stdout.splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
        return out


GUEST_CLASSES = {"linux": LinuxGuest}
