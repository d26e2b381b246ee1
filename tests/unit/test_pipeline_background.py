"""lab/timing.py's Background: a step run beside the guests hands back its
value, or its exception of whatever kind, and is waited for no longer than the
run's deadline."""

from __future__ import annotations

import threading

import pytest

from lab.errors import LabError
from lab.timing import Background, Deadline


def test_a_background_step_shall_hand_back_its_value_and_time() -> None:
    job = Background("backend", lambda: {"kind": "stock"})
    assert job.result(Deadline(5)) == {"kind": "stock"}
    assert job.elapsed >= 0.0


@pytest.mark.parametrize("error", [LabError("backend", "modprobe failed"), KeyError("srcversion")])
def test_a_background_steps_exception_shall_be_raised_in_the_main_thread(error: Exception) -> None:
    def fail() -> None:
        raise error

    job = Background("backend", fail)
    with pytest.raises(type(error)) as e:
        job.result(Deadline(5))
    assert e.value is error


def test_a_background_step_past_the_deadline_shall_be_the_labs_failure() -> None:
    release = threading.Event()
    job = Background("backend", lambda: release.wait(10))
    with pytest.raises(LabError) as e:
        job.result(Deadline(0.2))
    release.set()
    assert e.value.stage == "backend" and "did not finish" in str(e.value)
