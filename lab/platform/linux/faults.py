"""Fault actions on a Linux dom0: device-mapper tables on the dm-linear device
that backs a guest test disk (lab/faults.py schedules them)."""

from __future__ import annotations

from lab.platform import Backing


def dm_table(kind: str, b: Backing, sectors_var: str = "$n", *, delay_ms: int = 0) -> str:
    """The device-mapper table that gives `kind` over the backing's lower disk."""
    if kind == "linear":
        return f"0 {sectors_var} linear {b.lower} 0"
    if kind == "delay":
        return f"0 {sectors_var} delay {b.lower} 0 {delay_ms}"
    if kind == "error":
        return f"0 {sectors_var} error"
    if kind == "corrupt":
        # dm-flakey always "down" (up 0 s, down an hour) with one feature of five
        # words: byte CORRUPT_BYTE of every write bio set to CORRUPT_VALUE before
        # it goes down; the write completes okay, and the disk holds wrong data.
        # Writes, not reads: on 6.1 dm-flakey corrupts a read in its end_io, where
        # the bio's iterator is already spent, and the data arrives intact
        # (measured: 55,846 verified read-backs, 0 mismatches).
        return (f"0 {sectors_var} flakey {b.lower} 0 0 3600 5 corrupt_bio_byte {CORRUPT_BYTE} w "
                f"{CORRUPT_VALUE} 0")
    raise ValueError(kind)


CORRUPT_BYTE = 2100  # 1-based: inside the first 4 KiB of a bio, in the data after a sector header a checker keeps
CORRUPT_VALUE = 165  # 0xa5


def swap_table_script(b: Backing, table: str) -> str:
    """Replace the live table: suspend, load, resume (one command: one round trip)."""
    return (
        f"set -e; n=$(blockdev --getsz {b.lower}); "
        f"dmsetup suspend --noudevsync {b.name}; "
        f"dmsetup reload --noudevsync {b.name} --table \"{table}\"; "
        f"dmsetup resume --noudevsync {b.name}"
    )


def delay_script(b: Backing, delay_ms: int) -> str:
    """dm-delay goes *under* the backing device, not in its place: the device
    blkback submits to stays a dm-linear, whose in-flight count then includes the
    time each I/O spends in the delay (dm-delay as the top table hid it: the
    sampled in-flight count stayed near 0 while 32 requests waited)."""
    slow = f"{b.name}-delay"
    return (
        f"set -e; n=$(blockdev --getsz {b.lower}); "
        f"dmsetup create --noudevsync {slow} --table \"0 $n delay {b.lower} 0 {delay_ms}\"; "
        f"dmsetup mknodes {slow}; "
        f"dmsetup suspend --noudevsync {b.name}; "
        f"dmsetup reload --noudevsync {b.name} --table \"0 $n linear /dev/mapper/{slow} 0\"; "
        f"dmsetup resume --noudevsync {b.name}"
    )
