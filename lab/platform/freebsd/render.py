"""What runs inside the FreeBSD VMs, rendered on L0 (pure text, no I/O):
loader.conf (FreeBSD's loader boots Xen, FreeBSD is its PVH dom0), nuageinit's
#cloud-config with the provisioning script (packages from the config disk, never
from the network), meta-data, the config disk's genisoimage command, and the
kernel-build VM's script."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from lab.errors import LabError, ScenarioError

CIDATA_PACKAGES = "packages"  # directory on the config disk holding the .pkg files
CIDATA_MOUNT = "/media/lab-cidata"
SRC_SERIAL, TARGET_SERIAL = "lab-src", "lab-dom0"  # disks of the kernel-build VM


# ---------------------------------------------------------------- rendering
def render_loader_conf(*, dom0_mem_mb: int, dom0_vcpus: int, iommu: bool, extra: str = "") -> str:
    """/boot/loader.conf lines: FreeBSD's loader boots Xen (`xen_kernel`), FreeBSD
    is its PVH dom0. `extra`: more words for Xen's command line."""
    if dom0_mem_mb < 256 or dom0_vcpus < 1:
        raise ScenarioError(f"FreeBSD dom0: memory {dom0_mem_mb}M / vcpus {dom0_vcpus}: need >= 256M and >= 1")
    if '"' in extra or "\n" in extra:
        raise ScenarioError(f"Xen command line {extra!r}: no double quotes or newlines (loader.conf quoting)")
    xen = [f"dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M", f"dom0_max_vcpus={dom0_vcpus}", "dom0=pvh"]
    if not iommu:
        # QEMU gives the Xen VM no IOMMU; without this Xen refuses to build a PVH dom0
        # (Xen's own CI runs `dom0-iommu=none dom0=pvh` under QEMU). Development only.
        xen.append("dom0-iommu=none")
    xen += ["console=com1", "com1=115200,8n1", "loglvl=all", "guest_loglvl=all", "noreboot"]
    xen += extra.split()
    return "\n".join([
        "# xen-blklab: FreeBSD's loader boots Xen; FreeBSD is Xen's PVH dom0",
        'xen_kernel="/boot/xen"',
        f'xen_cmdline="{" ".join(xen)}"',
        # the loader's and the kernel's own console on the serial line QEMU logs
        'boot_serial="YES"',
        'console="comconsole"',
        'comconsole_speed="115200"',
        'autoboot_delay="1"',  # the default 10 s menu would be paid on every boot
        'beastie_disable="YES"',
        'if_tap_load="YES"',
        "",
    ])


TTYS_XC0 = 'xc0 "/usr/libexec/getty Pc" xterm onifconsole secure'
SSHD_LINES = "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
# Printed on the console once sshd and xencommons are up: the dom0-ready milestone
# (the same words the Linux dom0's init prints, console.DOM0_INIT).
RC_READY = """#!/bin/sh
# PROVIDE: lab_ready
# REQUIRE: LOGIN sshd xencommons
# KEYWORD: nojail

. /etc/rc.subr

name=lab_ready
rcvar=lab_ready_enable
start_cmd="echo 'lab-dom0: ready'"
stop_cmd=":"

load_rc_config $name
run_rc_command "$1"
"""


def _safe_rel(path: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", path) or ".." in path.split("/"):
        raise ScenarioError(f"{what} {path!r}: letters, digits, '._-/' only")
    return path.strip("/")


def provision_script(*, packages_dir: str) -> list[str]:
    """The runcmd lines (nuageinit writes them to one /bin/sh script and runs it at
    the end of the first boot). The config disk is unmounted by then, so it is
    mounted again; `ORDER` on it lists the .pkg files dependencies first, pkg
    itself on the first line. Every step is checked: a nuageinit that skipped a
    write_files entry, or a package that did not install, ends the provisioning
    with `lab-provision: FATAL: ...` (console.LAB_FATAL) instead of a dom0 that
    fails later for no visible reason. The VM powers off in every case."""
    pkgdir = f"{CIDATA_MOUNT}/{_safe_rel(packages_dir, 'packages directory')}"
    check = "grep -qxF {line} {file} || fail '{file} lacks {what}'"
    return [
        "set -u",
        "said=",
        "fail() { said=1; echo \"lab-provision: FATAL: $*\"; exit 1; }",
        "trap 'rc=$?; [ $rc -eq 0 ] || [ -n \"$said\" ] || echo \"lab-provision: FATAL: exit $rc\"; poweroff' EXIT",
        f"mkdir -p {CIDATA_MOUNT}",
        f"mount -t cd9660 /dev/iso9660/cidata {CIDATA_MOUNT} || fail 'cannot mount the config disk'",
        f"cd {pkgdir} || fail 'no {packages_dir} on the config disk'",
        "export ASSUME_ALWAYS_YES=yes IGNORE_OSVERSION=yes",
        # The image's /usr/sbin/pkg is the bootstrap stub: it installs the real pkg from a
        # local file. With the default repository's fingerprints it would also want a
        # pkg.pkg.sig beside it; every file here was verified on L0 against the
        # catalogue's sha256, so the stub's own signature check is switched off (unverified).
        "SIGNATURE_TYPE=none pkg add -f \"./$(head -n 1 ORDER)\" || fail 'pkg bootstrap from the config disk'",
        "tail -n +2 ORDER | while read -r f; do pkg add \"./$f\" || exit 1; done || fail 'pkg add'",
        "test -f /boot/xen || fail 'xen-kernel installed no /boot/xen'",
        "cd / && umount " + CIDATA_MOUNT,
        check.format(line=shlex.quote('xen_kernel="/boot/xen"'), file="/boot/loader.conf", what="xen_kernel"),
        check.format(line="vm.max_wired=-1", file="/etc/sysctl.conf", what="vm.max_wired"),
        check.format(line=shlex.quote(TTYS_XC0), file="/etc/ttys", what="the xc0 line"),
        check.format(line="'PermitRootLogin prohibit-password'", file="/etc/ssh/sshd_config",
                     what="PermitRootLogin"),
        "test -x /etc/rc.d/lab_ready || fail 'no /etc/rc.d/lab_ready'",
        # memorylocked: the toolstack locks hypercall buffers (Handbook, Xen chapter)
        "sed -i '' -E 's/:memorylocked=[^:]*:/:memorylocked=unlimited:/' /etc/login.conf",
        "grep -q ':memorylocked=unlimited:' /etc/login.conf || fail 'login.conf memorylocked'",
        "cap_mkdb /etc/login.conf || fail 'cap_mkdb'",
        # write_files does not create directories: /root/.ssh is made here
        "install -d -m 700 /root/.ssh && install -m 600 /etc/ssh/lab_root_keys /root/.ssh/authorized_keys"
        " && rm /etc/ssh/lab_root_keys || fail 'root authorized_keys'",
        # the lab's commands arrive as `sh -c` strings over SSH, through root's login
        # shell: make it sh on every release (13.x gave root csh, which has other quoting)
        "pw usermod root -s /bin/sh || fail 'root shell'",
        "sysrc xencommons_enable=yes sshd_enable=yes lab_ready_enable=yes || fail sysrc",
        # guests' bridge (dom0 only, as on the Linux dom0) and QEMU's user network, static
        # renamed xenbr0: the xl template's vif names that bridge on both dom0 OSes
        "sysrc cloned_interfaces=bridge0 ifconfig_bridge0_name=xenbr0 ifconfig_xenbr0='inet 10.99.0.1/24 up' "
        "ifconfig_vtnet0='inet 10.0.2.15/24' defaultrouter=10.0.2.2 || fail sysrc",
        "echo 'lab-provision: done'",
    ]


def render_user_data(*, authorized_key: str, host_key_private: str, host_key_public: str,
                     packages_dir: str, loader_conf: str) -> str:
    """nuageinit's user-data for the provisioning boot (no Xen yet).

    Rendered as JSON under the #cloud-config line: JSON is valid YAML, so nuageinit
    reads it, and no value (keys, multi-line files) can break the YAML quoting.
    write_files only writes into directories the image already has; /root/.ssh
    is made by the script. `users: []` keeps nuageinit from creating its default
    user (`freebsd`, password `freebsd`): root with the lab's key is the only login."""
    for what, value in (("authorized_key", authorized_key), ("host_key_public", host_key_public)):
        if not re.fullmatch(r"ssh-[a-z0-9-]+ [A-Za-z0-9+/=]+( [^\n]*)?", value.strip()):
            raise LabError("image", f"{what} is not an OpenSSH public key line")
    if "PRIVATE KEY-----" not in host_key_private:
        raise LabError("image", "host_key_private is not an OpenSSH private key")
    # nuageinit names the files after the key: ed25519_private -> /etc/ssh/ssh_host_ed25519_key
    algo = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(host_key_public.split()[0])
    if algo is None:
        raise LabError("image", "host_key_public: only ssh-ed25519 or ssh-rsa host keys (nuageinit's key names)")
    files = [
        {"path": "/boot/loader.conf", "content": loader_conf, "append": True},
        {"path": "/etc/sysctl.conf", "content": "vm.max_wired=-1\n", "append": True},
        {"path": "/etc/ttys", "content": TTYS_XC0 + "\n", "append": True},
        # sshd takes the first value it reads; FreeBSD's sshd_config has these commented out
        {"path": "/etc/ssh/sshd_config", "content": SSHD_LINES, "append": True},
        {"path": "/etc/ssh/lab_root_keys", "content": authorized_key.strip() + "\n", "permissions": "0600"},
        {"path": "/etc/rc.d/lab_ready", "content": RC_READY, "permissions": "0755"},
    ]
    doc = {
        "hostname": "lab-dom0",
        "users": [],
        "ssh_keys": {f"{algo}_private": host_key_private.strip(), f"{algo}_public": host_key_public.strip()},
        "write_files": files,
        "runcmd": provision_script(packages_dir=packages_dir),
    }
    return "#cloud-config\n" + json.dumps(doc, indent=2) + "\n"


def render_meta_data(*, instance_id: str, hostname: str = "lab-dom0") -> str:
    """nocloud's meta-data file beside user-data on the config disk."""
    return f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"


def cidata_argv(staging: Path, iso: Path) -> list[str]:
    """The config disk. genisoimage (Debian package genisoimage): nuageinit looks for
    /dev/iso9660/cidata or /dev/msdosfs/cidata, and FreeBSD's label names are
    case-sensitive: an ISO volume id keeps `cidata` lower-case, while FAT labels are
    upper-case by convention (mkfs.msdos -n CIDATA would give /dev/msdosfs/CIDATA,
    which nuageinit does not look for). An ISO also needs no size chosen up front
    for ~100 MB of packages, and Rock Ridge (-r) keeps their long file names."""
    return ["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(staging)]


def build_script(*, patches: Sequence[str], kernconf: str = "GENERIC", ident: str,
                 src_root: str = "/usr/src") -> list[str]:
    """The kernel-build VM's runcmd: unpack the source tree from the raw disk with
    serial lab-src (a plain tar stream), apply the patches from the config disk,
    build, and install into the dom0 image (disk serial lab-dom0), then power off.
    `ident` (the tree hash) is written beside the kernel so the dom0 can prove
    which build it booted. `src_root`: where the tar stream unpacks (/usr/src for
    a tree; / for the release's src.txz, whose members are usr/src/...)."""
    if src_root not in ("/", "/usr/src"):
        raise LabError("backend", f"src_root {src_root!r}: '/' or '/usr/src'")
    kc = _safe_rel(kernconf, "KERNCONF")
    if not re.fullmatch(r"[\w.{}-]+", ident):
        raise LabError("backend", f"kernel ident {ident!r}: letters, digits, '._-' only")
    lines = [
        "set -u",
        "fail() { echo \"lab-build: FATAL: $*\"; exit 1; }",
        "trap 'rc=$?; [ $rc -eq 0 ] || echo \"lab-build: FATAL: exit $rc\"; poweroff' EXIT",
        # disks by serial (diskinfo -s prints a disk's ident), not by probe order
        "disk() { for d in /dev/vtbd[0-9] /dev/vtbd[0-9][0-9]; do [ -e \"$d\" ] || continue; "
        "[ \"$(diskinfo -s \"$d\" 2>/dev/null)\" = \"$1\" ] && { echo \"$d\"; return 0; }; done; return 1; }",
        # the builder and the dom0 image carry the same GPT labels (gpt/rootfs): make
        # sure / came from the builder's own disk, never write the other way round
        "rootfs=$(mount -p | awk '$2 == \"/\" { print $1 }')",  # /dev/gpt/rootfs, or a partition
        "prov=$(glabel status -s | awk -v l=\"${rootfs#/dev/}\" '$1 == l { print $3 }')",
        "prov=${prov:-${rootfs#/dev/}}",
        "[ \"$(diskinfo -s \"/dev/${prov%p[0-9]*}\" 2>/dev/null)\" = lab-root ] "
        "|| fail \"/ is mounted from $prov, not the builder's disk (duplicate gpt/rootfs label)\"",
        f"src=$(disk {SRC_SERIAL}) || fail 'no source disk'",
        f"target=$(disk {TARGET_SERIAL}) || fail 'no dom0 disk'",
        f"mkdir -p /usr/src && tar -xf \"$src\" -C {src_root} || fail 'unpacking the source tree'",
        f"mkdir -p {CIDATA_MOUNT} && mount -t cd9660 /dev/iso9660/cidata {CIDATA_MOUNT} || fail 'config disk'",
    ]
    for i, p in enumerate(patches):
        name = f"{i:04d}-{Path(p).name}"
        lines.append(f"patch -p1 -s -d /usr/src -i {CIDATA_MOUNT}/patches/{shlex.quote(name)} "
                     f"|| fail {shlex.quote('patch ' + Path(p).name + ' does not apply')}")
    lines += [
        "cd /usr/src",
        # kernel-toolchain: the bootstrap tools buildkernel needs without a buildworld
        # (it reuses the host compiler when the tree wants the same version)
        "make -j\"$(sysctl -n hw.ncpu)\" kernel-toolchain > /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail kernel-toolchain; }",
        f"make -j\"$(sysctl -n hw.ncpu)\" buildkernel KERNCONF={kc} >> /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail buildkernel; }",
        "part=$(gpart show -p \"${target#/dev/}\" | awk '$4 == \"freebsd-ufs\" { print $3; exit }')",
        "[ -n \"$part\" ] || fail 'no freebsd-ufs partition on the dom0 disk'",
        "fsck -y -t ufs \"/dev/$part\" > /dev/null 2>&1; mount \"/dev/$part\" /mnt || fail 'mounting the dom0 disk'",
        f"make installkernel KERNCONF={kc} DESTDIR=/mnt >> /var/log/lab-build.log 2>&1 "
        "|| { tail -n 60 /var/log/lab-build.log; fail installkernel; }",
        f"echo {shlex.quote(ident)} > /mnt/boot/kernel/xen-blklab.id",
        "umount /mnt",
        f"echo 'lab-build: done {ident}'",
    ]
    return lines
