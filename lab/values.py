"""What a scenario value may be: its type and the characters it may hold.

Durations are "30s", "5m", "1h" or a number of seconds; sizes are "512M", "4G"
or a number of bytes. `build` turns a TOML table into a frozen dataclass,
refusing unknown keys and values of the wrong type with the file, the key path
and what was expected. `text_problem` and `fio_extra_problems` say what a text
value may hold; the loader (lab/scenario.py) and the writers that check again
(lab/workload.py) share them. This module knows no schema: lab/scenario.py does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal

from lab.errors import ScenarioError


class Duration(float):
    """Seconds, written in TOML as "30s", "5m", "1h" or a number."""


class Size(int):
    """Bytes, written in TOML as "512M", "4G", "1T" or a number."""

    @property
    def mib(self) -> int:
        return self // (1024 * 1024)


_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT])i?B?\s*$", re.I)
# Upper bounds: a longer duration or a bigger size is a typo, and TOML's bare `inf`
# (or "1" and 400 zeros) would silently disable the deadline or window it sets.
MAX_DURATION = 7 * 24 * 3600.0
MAX_SIZE = 1 << 50  # 1 PiB


def parse_duration(value: object) -> Duration:
    expected = 'a duration like "30s", "5m" or a number of seconds'
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond a float's range
            seconds = math.inf
    elif isinstance(value, str) and (m := _DUR.match(value)):
        scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]
        seconds = float(m.group(1)) * scale
    else:
        raise ValueError(expected)
    # nan passes every comparison below as False: test it first
    if not math.isfinite(seconds):
        raise ValueError(f"a finite duration (at most {MAX_DURATION:.0f}s), not inf or nan")
    if seconds < 0:
        raise ValueError("a duration >= 0")
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration of at most 7 days ({MAX_DURATION:.0f}s)")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    size = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * 1024 ** ("KMGT".index(m.group(2).upper()) + 1)
    if not 0 < size <= MAX_SIZE:
        raise ValueError('a size like "512M" or "4G", more than 0 and at most 1024T')
    return Size(size)


# ------------------------------------------------ TOML value -> typed field
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Duration:
        return 'a duration like "30s"'
    if tp is Size:
        return 'a size like "512M"'
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "an array of tables"
    if origin is dict:
        return "a table of strings"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, where: str) -> Any:
    def bad(expected: str | None = None) -> ScenarioError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"
        return ScenarioError(f"{where}: key '{path}': expected {expected or _describe(tp)}, got {shown}")

    origin = typing.get_origin(tp)
    if tp is Duration or tp is Size:
        try:
            return parse_duration(value) if tp is Duration else parse_size(value)
        except ValueError as e:
            raise bad(str(e)) from None
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, list):
            raise bad()
        return tuple(_convert(item, v, f"{path}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise ScenarioError(
                    f"{where}: key '{path}.{k}': expected a string or number, got {v!r}"
                )
            out[str(k)] = str(v)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, path, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"schema type {tp} not handled")  # a bug in this file, not user input


def build(cls: Any, table: dict[str, Any], prefix: str, where: str) -> Any:
    """An instance of the dataclass `cls` from a TOML table, every key converted to
    its field's type; `prefix` is the table's key path, `where` the file."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            hint = _close_match(key, fields)
            raise ScenarioError(
                f"{where}: unknown key '{path}'"
                + (f" (did you mean '{hint}'?)" if hint else "")
                + f"; known keys here: {known}"
            )
        kwargs[key] = _convert(hints[key], value, path, where)
    return cls(**kwargs)


def _close_match(key: str, names: typing.Iterable[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, list(names), n=1, cutoff=0.7)
    return m[0] if m else None


# ------------------------------------------------- what a value may hold
# Scenario values reach QEMU's argv, xl's config file, fio's job file, loader.conf
# and shell scripts in dom0 and the guests. Each text value is checked here against
# what it may contain (an allow-list of characters, never a list of bad ones), so a
# value that could end a quoted string or a line, or start a command, is refused
# before anything starts. Templates and job writers check again (lab/xen.py,
# lab/workload.py): a value built in code does not pass through here.

# Kernel and Xen command lines go into `xl` config strings (extra = "..."),
# QEMU's -append and multiboot module strings, FreeBSD's loader.conf
# (xen_cmdline="...") and are word-split unquoted by the guests' init: no quote,
# backslash, `$`, backtick, glob, separator or control character.
CMDLINE_CHARS = "letters, digits, space and _ - . , : = + / @ % ~ ^ !"
_CMDLINE = re.compile(r"[A-Za-z0-9 _.,:=+/@%~^!-]*")
CMDLINE_MAX = 900  # the lab appends its own words; Xen keeps 1024 bytes, Linux 2048
_CPU_MODEL = re.compile(r"[A-Za-z0-9_.,+=-]*")  # QEMU's -cpu MODEL,+feat,-feat
_KERNCONF = re.compile(r"[A-Za-z0-9_-]+")
_VERSION = re.compile(r"(\d+\.\d+)?")
# names: a scenario's names its results directory, a guest's its xl domain and
# hostname, a disk's its xl vdev (xvda stays free)
SCENARIO_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
GUEST_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")
VDEV = re.compile(r"xvd[b-z]")
# paths the user names on L0: any character but control characters (a newline
# would end a line of a generated script or a QEMU option)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# fio: `bssplit` is SIZE/PERCENT pairs joined by ':' (',' between the read, write
# and trim splits); `size` is a size or a percentage of the disk
_FIO_BS = r"\d+[kmgKMG]?/\d{0,3}"
_FIO_SPLIT = rf"{_FIO_BS}(?::{_FIO_BS})*"
_BSSPLIT = re.compile(rf"{_FIO_SPLIT}(?:,{_FIO_SPLIT}){{0,2}}")
_FIO_SIZE = re.compile(r"\d+(?:[kmgtKMGT]i?[bB]?)?|\d{1,3}%")
FIO_KEY = re.compile(r"[a-z][a-z0-9_]*")
# fio expands ${VAR} and $ncpus and evaluates (...) in values; a value holds none of that
FIO_VALUE_CHARS = "letters, digits and _ . , : / % + -"
FIO_VALUE = re.compile(r"[A-Za-z0-9_.,:/%+-]+")

# The fio options `extra` may set: an allow-list, not a deny-list. fio has some 300
# options and gains more each release; among them are options that name files
# (filename, directory, opendir, filename_format, nrfiles, write_*_log, *_log,
# read_iolog, write_iolog, verify_state_load, verify_dump), run commands
# (exec_prerun, exec_postrun, ioengine=external:/x.so, ioscheduler writes sysfs),
# change the lab's timing (runtime, time_based, ramp_time, startdelay, loops,
# number_ios, exitall) or the output the lab parses (group_reporting, output*,
# unified_rw_reporting). A deny-list would let the next such option through
# silently; this list refuses it until someone reads what it does. Each option
# below only shapes the I/O fio sends to the one test disk the lab names.
# `iodepth` and `numjobs` override the workload keys of the same name; the other
# workload keys (rw, rwmixread, bssplit, ioengine, direct, size) are set there only.
FIO_EXTRA_OPTIONS = frozenset({
    # queueing
    "iodepth", "numjobs", "iodepth_batch", "iodepth_batch_submit", "iodepth_batch_complete",
    "iodepth_batch_complete_min", "iodepth_batch_complete_max", "iodepth_low", "io_submit_mode",
    # block sizes and where on the disk
    "bs", "blocksize", "bsrange", "blocksize_range", "ba", "blockalign", "bs_unaligned",
    "blocksize_unaligned", "offset", "offset_increment", "offset_align", "io_size",
    # access pattern
    "rwmixwrite", "percentage_random", "random_distribution", "random_generator", "randseed",
    "randrepeat", "norandommap", "softrandommap", "rw_sequencer", "zonesize", "zonerange", "zoneskip",
    # flushes and trims (what the backend under test must carry)
    "fsync", "fdatasync", "sync", "end_fsync", "fsync_on_close", "write_barrier",
    "trim_percentage", "trim_backlog", "trim_backlog_batch", "trim_verify_zero",
    # rate and think time
    "rate", "rate_min", "rate_iops", "rate_iops_min", "rate_process", "rate_cycle",
    "rate_ignore_thinktime", "thinktime", "thinktime_spin", "thinktime_blocks",
    # data in the buffers
    "zero_buffers", "refill_buffers", "scramble_buffers", "buffer_compress_percentage",
    "buffer_compress_chunk", "buffer_pattern", "dedupe_percentage",
    # verification in memory (verify_dump and verify_state_* write files: refused)
    "verify", "do_verify", "verify_pattern", "verify_interval", "verify_offset", "verify_fatal",
    "verify_backlog", "verify_backlog_batch", "verify_async",
    # errors
    "continue_on_error", "ignore_error", "error_dump",
    # engine tuning (the engine itself is the workload's `ioengine`)
    "hipri", "fixedbufs", "registerfiles", "sqthread_poll", "nonvectored", "userspace_reap",
    "invalidate", "fadvise_hint", "serialize_overlap",
})


def fio_extra_problems(extra: dict[str, str]) -> list[str]:
    """What is wrong with a workload's `extra` fio options ([] = nothing)."""
    problems = []
    refused = sorted(k for k in extra if k not in FIO_EXTRA_OPTIONS)
    if refused:
        problems.append(
            f"fio options refused: {', '.join(repr(k) for k in refused)} (only options that shape the I/O "
            "to the test disk are allowed: none that names a file, runs a command or changes the lab's "
            "timing or output; see FIO_EXTRA_OPTIONS in lab/values.py)")
    for k, v in extra.items():
        if k in FIO_EXTRA_OPTIONS and not FIO_VALUE.fullmatch(v):
            problems.append(f"fio option {k!r}: value {v!r} may hold only {FIO_VALUE_CHARS}")
    return problems


def _refused_chars(value: str, allowed: re.Pattern[str]) -> str:
    bad = sorted({c for c in value if not allowed.fullmatch(c)})
    return ", ".join(repr(c) for c in bad)


def text_problem(value: str, kind: str) -> str | None:
    """Why `value` cannot be a `kind` ("cmdline", "path", "cpu_model", "bssplit",
    "fio_size", "freebsd_version", "kernconf"), or None. Shared with the writers
    that check again."""
    if kind == "cmdline":
        if len(value) > CMDLINE_MAX:
            return f"a command line of at most {CMDLINE_MAX} characters, got {len(value)}"
        if not _CMDLINE.fullmatch(value):
            return (f"a command line of only {CMDLINE_CHARS} (it reaches xl's config, QEMU's "
                    f"argv and the guests' init); refused: {_refused_chars(value, _CMDLINE)}")
    elif kind == "path":
        if len(value) > 4096:
            return "a path of at most 4096 characters"
        if _CONTROL.search(value):
            return f"a path without control characters (newline, tab, ...), got {value!r}"
    elif kind == "cpu_model":
        if not _CPU_MODEL.fullmatch(value):
            return f"a QEMU CPU model like \"qemu64,+svm\" (letters, digits, _ . , + = -), got {value!r}"
    elif kind == "bssplit":
        if not _BSSPLIT.fullmatch(value):
            return f"fio bssplit like \"4k/50:64k/50\" (SIZE/PERCENT pairs joined by ':'), got {value!r}"
    elif kind == "fio_size":
        if value and not _FIO_SIZE.fullmatch(value):
            return f"a fio size like \"100M\" or \"50%\", or \"\" for the whole disk, got {value!r}"
    elif kind == "freebsd_version":
        if not _VERSION.fullmatch(value):
            return f"MAJOR.MINOR like \"14.3\" or \"\", got {value!r}"
    elif kind == "kernconf":
        if not _KERNCONF.fullmatch(value):
            return f"a kernel config name like \"GENERIC\", got {value!r}"
    else:
        raise ValueError(f"unknown kind {kind!r}")  # a bug in the caller, not user input
    return None
