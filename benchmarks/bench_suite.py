"""`make test` from a fresh clone (what CI runs through .ci/run), timed.

    python benchmarks/bench_suite.py                        # clone HEAD to a temp dir, run, write results
    python benchmarks/bench_suite.py --clone DIR --log F    # record a run already made (F: its output,
                                                            #   ending in a line "rc=N elapsed=SECONDS ...")

Writes benchmarks/results/suite.{md,json} (one entry per recorded run, appended): wall time
with the install, pytest's own time, the pass count, the slowest tests it printed, the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_suite(clone: Path, log: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    start = time.time()
    with log.open("w") as out:
        rc = subprocess.run(["bash", ".ci/run"], cwd=clone, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "CI": "true"}).returncode
    with log.open("a") as out:
        out.write(f"rc={rc} elapsed={round(time.time() - start)}\n")


def summarize(clone: Path, log: Path, note: str) -> dict:
    text = log.read_text()
    rc, elapsed = map(int, re.search(r"rc=(\d+) elapsed=(\d+)", text).groups())
    summary = re.findall(r"^=*\s*(\d+ passed.*) in ([\d.]+)s", text, re.M)[-1]
    slowest = re.findall(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)", text, re.M)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True).stdout.strip()
    return {"commit": commit, "rc": rc, "elapsed_s": elapsed, "pytest_s": float(summary[1]),
            "result": summary[0], "slowest": [{"s": float(s), "phase": p, "test": t} for s, p, t in slowest],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "note": note}


def write(runs: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    lines = ["# `make test` from a fresh clone", "",
             "Each row: a fresh clone of main, `CI=true bash .ci/run` (installs into a new .venv, then the "
             "README's test command: two pytest-xdist workers). Target: under 25 minutes on 2 cores.", "",
             "| commit | result | pytest | wall time, install included | conditions |", "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['commit']} | {r['result']} | {r['pytest_s'] / 60:.1f} min | "
                     f"{r['elapsed_s'] // 60} min {r['elapsed_s'] % 60} s | {r['machine']}; {r['note']} |")
    last = runs[-1]
    if last["slowest"]:
        lines += ["", f"Slowest in the last run ({last['commit']}):", "",
                  "| s | phase | test |", "|---|---|---|"]
        lines += [f"| {x['s']:.0f} | {x['phase']} | `{x['test']}` |" for x in last["slowest"]]
    (out / "suite.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clone", type=Path)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--note", default="", help="the load and what else ran")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.clone is None:
        args.clone = Path(tempfile.mkdtemp(prefix="fedtune-suite-")) / "fedtune"
        args.log = args.clone.parent / "suite.log"
        load = os.getloadavg()
        run_suite(args.clone, args.log)
        args.note = args.note or f"load before {load[0]:.2f}"
    path = args.out / "suite.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs.append(summarize(args.clone, args.log, args.note))
    write(runs, args.out)


if __name__ == "__main__":
    main()
