"""The tables that pick a platform class per OS (style.md: testinfra's
get_module_class): a new dom0 or guest OS is one line here and one package under
lab/platform/."""

from __future__ import annotations

from collections.abc import Callable

from lab.errors import LabError
from lab.platform import Dom0Platform, GuestPlatform
from lab.platform.freebsd import FreeBsdPlatform
from lab.platform.linux.guest import LinuxGuest
from lab.platform.linux.platform import LinuxPlatform

DOM0_PLATFORMS: dict[str, Callable[[], Dom0Platform]] = {"linux": LinuxPlatform, "freebsd": FreeBsdPlatform}
GUEST_PLATFORMS: dict[str, Callable[[], GuestPlatform]] = {"linux": LinuxGuest}


def dom0_platform(os_name: str) -> Dom0Platform:
    if os_name not in DOM0_PLATFORMS:
        raise LabError("scenario", f"no dom0 platform for {os_name!r}; known: {sorted(DOM0_PLATFORMS)}")
    return DOM0_PLATFORMS[os_name]()


def guest_platform(os_name: str) -> GuestPlatform:
    if os_name not in GUEST_PLATFORMS:
        raise LabError("scenario", f"no guest platform for {os_name!r}; known: {sorted(GUEST_PLATFORMS)}")
    return GUEST_PLATFORMS[os_name]()
