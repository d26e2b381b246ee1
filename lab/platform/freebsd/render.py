"""What runs inside the FreeBSD VMs, rendered on L0 (pure text, no I/O):
loader.conf (FreeBSD's loader boots Xen, FreeBSD is its PVH dom0), nuageinit's
user-data (a plain #!/bin/sh provisioning script: packages from the config disk,
never from the network), meta-data, the config disk's genisoimage command, and
the kernel-build VM's script."""

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
SSHD_SETTINGS = ("PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no")
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
# Where nuageinit's rc script mounts the config disk while it runs
# (libexec/rc/rc.d/nuageinit); older nuageinit ran a #! user-data at that time,
# with the disk still mounted there, so the scripts use it rather than mount twice.
NUAGEINIT_MOUNT = "/media/nuageinit"
# What nuageinit leaves behind for later boots: it copies the user-data to
# /var/cache/nuageinit/user_data (mode 0755 when it starts with #!) and runcmd to
# /var/cache/nuageinit/runcmds, and never deletes either (libexec/nuageinit/nuageinit).
NUAGEINIT_CACHE = ("/var/cache/nuageinit/user_data", "/var/cache/nuageinit/runcmds")
# rc(8) removes /firstboot (rc.conf's firstboot_sentinel) only at the very end of
# rc (libexec/rc/rc), and the provisioning powers off from inside rc.
FIRSTBOOT = ("/firstboot", "/firstboot-reboot")
# rc.conf knobs the BASIC-CLOUDINIT image turns on for its first boot
# (release/tools/basic-cloudinit.conf, VM_RC_LIST): off for every later boot.
FIRSTBOOT_SERVICES = ("nuageinit_enable", "firstboot_freebsd_update_enable")
HEREDOC_END = "LAB_EOF"


def _safe_rel(path: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", path) or ".." in path.split("/"):
        raise ScenarioError(f"{what} {path!r}: letters, digits, '._-/' only")
    return path.strip("/")


def _heredoc(command: str, content: str, what: str) -> list[str]:
    """`command <<'LAB_EOF' || fail what` with `content` verbatim (a quoted
    delimiter: no expansion of $, `, \\ in it)."""
    if any(line == HEREDOC_END for line in content.splitlines()):
        raise LabError("image", f"a file for the provisioning holds a line {HEREDOC_END!r}")
    return [f"{command} <<'{HEREDOC_END}' || fail {shlex.quote(what)}", *content.rstrip("\n").split("\n"),
            HEREDOC_END]


def sshd_config_edit(path: str = "$R/etc/ssh/sshd_config") -> list[str]:
    """sshd takes the first value it reads for a keyword (sshd_config(5)), and the
    BASIC-CLOUDINIT image appends `PasswordAuthentication yes` (and `UsePAM no`)
    to the end of sshd_config (release/tools/basic-cloudinit.conf): a line
    appended after it would be ignored. So every active line of the keywords the
    lab sets is dropped (keywords are case-insensitive; `Keyword=value` counts
    too) and the lab's lines go first, ahead of any Match block."""
    keys = "|".join(s.split()[0].lower() for s in SSHD_SETTINGS)
    first = "; ".join(f'print "{s}"' for s in SSHD_SETTINGS)
    return [
        f"awk 'BEGIN {{ {first} }} {{ l = tolower($0) }} l ~ /^[ \\t]*({keys})[ \\t=]/ {{ next }} {{ print }}' "
        f"\"{path}\" > \"{path}.lab\" && cat \"{path}.lab\" > \"{path}\" && rm -f \"{path}.lab\" "
        "|| fail 'editing sshd_config'",
    ]


def disarm_lines() -> list[str]:
    """The `disarm` shell function: after it, no later boot of the image (the dom0,
    and the copy the kernel build installs into) runs the provisioning again."""
    rm = " ".join(f'"$R{p}"' for p in (*FIRSTBOOT, *NUAGEINIT_CACHE))
    knobs = " ".join(f"{k}=NO" for k in FIRSTBOOT_SERVICES)
    return [f"disarm() {{ rm -f {rm}; sysrc -f \"$R/etc/rc.conf\" {knobs} > /dev/null; }}"]


def provision_script(*, packages_dir: str) -> list[str]:
    """The provisioning's commands after the files are written (render_user_data
    puts them in one #!/bin/sh script). Packages come from the config disk (`ORDER`
    lists the .pkg files dependencies first, pkg itself on the first line). Every
    step is checked: a failed one ends the provisioning with `lab-provision:
    FATAL: ...` (console.LAB_FATAL) instead of a dom0 that fails later for no
    visible reason. Before it reports done, it disarms the first-boot machinery
    and checks that it did; the VM powers off in every case, disarmed first.
    `$R` is the root ("" on FreeBSD; a directory when tests run it on L0, as
    nuageinit's own tests use NUAGE_FAKE_ROOTDIR)."""
    pkgdir = _safe_rel(packages_dir, "packages directory")
    check = "grep -qxF {line} \"$R{file}\" || fail '{file} lacks {what}'"
    rc = "-f \"$R/etc/rc.conf\""
    return [
        # nuageinit's rc script may still hold the disk at NUAGEINIT_MOUNT (a second
        # mount of the same provider would fail with EBUSY)
        f"if [ -f \"$R{NUAGEINIT_MOUNT}/user-data\" ]; then cidata=\"$R{NUAGEINIT_MOUNT}\"; mounted=; else "
        f"cidata=\"$R{CIDATA_MOUNT}\"; mkdir -p \"$cidata\" && mount -t cd9660 /dev/iso9660/cidata \"$cidata\" "
        "|| fail 'cannot mount the config disk'; mounted=1; fi",
        f"cd \"$cidata/{pkgdir}\" || fail 'no {packages_dir} on the config disk'",
        "export ASSUME_ALWAYS_YES=yes IGNORE_OSVERSION=yes",
        # The image's /usr/sbin/pkg is the bootstrap stub: it installs the real pkg from a
        # local file. With the default repository's fingerprints it would also want a
        # pkg.pkg.sig beside it; every file here was verified on L0 against the
        # catalogue's sha256 (the catalogue against its signature), so the stub's own
        # signature check is switched off (usr.sbin/pkg/pkg.c reads SIGNATURE_TYPE from
        # the environment; unverified on a real boot).
        "SIGNATURE_TYPE=none pkg add -f \"./$(head -n 1 ORDER)\" || fail 'pkg bootstrap from the config disk'",
        "tail -n +2 ORDER | while read -r f; do pkg add \"./$f\" || exit 1; done || fail 'pkg add'",
        "test -f \"$R/boot/xen\" || fail 'xen-kernel installed no /boot/xen'",
        "cd / && if [ -n \"$mounted\" ]; then umount \"$cidata\"; fi",
        check.format(line=shlex.quote('xen_kernel="/boot/xen"'), file="/boot/loader.conf", what="xen_kernel"),
        check.format(line="-- -h", file="/boot.config", what="-h"),
        check.format(line="vm.max_wired=-1", file="/etc/sysctl.conf", what="vm.max_wired"),
        check.format(line=shlex.quote(TTYS_XC0), file="/etc/ttys", what="the xc0 line"),
        "test -x \"$R/etc/rc.d/lab_ready\" || fail 'no /etc/rc.d/lab_ready'",
        # the effective value, as sshd itself reads the file (host keys are in place)
        "sshd -T -f \"$R/etc/ssh/sshd_config\" 2>/dev/null | grep -qx 'passwordauthentication no' "
        "|| fail 'sshd_config: PasswordAuthentication is not no'",
        # memorylocked: the toolstack locks hypercall buffers (Handbook, Xen chapter)
        "awk '{ gsub(/:memorylocked=[^:]*:/, \":memorylocked=unlimited:\"); print }' \"$R/etc/login.conf\" "
        "> \"$R/etc/login.conf.lab\" && cat \"$R/etc/login.conf.lab\" > \"$R/etc/login.conf\" "
        "&& rm -f \"$R/etc/login.conf.lab\" || fail 'login.conf'",
        "grep -q ':memorylocked=unlimited:' \"$R/etc/login.conf\" || fail 'login.conf memorylocked'",
        "cap_mkdb \"$R/etc/login.conf\" || fail 'cap_mkdb'",
        # the lab's commands arrive as `sh -c` strings over SSH, through root's login
        # shell: make it sh on every release (13.x gave root csh, which has other quoting)
        "pw usermod root -s /bin/sh || fail 'root shell'",
        f"sysrc {rc} hostname=lab-dom0 xencommons_enable=yes sshd_enable=yes lab_ready_enable=yes || fail sysrc",
        # guests' bridge (dom0 only, as on the Linux dom0) and QEMU's user network, static
        # renamed xenbr0: the xl template's vif names that bridge on both dom0 OSes
        f"sysrc {rc} cloned_interfaces=bridge0 ifconfig_bridge0_name=xenbr0 ifconfig_xenbr0='inet 10.99.0.1/24 up' "
        "ifconfig_vtnet0='inet 10.0.2.15/24' defaultrouter=10.0.2.2 || fail sysrc",
        # no later boot may run this again: it would find no config disk and power the dom0 off
        "disarm || fail 'disarming the first-boot services'",
        *(f"test ! -e \"$R{p}\" || fail 'still there: {p}'" for p in (*FIRSTBOOT, *NUAGEINIT_CACHE)),
        *(f"[ \"$(sysrc {rc} -n {k})\" = NO ] || fail '{k} is not NO'" for k in FIRSTBOOT_SERVICES),
        "echo 'lab-provision: done'",
    ]


def render_user_data(*, authorized_key: str, host_key_private: str, host_key_public: str,
                     packages_dir: str, loader_conf: str) -> str:
    """nuageinit's user-data for the provisioning boot (no Xen yet): one plain
    `#!/bin/sh` script that writes every file itself, then provision_script.

    A script, not #cloud-config: nuageinit's `write_files` arrived in 14.4, so
    14.3 would skip every file, while a user-data starting with `#!` is run by
    every nuageinit (libexec/nuageinit/nuageinit keeps it as
    /var/cache/nuageinit/user_data, mode 0755; rc.d/nuageinit_user_data_script
    runs it at the end of the first boot). The `#!` path also creates no default
    user (nuageinit's `freebsd`, password `freebsd`): root with the lab's key is
    the only login, and the host key is the lab's."""
    for what, value in (("authorized_key", authorized_key), ("host_key_public", host_key_public)):
        if not re.fullmatch(r"ssh-[a-z0-9-]+ [A-Za-z0-9+/=]+( [^\n]*)?", value.strip()):
            raise LabError("image", f"{what} is not an OpenSSH public key line")
    if "PRIVATE KEY-----" not in host_key_private:
        raise LabError("image", "host_key_private is not an OpenSSH private key")
    algo = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(host_key_public.split()[0])
    if algo is None:
        raise LabError("image", "host_key_public: only ssh-ed25519 or ssh-rsa host keys")
    _safe_rel(packages_dir, "packages directory")
    lines = [
        "#!/bin/sh",
        "# xen-blklab: provisioning of the FreeBSD dom0 image, run once by nuageinit",
        "set -u",
        "R=${LAB_ROOT:-}",  # "" on FreeBSD; see provision_script
        "said=",
        "fail() { said=1; echo \"lab-provision: FATAL: $*\"; exit 1; }",
        *disarm_lines(),
        "trap 'rc=$?; [ $rc -eq 0 ] || [ -n \"$said\" ] || echo \"lab-provision: FATAL: exit $rc\"; "
        "disarm; poweroff' EXIT",
        "echo 'lab-provision: start'",
        *_heredoc("cat >> \"$R/boot/loader.conf\"", loader_conf, "loader.conf"),
        # boot2 reads /boot.config: -h puts boot2 and the loader on the serial console
        # from their first line (the loader milestone, see vm.FREEBSD_LOADER)
        "printf '%s\\n' -h > \"$R/boot.config\" || fail '/boot.config'",
        "echo 'vm.max_wired=-1' >> \"$R/etc/sysctl.conf\" || fail 'sysctl.conf'",
        f"echo {shlex.quote(TTYS_XC0)} >> \"$R/etc/ttys\" || fail 'ttys'",
        *_heredoc(f"cat > \"$R/etc/ssh/ssh_host_{algo}_key\"", host_key_private.strip() + "\n", "host key"),
        f"chmod 600 \"$R/etc/ssh/ssh_host_{algo}_key\" || fail 'host key'",
        f"echo {shlex.quote(host_key_public.strip())} > \"$R/etc/ssh/ssh_host_{algo}_key.pub\" || fail 'host key'",
        *sshd_config_edit(),
        "install -d -m 700 \"$R/root/.ssh\" || fail 'root .ssh'",
        f"echo {shlex.quote(authorized_key.strip())} > \"$R/root/.ssh/authorized_keys\" "
        "&& chmod 600 \"$R/root/.ssh/authorized_keys\" || fail 'root authorized_keys'",
        *_heredoc("cat > \"$R/etc/rc.d/lab_ready\"", RC_READY, "lab_ready"),
        "chmod 755 \"$R/etc/rc.d/lab_ready\" || fail 'lab_ready'",
        *provision_script(packages_dir=packages_dir),
    ]
    return "\n".join(lines) + "\n"


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


def build_user_data(script: Sequence[str]) -> str:
    """The kernel-build VM's user-data: build_script as a plain #!/bin/sh script,
    which every nuageinit runs (see render_user_data; no default user either)."""
    return "#!/bin/sh\n" + "\n".join(script) + "\n"


def build_script(*, patches: Sequence[str], kernconf: str = "GENERIC", ident: str,
                 src_root: str = "/usr/src") -> list[str]:
    """The kernel-build VM's script: unpack the source tree from the raw disk with
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
        # nuageinit's rc script may still hold the config disk (see provision_script)
        f"if [ -f {NUAGEINIT_MOUNT}/user-data ]; then cidata={NUAGEINIT_MOUNT}; else cidata={CIDATA_MOUNT}; "
        "mkdir -p \"$cidata\" && mount -t cd9660 /dev/iso9660/cidata \"$cidata\" || fail 'config disk'; fi",
    ]
    for i, p in enumerate(patches):
        name = f"{i:04d}-{Path(p).name}"
        lines.append(f"patch -p1 -s -d /usr/src -i \"$cidata\"/patches/{shlex.quote(name)} "
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
