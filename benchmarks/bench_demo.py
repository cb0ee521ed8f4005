"""`make demo` from a fresh clone, timed: install, then the default simulation.

    python benchmarks/bench_demo.py                       # clone this repo's HEAD to a temp dir, run, write results
    python benchmarks/bench_demo.py --clone DIR --log F   # record a run already made (F: make demo's output,
                                                          #   ending in a line "rc=N elapsed=SECONDS")

Writes benchmarks/results/demo.{md,json}: wall time, the base -> final perplexity the demo
prints, every client's training seconds per round, the machine and its load average.
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


def run_demo(clone: Path, log: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    start = time.time()
    with log.open("w") as out:
        rc = subprocess.run(["make", "demo"], cwd=clone, stdout=out, stderr=subprocess.STDOUT).returncode
    with log.open("a") as out:
        out.write(f"rc={rc} elapsed={round(time.time() - start)}\n")


def summarize(clone: Path, log: Path) -> dict:
    text = log.read_text()
    rc, elapsed = map(int, re.search(r"rc=(\d+) elapsed=(\d+)", text).groups())
    (run_dir,) = sorted((clone / "runs").iterdir())[-1:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("phase") == "round"]
    run = json.loads((run_dir / "run.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True).stdout.strip()
    return {
        "commit": commit, "rc": rc, "elapsed_s": elapsed,
        "simulation_s": _seconds(run["started"], run["finished"]),
        "perplexity": {"base": rounds[0]["perplexity"], "final": rounds[-1]["perplexity"]},
        "printed": re.search(r"held-out perplexity: .*", text).group(0),
        "train_seconds": {f"{r['client']}/round {r['round']}": round(r["train-seconds"], 1)
                          for r in rows if r.get("phase") == "train" and "train-seconds" in r},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": run.get("versions", {}),
    }


def _seconds(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def write(result: dict, note: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["note"] = note
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# `make demo` from a fresh clone", "",
        f"Commit {result['commit']}; {result['machine']}. {note}", "",
        "| exit | wall time, install included | simulation | held-out perplexity (printed) |",
        "|---|---|---|---|",
        f"| {result['rc']} | {result['elapsed_s'] // 60} min {result['elapsed_s'] % 60} s "
        f"| {result['simulation_s'] / 60:.1f} min | {result['printed'].split(': ', 1)[1]} |", "",
        "Training seconds per client and round: "
        + ", ".join(f"{k} {v}" for k, v in result["train_seconds"].items()) + ".", "",
    ]
    (out / "demo.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clone", type=Path)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--note", default="", help="the load and what else ran (written into the result)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.clone is None:
        args.clone = Path(tempfile.mkdtemp(prefix="fedtune-demo-")) / "fedtune"
        args.log = args.clone.parent / "demo.log"
        load = os.getloadavg()
        run_demo(args.clone, args.log)
        args.note = args.note or f"Load average before: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}."
    write(summarize(args.clone, args.log), args.note, args.out)


if __name__ == "__main__":
    main()
