"""lab/qemu.py: the QEMU command line, one pure builder per concern, each checked
with a table of cases. Nothing here starts QEMU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lab import qemu
from lab.qemu import Drive, VmSpec


def _value(argv: list[str], flag: str) -> list[str]:
    """Every value that follows `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# ------------------------------------------------------------ accelerator + CPU
@pytest.mark.parametrize(
    ("accel", "cpu_model", "expected"),
    [
        ("tcg", "", ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "qemu64,+svm,+npt"]),
        ("tcg", "max,-smap", ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max,-smap"]),
        ("kvm", "", ["-accel", "kvm", "-cpu", "host"]),
        ("kvm", "EPYC", ["-accel", "kvm", "-cpu", "EPYC"]),
    ],
)
def test_accel_args_shall_pick_the_cpu_per_accelerator(accel: str, cpu_model: str, expected: list[str]) -> None:
    assert qemu.accel_args(accel, cpu_model) == expected


@pytest.mark.parametrize("accel", ["auto", "hvf", "", "TCG", "whpx"])
def test_accel_args_shall_refuse_an_unknown_accelerator(accel: str) -> None:
    """`auto` must be resolved to kvm or tcg before the command line is built."""
    with pytest.raises(ValueError, match="unknown accelerator"):
        qemu.accel_args(accel)


# ------------------------------------------------------------ machine, smp, serial, qmp
def test_machine_args_shall_have_no_default_devices_and_no_reboot() -> None:
    argv = qemu.machine_args()
    assert argv[:2] == ["-machine", "pc"]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert _value(argv, "-display") == ["none"]


@pytest.mark.parametrize(("cpus", "mib", "expected"), [(2, 1536, ["-smp", "2", "-m", "1536M"]),
                                                       (1, 512, ["-smp", "1", "-m", "512M"])])
def test_smp_mem_args_shall_give_cpus_and_mebibytes(cpus: int, mib: int, expected: list[str]) -> None:
    assert qemu.smp_mem_args(cpus, mib) == expected


def test_serial_and_qmp_args_shall_point_at_the_given_files() -> None:
    assert qemu.serial_args(Path("/r/console-xen.log")) == ["-serial", "file:/r/console-xen.log"]
    assert qemu.qmp_args(Path("/w/qmp.sock")) == ["-qmp", "unix:/w/qmp.sock,server=on,wait=off"]


# ------------------------------------------------------------ multiboot
@pytest.mark.parametrize(
    ("modules", "initrd"),
    [
        ([], None),
        ([(Path("/i/vmlinuz"), "")], "/i/vmlinuz"),
        ([(Path("/i/vmlinuz"), "console=hvc0 quiet")], "/i/vmlinuz console=hvc0 quiet"),
        (
            [(Path("/i/vmlinuz"), "console=hvc0"), (Path("/i/initrd.img"), "")],
            "/i/vmlinuz console=hvc0,/i/initrd.img",
        ),
        # a literal comma (in a path or in a module's command line) is doubled
        ([(Path("/i/vmlinuz"), "a=1,2 b")], "/i/vmlinuz a=1,,2 b"),
        (
            [(Path("/odd,dir/vmlinuz"), "x=a,b,c"), (Path("/odd,dir/initrd"), "")],
            "/odd,,dir/vmlinuz x=a,,b,,c,/odd,,dir/initrd",
        ),
    ],
)
def test_multiboot_modules_shall_be_joined_by_commas_with_literal_commas_doubled(
    modules: list[tuple[Path, str]], initrd: str | None
) -> None:
    xen_cmdline = "console=com1 com1=115200,8n1"
    argv = qemu.multiboot_args(xen=Path("/i/xen"), xen_cmdline=xen_cmdline, modules=modules)
    assert argv[:4] == ["-kernel", "/i/xen", "-append", xen_cmdline], "Xen's own -append is not escaped"
    assert _value(argv, "-initrd") == ([initrd] if initrd is not None else [])


def test_multiboot_initrd_shall_split_back_into_the_modules() -> None:
    """What QEMU does with -initrd: split on single commas, then ',,' -> ','."""
    modules = [(Path("/a,b/k"), "x=1,2,,3"), (Path("/c/i"), ""), (Path("/d/m"), "y")]
    (value,) = _value(qemu.multiboot_args(xen=Path("/x"), xen_cmdline="", modules=modules), "-initrd")
    parts = [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]
    assert parts == ["/a,b/k x=1,2,,3", "/c/i", "/d/m y"]


# ------------------------------------------------------------ drives
@pytest.mark.parametrize(
    ("drive", "drive_opt", "device_opt"),
    [
        (Drive(Path("/w/root.qcow2"), "lab-root"),
         "file=/w/root.qcow2,if=none,id=d0,format=qcow2,cache=unsafe,discard=unmap",
         "virtio-blk-pci,drive=d0,serial=lab-root"),
        (Drive(Path("/img/boot.img"), "lab-boot", fmt="raw", readonly=True),
         "file=/img/boot.img,if=none,id=d0,format=raw,cache=unsafe,discard=unmap,readonly=on",
         "virtio-blk-pci,drive=d0,serial=lab-boot"),
    ],
)
def test_drive_args_shall_give_one_virtio_disk_per_drive(drive: Drive, drive_opt: str, device_opt: str) -> None:
    assert qemu.drive_args([drive]) == ["-drive", drive_opt, "-device", device_opt]


def test_drive_args_shall_number_drives_and_mark_only_readonly_ones() -> None:
    drives = [Drive(Path("/a"), "s0"), Drive(Path("/b"), "s1", readonly=True), Drive(Path("/c"), "s2")]
    argv = qemu.drive_args(drives)
    drv = _value(argv, "-drive")
    dev = _value(argv, "-device")
    assert [d.split(",")[2] for d in drv] == ["id=d0", "id=d1", "id=d2"]
    assert ["readonly=on" in d for d in drv] == [False, True, False]
    assert dev == ["virtio-blk-pci,drive=d0,serial=s0", "virtio-blk-pci,drive=d1,serial=s1",
                   "virtio-blk-pci,drive=d2,serial=s2"]
    assert qemu.drive_args([]) == []


# ------------------------------------------------------------ network
@pytest.mark.parametrize("port", [2222, 40001, 65535])
def test_net_args_shall_restrict_the_vm_and_bind_ssh_forward_to_localhost(port: int) -> None:
    argv = qemu.net_args(port)
    (netdev,) = _value(argv, "-netdev")
    opts = netdev.split(",")
    assert opts[0] == "user"
    assert "restrict=on" in opts
    (fwd,) = [o for o in opts if o.startswith("hostfwd=")]
    assert fwd == f"hostfwd=tcp:127.0.0.1:{port}-:22"
    assert _value(argv, "-device") == ["virtio-net-pci,netdev=n0"]
    assert "id=n0" in opts


# ------------------------------------------------------------ the whole line
def _spec(tmp: Path, **kw: object) -> VmSpec:
    base: dict = dict(
        accel="tcg", cpus=2, memory_mib=1536, xen=tmp / "xen", xen_cmdline="console=com1 com1=115200,8n1",
        modules=[(tmp / "vmlinuz", "console=hvc0"), (tmp / "initrd.img", "")],
        drives=[Drive(tmp / "root.qcow2", "lab-root"), Drive(tmp / "boot.img", "lab-boot", "raw", True)],
        ssh_port=40022, console_log=tmp / "console-xen.log", qmp_sock=tmp / "qmp.sock",
    )
    base.update(kw)
    return VmSpec(**base)


@pytest.mark.parametrize(
    ("accel", "accel_value", "cpu"),
    [("tcg", "tcg,thread=multi,tb-size=256", "qemu64,+svm,+npt"), ("kvm", "kvm", "host")],
)
def test_build_argv_shall_be_qemu_with_every_concern(tmp_path: Path, accel: str, accel_value: str, cpu: str) -> None:
    spec = _spec(tmp_path, accel=accel)
    argv = qemu.build_argv(spec)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv
    assert all(isinstance(a, str) for a in argv), "an argument list, never a shell string"
    assert _value(argv, "-accel") == [accel_value]
    assert _value(argv, "-cpu") == [cpu]
    assert _value(argv, "-smp") == ["2"] and _value(argv, "-m") == ["1536M"]
    assert _value(argv, "-kernel") == [str(tmp_path / "xen")]
    assert _value(argv, "-initrd") == [f"{tmp_path}/vmlinuz console=hvc0,{tmp_path}/initrd.img"]
    assert len(_value(argv, "-drive")) == 2
    assert _value(argv, "-serial") == [f"file:{tmp_path}/console-xen.log"]
    assert any("hostfwd=tcp:127.0.0.1:40022-:22" in n for n in _value(argv, "-netdev"))
    assert any(q.startswith(f"unix:{tmp_path}/qmp.sock,") for q in _value(argv, "-qmp"))


def test_build_argv_shall_append_extra_arguments_last(tmp_path: Path) -> None:
    argv = qemu.build_argv(_spec(tmp_path, extra=["-d", "guest_errors"], cpu_model="qemu64"))
    assert argv[-2:] == ["-d", "guest_errors"]
    assert _value(argv, "-cpu") == ["qemu64"]


def test_build_argv_shall_refuse_an_unresolved_accelerator(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        qemu.build_argv(_spec(tmp_path, accel="auto"))


def test_free_port_shall_be_a_bindable_localhost_port() -> None:
    port = qemu.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
