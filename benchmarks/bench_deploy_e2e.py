"""The deployment end-to-end test, timed side by side: SuperLink + 4 SuperNodes (TLS,
authentication), SecAgg+, 2 rounds on the tiny model, a client killed in round 2
(tests/deploy/test_deploy_e2e.py), at an older commit and at this tree, alternating.

Each run is that test alone under pytest, as CI runs it, with the tree's own PYTHONPATH and
this venv: its wall time, each round's seconds (and round 2's SecAgg+ stage seconds) from the
run's metrics.jsonl, the load average before and after. The older commit is checked out with
``git worktree add --detach`` in a temporary folder and removed afterwards. Before and after
the whole measurement: ``uptime`` and the busiest processes, so the result says what else ran.

    python benchmarks/bench_deploy_e2e.py [--old COMMIT] [--pairs 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/deploy/test_deploy_e2e.py"  # tests/test_deploy_e2e.py in trees before tests/ had folders
OLD = "b7dcb04"  # the commit before the long-lived client worker (git log -- fedtune/deploy/worker.py)


def machine_state() -> dict:
    """uptime and the five busiest processes (what else is running)."""
    ps = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "busiest": [line.strip()[:160] for line in ps.splitlines()[1:6]]}


def rounds_of(basetemp: Path) -> list[dict]:
    """Each round's seconds and its SecAgg+ stages' seconds, from the run's metrics.jsonl."""
    for metrics in basetemp.glob("*/runs/*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return [{"round": r["round"], "seconds": round(r.get("seconds", 0.0), 1),
                 "stages": {k[len("secagg-"):-len("-seconds")]: round(v, 1) for k, v in r.items()
                            if k.startswith("secagg-") and k.endswith("-seconds")}}
                for r in rows if r["phase"] == "round" and r["round"] > 0]
    return []


def _test_of(tree: Path) -> str:
    return TEST if (tree / TEST).is_file() else "tests/test_deploy_e2e.py"


def run_once(tree: Path, label: str, basetemp: Path) -> dict:
    """One pytest run of the tree's own e2e test: wall time, outcome, rounds, load."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    others = machine_state()["busiest"][:3]  # what else ran as this run started
    load_before, t0 = os.getloadavg(), time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", _test_of(tree),
                          f"--basetemp={basetemp}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    wall, load_after = time.monotonic() - t0, os.getloadavg()
    out = {"tree": label, "passed": res.returncode == 0, "wall_seconds": round(wall, 1), "rounds": rounds_of(basetemp),
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
           "tail": res.stdout.strip().splitlines()[-1:], "others_at_start": others}
    print(json.dumps(out), flush=True)
    return out


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()[:100]


def measure(old: str, pairs: int, tmp: Path) -> dict:
    """``pairs`` × (old, new), alternating."""
    old_tree = tmp / "e2e-old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), old], check=True,
                   capture_output=True)
    try:
        before, runs = machine_state(), []
        for i in range(pairs):
            for label, tree in (("old", old_tree), ("new", ROOT)):
                runs.append(run_once(tree, label, tmp / f"bt-{label}-{i}"))
        after = machine_state()
        commits = {"old": commit_of(old_tree), "new": commit_of(ROOT)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    walls = {t: [r["wall_seconds"] for r in runs if r["tree"] == t and r["passed"]] for t in ("old", "new")}
    ratio = (statistics.mean(walls["old"]) / statistics.mean(walls["new"])) if walls["old"] and walls["new"] else None
    return {"commits": commits, "runs": runs, "before": before, "after": after,
            "ratio": round(ratio, 2) if ratio else None, "passed": all(r["passed"] for r in runs)}


def markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {x['tree']} | {x['wall_seconds']} | {x['passed']} | "
        + " / ".join(f"{y['seconds']}" for y in x["rounds"]) + " | "
        + (", ".join(f"{k} {v}" for k, v in x["rounds"][-1]["stages"].items()) if x["rounds"] else "") + " | "
        + f"{x['load_before']} → {x['load_after']} |" for x in r["runs"])
    ratio = f"**{r['ratio']}×**" if r["ratio"] else "n/a (a run failed)"
    busy = lambda s: "; ".join(s["busiest"][:3])  # noqa: E731
    return (f"# Deployment end to end, timed side by side\n\n`{TEST}`: SuperLink + 4 SuperNodes (TLS, SuperNode "
            "authentication), SecAgg+, 2 rounds on the tiny model, one client killed in round 2; each tree runs its "
            "own version of the test (pytest, the test alone), alternating old/new.\n\n"
            f"- old: `{r['commits']['old']}` (before the long-lived client worker)\n"
            f"- new: `{r['commits']['new']}`\n- machine: {r['machine']}\n"
            f"- before: `{r['before']['uptime']}`; busiest: {busy(r['before'])}\n"
            f"- after: `{r['after']['uptime']}`; busiest: {busy(r['after'])}\n\n"
            f"Mean wall time old / new: {ratio}\n\n"
            "| tree | wall s | passed | round 1 / round 2 s | round 2 SecAgg+ stages (s) | load (1, 5, 15 min) |\n"
            f"|---|---|---|---|---|---|\n{rows}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=OLD, help="the commit to compare with")
    ap.add_argument("--pairs", type=int, default=2, help="old/new pairs, run alternately")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedtune-e2e-") as tmp:
        result = measure(args.old, args.pairs, Path(tmp))
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "deploy_e2e.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
