"""The `lab` command. Exit codes follow the verdict (architecture.md); usage and
scenario errors exit 4 (ERROR), never argparse's 2, which would read as HANG."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shlex
import shutil
import signal
import sys
import termios
import threading
import tty
from pathlib import Path

from lab import images, report, scenario
from lab.errors import Interrupted, LabError, ScenarioError
from lab.orphans import lab_qemu_problem as _lab_qemu_problem

SKIP = 125  # `git bisect run`: this commit cannot be tested


def _error_exit(bisect_exit: bool) -> int:
    """The exit code of anything that is not a verdict: ERROR (4), or skip (125)
    for `git bisect run`, which reads 4 as "bad"."""
    return SKIP if bisect_exit else report.EXIT_CODES["ERROR"]


class _Parser(argparse.ArgumentParser):
    bisect_exit = False

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"lab: error: {message}", file=sys.stderr)
        sys.exit(_error_exit(_Parser.bisect_exit))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lab", description="End-to-end lab for Xen's paravirtual block path.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a scenario (a preset name or a TOML file)")
    r.add_argument("scenario")
    r.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="override the scenario's accelerator")
    r.add_argument("--driver", choices=["qemu", "libvirt"],
                   help="what runs the Xen VM: QEMU as the lab's child, or a libvirt domain (overrides [lab] driver)")
    r.add_argument("--libvirt-uri", metavar="URI",
                   help="the libvirt driver's local daemon (default qemu:///system)")
    r.add_argument("--results", type=Path, default=Path("results"), help="results root (default ./results)")
    r.add_argument("--keep", action="store_true", help="leave a failed lab running for `lab ssh`")
    r.add_argument("--cold", action="store_true", help="boot L1 cold even if a saved state matches")
    r.add_argument("--backend", type=Path, metavar="PATH",
                   help="the backend under test: a kernel source tree with drivers/block/xen-blkback/")
    r.add_argument("--bisect-exit", action="store_true",
                   help="exit 0 (good) / 1 (bad) / 125 (skip) for `git bisect run`")
    r.add_argument("--plan", action="store_true",
                   help="print every download, build and boot step with its command, run nothing")
    r.add_argument("--repeat", type=int, default=1, metavar="N", help="run the scenario N times")
    r.add_argument("--until-fail", action="store_true", help="repeat until a verdict other than PASS "
                   "(at most --repeat times if given, else without end)")
    r.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML file: one testcase per run")

    st = sub.add_parser("states", help="list or delete saved L1 states (warm start)")
    stsub = st.add_subparsers(dest="states_cmd", required=True, parser_class=_Parser)
    stsub.add_parser("list", help="list saved states, their keys and sizes")
    rm = stsub.add_parser("rm", help="delete saved states")
    rm.add_argument("keys", nargs="*")
    rm.add_argument("--all", action="store_true")

    i = sub.add_parser("images", help="build or list the cached base images")
    isub = i.add_subparsers(dest="images_cmd", required=True, parser_class=_Parser)
    isub.add_parser("build", help="build every image whose recipe or inputs changed")
    isub.add_parser("list", help="list cached images")

    b = sub.add_parser("bisect", help="find the commit that broke I/O with git bisect run")
    b.add_argument("--scenario", required=True)
    b.add_argument("--repo", type=Path, required=True, help="kernel source tree (git) of the backend")
    b.add_argument("--good", required=True)
    b.add_argument("--bad", required=True)
    b.add_argument("--runs", type=int, default=2, help="confirm with N runs at the culprit and its parent")
    b.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    b.add_argument("--results", type=Path, default=Path("results"))
    b.add_argument("--plan", action="store_true",
                   help="print the bisection's per-step work (build, boot, decide), run nothing")
    b.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML file: one testcase per step")

    sub.add_parser("list", help="list the preset scenarios")

    rp = sub.add_parser("report", help="(re)render report.html of a results directory, a bisect, or two runs")
    rp.add_argument("dirs", type=Path, nargs="*", metavar="DIR", help="results directories (default results/latest)")
    rp.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="two runs side by side on one page")
    rp.add_argument("-o", "--output", type=Path, metavar="FILE", help="where --compare writes its page")

    rs = sub.add_parser("results", help="list past runs: when, scenario, verdict, IOPS, wall time, accelerator")
    rs.add_argument("root", type=Path, nargs="?", default=Path("results"), metavar="DIR")

    s = sub.add_parser("ssh", help="open a shell in a kept lab (dom0 or a guest), or run one command there")
    s.add_argument("machine")
    s.add_argument("--lab", type=Path, default=Path("results/latest"), help="results dir of the kept lab")
    s.add_argument("command", nargs="*",
                   help="after --: a command to run instead of a shell (its exit status is lab's)")

    d = sub.add_parser("down", help="tear down a lab left running by --keep")
    d.add_argument("lab", type=Path, nargs="?", default=Path("results/latest"))
    return p


def main(argv: list[str] | None = None) -> int:
    # A shell starts background jobs with SIGINT ignored, and Python keeps that:
    # `kill -INT` (what a CI harness sends) must still tear the lab down.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _Parser.bisect_exit = "--bisect-exit" in (sys.argv[1:] if argv is None else argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if argv[:1] == ["ssh"] and "--" in argv:  # `lab ssh M -- CMD...`: the rest is the command, verbatim
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    if args.cmd == "ssh":
        args.command = args.command + command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    # paramiko logs each refused channel while a guest boots; those are expected retries
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        return {"run": cmd_run, "images": cmd_images, "states": cmd_states, "bisect": cmd_bisect, "list": cmd_list, "ssh": cmd_ssh, "down": cmd_down,
                "report": cmd_report, "results": cmd_results}[
            args.cmd](args)
    except (ScenarioError, LabError) as e:
        print(f"lab: ERROR: {e}", file=sys.stderr)
        return _error_exit(_Parser.bisect_exit)
    except (KeyboardInterrupt, Interrupted):
        print("\nlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a lab bug must never read as a verdict (exit 1 = FAIL = "bad")
        logging.getLogger("lab").exception("lab failed")
        print(f"lab: ERROR: the lab failed: {type(e).__name__}: {e}", file=sys.stderr)
        return _error_exit(_Parser.bisect_exit)


def cmd_run(args: argparse.Namespace) -> int:
    """One run, or several (--repeat, --until-fail) for hangs that show once in
    many runs; every run after the first restores the saved L1, so a repeat costs
    about the guest's boot plus the workload."""
    from lab import pipeline

    sc = scenario.load(args.scenario)
    if args.libvirt_uri is not None:
        from lab import l0

        l0.driver(args.driver or sc.lab.driver, uri=args.libvirt_uri)  # a usage error now, not a run's ERROR
    if args.backend:
        import dataclasses

        sc = dataclasses.replace(sc, backend=dataclasses.replace(sc.backend, source=str(args.backend.resolve())))
    if args.plan:
        return _print_plan(sc)
    if args.repeat < 1:
        raise ScenarioError(f"--repeat: expected at least 1, got {args.repeat}")
    limit = args.repeat if (args.repeat > 1 or not args.until_fail) else None
    records: list[dict] = []
    i = 0
    while limit is None or i < limit:
        i += 1
        from lab.progress import Progress

        opts = pipeline.Options(results_root=args.results, accel=args.accel, keep=args.keep, cold=args.cold,
                                progress=Progress(), driver=args.driver, libvirt_uri=args.libvirt_uri)
        try:
            rec = pipeline.run(sc, opts)
        except (KeyboardInterrupt, Interrupted):
            print("\nlab: interrupted; the lab was torn down", file=sys.stderr)
            _print_repeat_summary(records)
            return 130
        records.append(rec)
        if limit != 1 or args.until_fail:
            print(f"[{i}{'/' + str(limit) if limit else ''}] ", end="")
        for line in report.summary_lines(rec):
            print(line)
        if rec.get("kept"):
            kept = rec["kept"]
            print(f"  lab left running (QEMU pid {kept['qemu_pid']}): "
                  f"`lab ssh dom0 --lab {rec['results_dir']}`; tear down with `{rec['teardown_hint']}`")
            if kept.get("driver") == "libvirt":
                print(f"  as libvirt domain {kept['domain']} (uuid {kept['uuid']}): "
                      f"`virsh -c {kept['uri']} console {kept['domain']}` (Xen's serial; also logged to "
                      f"{rec['results_dir']}/console-xen.log)")
            break
        if args.until_fail and rec["verdict"] != "PASS":
            break
    if len(records) > 1:
        _print_repeat_summary(records)
    if args.junit:
        from lab import junit

        print(f"junit: {junit.write(args.junit, [junit.case_from_record(r) for r in records])}")
    worst = max(records, key=lambda r: (r["verdict"] != "PASS", r["exit_code"]))
    if args.bisect_exit:
        return int(worst["bisect_code"])
    return int(worst["exit_code"])


def _print_plan(sc: scenario.Scenario) -> int:
    """A dry run: what the scenario would fetch, build and boot, for review. The
    steps come from the dom0 platform, the same list its real run follows."""
    from lab.platforms import dom0_platform

    steps = dom0_platform(sc.dom0.os).plan(sc)
    print(f"# {sc.name}: {sc.dom0.os} dom0; {len(steps)} steps, nothing has been run")
    for i, st in enumerate(steps, 1):
        print(f"\n{i:2}. [{st['step']}] {st['what']}")
        for k in ("url", "path", "command", "then", "script", "milestones", "fails_on", "unverified"):
            if k not in st:
                continue
            v = st[k]
            if k in ("command", "then") and isinstance(v, list):
                print(f"      {'$' if k == 'command' else 'then $'} {shlex.join(str(a) for a in v)}")
            elif k == "then":
                print(f"      then: {v}")
            elif isinstance(v, list):
                print(f"      {k}:")
                for line in v:
                    print(f"        {line}")
            else:
                print(f"      {k}: {v}")
    return 0


def _print_repeat_summary(records: list[dict]) -> None:
    if not records:
        return
    counts: dict[str, int] = {}
    for r in records:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(f"{len(records)} runs: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
    for n, r in enumerate(records, 1):
        print(f"  {n:3}  {r['verdict']:5}  {r.get('wall_s', 0):6.0f}s  l1 {r.get('l1', {}).get('start', '?'):8}  "
              f"{r['results_dir']}")


def cmd_bisect(args: argparse.Namespace) -> int:
    from lab import bisect

    if args.runs < 1:
        raise ScenarioError(f"--runs: expected at least 1, got {args.runs}")
    if args.plan:
        steps = bisect.plan(args.scenario, args.repo, args.good, args.bad, runs=args.runs, accel=args.accel)
        for line in bisect.plan_lines(steps, title=f"bisect {args.scenario} over {args.repo} ({args.good}..{args.bad})"):
            print(line)
        return 0
    try:
        res = bisect.bisect(args.scenario, args.repo, args.good, args.bad, runs=args.runs,
                            results_root=args.results, accel=args.accel)
    except (KeyboardInterrupt, Interrupted):
        print("\nlab: bisect interrupted; `git bisect reset` restored the repository", file=sys.stderr)
        return 130
    for line in bisect.summary_lines(res):
        print(line)
    if args.junit:
        from lab import junit

        cases = [junit.case_from_step(s, scenario=res.get("scenario", "")) for s in res.get("steps", [])]
        print(f"junit: {junit.write(args.junit, cases)}")
    return 0 if res.get("first_bad") else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Render report.html again from the files a run left (any results directory,
    old ones too), a bisect's page (a directory with bisect.json), or, with
    --compare, two runs side by side."""
    from lab import html

    if args.compare:
        a, b = args.compare
        for d in (a, b):
            if not (d / "record.json").is_file():
                raise LabError("report", f"{d}: no record.json (not a results directory of `lab run`)")
        print(html.write_compare(a, b, args.output))
        return 0
    for d in args.dirs or [Path("results/latest")]:
        if not (d / "record.json").is_file() and not (d / "bisect.json").is_file():
            raise LabError("report", f"{d}: neither record.json nor bisect.json (not a results directory)")
        print(html.write_report(d))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """Past runs under a results root, oldest first."""
    from lab import html

    if not args.root.is_dir():
        raise LabError("results", f"{args.root}: no such directory")
    rows = html.find_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    for line in html.runs_table(rows):
        print(line)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    names = sorted(p.name for p in images.RECIPES.iterdir() if (p / "recipe.toml").exists())
    if args.images_cmd == "build":
        for n in names:
            img = images.ensure_image(n)
            print(f"{n}: {img.dir}")
        return 0
    root = images.cache_dir() / "images"
    for d in sorted(root.glob("*")) if root.exists() else []:
        if d.name.startswith("."):
            continue
        size = sum(f.stat().st_size for f in d.iterdir())
        current = any(images.image_path(n)[1] == d for n in names)
        print(f"{d.name:40} {size / 2**20:8.0f} MiB  {'current' if current else 'stale'}")
    return 0


def cmd_states(args: argparse.Namespace) -> int:
    from lab import l1state

    states = l1state.list_states()
    if args.states_cmd == "list":
        if not states:
            print("no saved L1 states")
        for st in states:
            import time as _t

            when = _t.strftime("%Y-%m-%d %H:%M", _t.localtime(st["created"] or 0))
            print(f"{st['key']}  {st['bytes'] / 2**20:7.0f} MiB  saved {when}  {st['driver']:7}  {st['dir']}")
        return 0
    keys = [st["key"] for st in states] if args.all else args.keys
    if not keys and not args.all:
        raise LabError("states", "name the keys to delete, or --all")
    # every key is checked before any is deleted: `rm KEY ../x` deletes nothing
    bad = [k for k in keys if not l1state.is_state_key(k)]
    if bad:
        raise LabError("states", f"not state keys: {', '.join(repr(k) for k in bad)} (a key is 20 hex digits, "
                       "as `lab states list` shows; never a path): nothing deleted")
    for k in keys:
        print(f"{k}: {'deleted' if l1state.remove(k) else 'no such state'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in scenario.presets():
        sc = scenario.load(name)
        print(f"{name:24} {sc.description}")
    return 0


def _lab_json(lab: Path, stage: str) -> tuple[dict, Path, list[str]]:
    """A kept lab's lab.json, checked before anything acts on it: `lab down` kills
    the process and deletes the directories it names, so each must be what the lab
    wrote: a QEMU pid, a `run-*` work directory inside the lab's runs directory,
    `lab-qmp-*` socket directories under /tmp (lab/boot.py qmp_path). Returns the
    data, the work directory (resolved) and the spellings of it QEMU's command
    line may use (as written, and resolved)."""
    from lab import pipeline

    f = lab / "lab.json"
    if not f.is_file():
        raise LabError(stage, f"{lab} is not a kept lab (no lab.json; run with --keep)")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LabError(stage, f"{f} is not a lab.json the lab wrote ({e}); nothing done") from None

    def bad(key: str, why: str) -> LabError:
        return LabError(stage, f"{f}: '{key}' {why}; nothing was killed or deleted")

    if not isinstance(info, dict):
        raise bad("", "the file holds no JSON object")
    pid = info.get("qemu_pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise bad("qemu_pid", f"is {pid!r}, not a process id")
    work = info.get("work")
    runs = pipeline.runs_dir().resolve()
    if not isinstance(work, str) or not work:
        raise bad("work", f"is {work!r}, not a path")
    real = Path(work).resolve()  # a relative LAB_CACHE gives a relative work dir: same cwd, same place
    if real.parent != runs or not real.name.startswith("run-"):
        raise bad("work", f"is {work!r}, not a run directory inside the lab's runs directory {runs} "
                  "(set LAB_CACHE as for the run that kept it)")
    from lab import l0

    if problem := l0.kept_problem(info):  # what the L0 driver wrote: a libvirt domain's uri, name, uuid
        raise bad(*problem)
    dirs = info.get("socket_dirs", [])
    tmp = Path("/tmp").resolve()
    for d in dirs if isinstance(dirs, list) else [dirs]:
        rd = Path(d).resolve() if isinstance(d, str) and d.startswith("/") else None
        if rd is None or rd.parent != tmp or not rd.name.startswith("lab-qmp-"):
            raise bad("socket_dirs", f"holds {d!r}, not a lab-qmp-* directory under /tmp")
    return info, real, sorted({work, str(real)})


def _kept(lab: Path) -> dict:
    import ipaddress

    info, _, works = _lab_json(lab, "ssh")
    keys = info.get("keys")
    own = (images.cache_dir() / "keys").resolve()
    if not isinstance(keys, str) or Path(keys).resolve() != own:
        raise LabError("ssh", f"{lab / 'lab.json'}: 'keys' is {keys!r}, not the lab's key directory {own}")
    port = info.get("ssh_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise LabError("ssh", f"{lab / 'lab.json'}: 'ssh_port' is {port!r}, not a TCP port")
    guests = info.get("guests", {})
    try:
        ok = isinstance(guests, dict) and all(isinstance(n, str) and ipaddress.IPv4Address(ip) for n, ip in guests.items())
    except ValueError:
        ok = False
    if not ok:
        raise LabError("ssh", f"{lab / 'lab.json'}: 'guests' is {guests!r}, not names with IPv4 addresses")
    problem = _lab_qemu_problem(info["qemu_pid"], works)
    if problem:
        raise LabError("ssh", f"the lab in {lab} is no longer running (QEMU pid {info['qemu_pid']}: {problem})")
    return info


SSH_COMMAND_SECONDS = 600.0


def cmd_ssh(args: argparse.Namespace) -> int:
    import paramiko

    from lab import ssh
    from lab.timing import Deadline

    info = _kept(args.lab.resolve())
    keys = images.Keys(Path(info["keys"]))
    client = paramiko.Ed25519Key.from_private_key_file(str(keys.client))
    dom0 = ssh.SshRunner("dom0", host_key=ssh.load_pinned_key(Path(str(keys.host("dom0")) + ".pub")),
                         client_key=client, connect=ssh.tcp_connect(info["ssh_port"]))
    dom0.connect(Deadline(60), stage="ssh")
    target = dom0
    if args.machine != "dom0":
        ip = info["guests"].get(args.machine)
        if not ip:
            raise LabError("ssh", f"no machine {args.machine!r}; this lab has dom0 and {sorted(info['guests'])}")
        target = ssh.SshRunner(args.machine, host_key=ssh.load_pinned_key(Path(str(keys.host("guest")) + ".pub")),
                               client_key=client, connect=ssh.via(dom0, ip))
        target.connect(Deadline(60), stage="ssh")
    assert target.transport is not None
    command = args.command
    if command:
        res = target.run(["sh", "-c", " ".join(command)], timeout=SSH_COMMAND_SECONDS)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        if res.timed_out:
            raise LabError("ssh", f"`{' '.join(command)}` on {args.machine} did not return within "
                           f"{SSH_COMMAND_SECONDS:.0f}s")
        return res.rc if res.rc >= 0 else 255
    chan = target.transport.open_session()
    size = shutil.get_terminal_size()
    chan.get_pty(term=os.environ.get("TERM", "xterm"), width=size.columns, height=size.lines)
    chan.invoke_shell()
    interactive = sys.stdin.isatty()
    old = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setraw(sys.stdin.fileno())
        while True:
            r, _, _ = select.select([chan, sys.stdin], [], [])
            if chan in r:
                data = chan.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if sys.stdin in r:
                data = os.read(sys.stdin.fileno(), 1024)
                if not data:
                    break
                chan.send(data)
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)
    return chan.recv_exit_status() if chan.exit_status_ready() else 0


def cmd_down(args: argparse.Namespace) -> int:
    """Kill a kept lab's QEMU and delete its work directory: only after lab.json
    proved to name a run directory of this lab and, if the pid is alive, this lab's
    QEMU. The kill goes through a pidfd, so the process checked is the one killed."""
    lab = args.lab.resolve()
    info, work, works = _lab_json(lab, "down")
    pid = info["qemu_pid"]
    if info.get("driver") == "libvirt":
        from lab import l0

        # through libvirt (it knows the domain ended); proven this lab's first, as below
        done = l0.driver("libvirt", uri=info["uri"]).down(info, works)
        for d in [work, *info.get("socket_dirs", [])]:
            shutil.rmtree(d, ignore_errors=True)
        (lab / "lab.json").rename(lab / "lab.json.down")
        print(f"lab in {lab} torn down ({done})")
        return 0
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None  # QEMU is gone already: only its files are left
    try:
        # readable pidfd = the process has exited (a zombie's cmdline is empty)
        if pidfd is not None and not select.select([pidfd], [], [], 0)[0]:
            problem = _lab_qemu_problem(pid, works)
            if problem:
                raise LabError("down", f"{problem}: not this lab's QEMU; nothing was killed or deleted")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if not select.select([pidfd], [], [], 10)[0]:
                raise LabError("down", f"QEMU pid {pid} did not exit within 10 s of SIGKILL; nothing deleted")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    for d in [work, *info.get("socket_dirs", [])]:
        shutil.rmtree(d, ignore_errors=True)
    (lab / "lab.json").rename(lab / "lab.json.down")
    print(f"lab in {lab} torn down (QEMU pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
