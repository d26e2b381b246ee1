#!/usr/bin/env python3
"""CI helpers over results directories (stdlib only: runs on the runner itself).

  verdicts.py expect VERDICT DIR      exit 0 when the newest record.json under DIR has VERDICT
  verdicts.py summary DIR...          a Markdown table of every run's verdict (for $GITHUB_STEP_SUMMARY)
  verdicts.py accel DIR...            flag every run that fell back to TCG (exit 1 with --strict)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def records(dirs: list[Path]) -> list[dict]:
    out = []
    for d in dirs:
        for f in sorted(d.rglob("record.json")):
            try:
                rec = json.loads(f.read_text())
            except ValueError:
                continue
            rec.setdefault("results_dir", str(f.parent))
            out.append(rec)
    return sorted(out, key=lambda r: str(r.get("started_utc", "")))


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expect")
    e.add_argument("verdict")
    e.add_argument("dir", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("dirs", type=Path, nargs="+")
    a = sub.add_parser("accel")
    a.add_argument("dirs", type=Path, nargs="+")
    a.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    if args.cmd == "expect":
        recs = records([args.dir])
        if not recs:
            print(f"::error::no record.json under {args.dir}")
            return 1
        got = recs[-1].get("verdict")
        print(f"{recs[-1].get('scenario')}: {got} (expected {args.verdict}): {recs[-1].get('summary', '')}")
        if got != args.verdict:
            print(f"::error::{recs[-1].get('scenario')}: verdict {got}, expected {args.verdict}")
            return 1
        return 0
    recs = records(args.dirs)
    if args.cmd == "summary":
        print("| scenario | verdict | accel | wall s | summary | results |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in recs:
            summary = str(r.get("summary") or r.get("error") or "").replace("|", "\\|")[:160]
            print(f"| {r.get('scenario')} | **{r.get('verdict')}** | {r.get('accel', '?')} | "
                  f"{float(r.get('wall_s') or 0):.0f} | {summary} | `{r['results_dir']}` |")
        if not recs:
            print("| - | no runs found | | | | |")
        return 0
    tcg = [r for r in recs if r.get("accel") != "kvm"]
    for r in tcg:
        print(f"::warning title=TCG fallback::{r.get('scenario')} ran under {r.get('accel', '?')}: "
              f"{r.get('accel_reason', 'no reason recorded')} ({r['results_dir']})")
    print(f"{len(tcg)} of {len(recs)} runs fell back to TCG")
    return 1 if (tcg and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
