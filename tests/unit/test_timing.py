"""lab/timing.py: deadlines, not sleeps. A wait returns the value it waited for or
raises a LabError saying what it waited for; a slice never outlives its parent."""

from __future__ import annotations

import time

import pytest

from lab.errors import LabError
from lab.timing import Deadline, wait_until


def test_wait_until_shall_return_the_first_real_value() -> None:
    answers = iter([None, False, None, 42, 43])
    t0 = time.monotonic()
    assert wait_until(lambda: next(answers), Deadline(5), stage="s", what="w", interval=0.01) == 42
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize("value", [0, "", [], "ready"])
def test_wait_until_shall_return_falsy_values_other_than_none_and_false(value: object) -> None:
    assert wait_until(lambda: value, Deadline(1), stage="s", what="w") == value


def test_wait_until_shall_raise_naming_what_and_stage_when_the_deadline_passes() -> None:
    calls = []
    t0 = time.monotonic()
    with pytest.raises(LabError) as e:
        wait_until(lambda: calls.append(1), Deadline(0.3), stage="boot:dom0", what="dom0's SSH",
                   interval=0.05, tail=lambda: "last console line")
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 1.5
    assert e.value.stage == "boot:dom0"
    assert "dom0's SSH" in e.value.message and "timed out" in e.value.message
    assert e.value.tail == "last console line"
    assert len(calls) >= 3, "checked repeatedly, not once"


def test_wait_until_shall_check_at_least_once_even_when_already_expired() -> None:
    assert wait_until(lambda: "now", Deadline(0), stage="s", what="w") == "now"
    with pytest.raises(LabError):
        wait_until(lambda: None, Deadline(0), stage="s", what="w")


def test_deadline_shall_count_down_and_expire() -> None:
    d = Deadline(0.2)
    assert not d.expired() and 0 < d.remaining() <= 0.2
    time.sleep(0.25)
    assert d.expired() and d.remaining() == 0.0
    assert "left" in repr(d)


def test_slice_shall_never_go_past_its_parent() -> None:
    parent = Deadline(1.0)
    big = parent.slice(100)
    assert big.at == parent.at
    small = parent.slice(0.1)
    assert small.at < parent.at
    assert 0 < small.remaining() <= 0.1
    nested = small.slice(50)
    assert nested.at == small.at


def test_slice_of_an_expired_deadline_shall_be_expired() -> None:
    parent = Deadline(0)
    assert parent.slice(60).expired()


def test_at_time_shall_keep_the_point_in_time() -> None:
    at = time.monotonic() + 3
    d = Deadline.at_time(at)
    assert d.at == at and 2.5 < d.seconds <= 3
    assert Deadline.at_time(time.monotonic() - 10).seconds == 0.0
