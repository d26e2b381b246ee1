"""The lab's exceptions. A LabError always knows the stage it happened in, so the
record can say where a run failed without parsing messages."""

from __future__ import annotations


class LabError(Exception):
    """The lab itself failed (image, boot, ssh, toolstack): the verdict is ERROR."""

    def __init__(self, stage: str, message: str, *, tail: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.tail = tail  # last lines of the console that matters, if any

    def __str__(self) -> str:
        text = f"[{self.stage}] {self.message}"
        if self.tail:
            text += "\n--- console tail ---\n" + self.tail.rstrip() + "\n---"
        return text


class ScenarioError(LabError):
    """Bad user input: names the file, the key path and what was expected."""

    def __init__(self, message: str) -> None:
        super().__init__("scenario", message)


class Interrupted(Exception):
    """SIGTERM turned into an exception so teardown runs as it does for Ctrl-C."""


class StateBusy(LabError):
    """A saved L1 state that another run is using now: the libvirt driver restores
    a state only under its saved domain name and uuid, so one run at a time. The
    run that finds it busy boots cold and leaves the state alone."""
