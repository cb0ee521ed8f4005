"""Person vs record as the privacy unit: held-out perplexity at ε = 8 for one person.

The default data (drug reviews) has no user column, so the people here are SYNTHETIC:
each condition's reviews are cut, in a seeded random order, into groups of 1-8 reviews, and
each group is called one person (column ``person``). Three runs of the same short simulation
(SmolLM2-135M, the same people at the same clients, the same held-out people):

- **record-level, ε = 8**: protects one review, not a person (shown for reference);
- **user-level, ε = 8**: ``privacy.unit = "user"``, one person protected at ε = 8;
- **record-level converted by group privacy**: record-level DP-SGD at ε/k and
  δ/(k·e^((k-1)ε/k)), which by group privacy protects any k reviews (a whole person, k = the
  largest person) at (ε, δ) = (8, 1e-5): the same guarantee as user-level, bought the old way.

    python benchmarks/bench_user_dp.py                  # 3 short runs; results in benchmarks/results
    python benchmarks/bench_user_dp.py --config simulations/tiny.toml --out /tmp/u
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune import config as config_mod  # noqa: E402
from fedtune.cli import make_follower  # noqa: E402
from fedtune.data import _drugreview_rows  # noqa: E402
from fedtune.privacy import Ledger  # noqa: E402
from fedtune.runfolder import read_json, read_jsonl  # noqa: E402
from fedtune.simulate import simulate  # noqa: E402

EPSILON, DELTA, MAX_PERSON = 8.0, 1e-5, 8


def synthetic_people(path: Path, seed: int = 0) -> dict:
    """The drug reviews with a ``person`` column: seeded groups of 1..MAX_PERSON reviews per condition."""
    rng = random.Random(seed)
    rows = _drugreview_rows()
    by_condition: dict[str, list[dict]] = {}
    for r in rows:
        by_condition.setdefault(r["condition"], []).append(r)
    out, people = [], 0
    for condition in sorted(by_condition):
        group = by_condition[condition]
        rng.shuffle(group)
        while group:
            size = rng.randint(1, MAX_PERSON)
            for r in group[:size]:
                out.append({**r, "person": f"person-{people}"})
            group, people = group[size:], people + 1
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    return {"records": len(out), "people": people}


def group_privacy(k: int) -> tuple[float, float]:
    """Record-level (ε, δ) whose group-privacy bound for k records is (EPSILON, DELTA)."""
    eps = EPSILON / k
    return eps, DELTA / (k * math.exp((k - 1) * eps))


def settings(k: int) -> dict[str, dict]:
    eps_k, delta_k = group_privacy(k)
    return {
        "record-level, ε=8 (protects one review)": {"privacy.unit": "record"},
        "user-level, ε=8 (protects one person)": {"privacy.unit": "user"},
        f"record-level at ε={eps_k:.2f}, δ={delta_k:.2g} (group privacy: one person at ε=8)":
            {"privacy.unit": "record", "privacy.epsilon": eps_k, "privacy.delta": delta_k},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="train.local_steps per round")
    ap.add_argument("--max-eval", type=int, default=16, help="data.max_eval_examples per client")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-bench-user-dp", help="where the data and run folders go")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    data = runs / "drugreview-people.jsonl"
    counts = synthetic_people(data)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    result = {"data": counts, "machine": machine, "rounds": args.rounds, "local_steps": args.steps,
              "max_eval_examples": args.max_eval, "points": []}
    for label, overrides in settings(MAX_PERSON).items():
        cfg = config_mod.load(args.config, {
            "run.output": str(runs), "run.name": "user-dp", "data.source": str(data), "data.user_field": "person",
            "federation.rounds": args.rounds, "train.local_steps": args.steps,
            "data.max_eval_examples": args.max_eval, "privacy.epsilon": EPSILON, "privacy.delta": DELTA, **overrides})
        print(f"== {label} ==", flush=True)
        t0 = time.perf_counter()
        run_dir = simulate(cfg, [], make_follower(quiet=True))
        summary = read_json(run_dir / "summary.json")
        plans = [Ledger(p).plan() for p in sorted((run_dir / "clients").glob("*/ledger.jsonl"))]
        spends = [Ledger(p).spends() for p in sorted((run_dir / "clients").glob("*/ledger.jsonl"))]
        spent = [s[-1]["epsilon"] if s else 0.0 for s in spends]
        failed = sum(r.get("phase") == "train" and r.get("status") == "failed" for r in read_jsonl(run_dir / "metrics.jsonl"))
        result["points"].append({
            "label": label, "unit": cfg.privacy.unit, "epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta,
            "epsilon_spent_max": max(spent), "sigma": [p["noise_multiplier"] for p in plans],
            "sample_rate": [p["sample_rate"] for p in plans], "dataset_size": [p["dataset_size"] for p in plans],
            "base_perplexity": summary["base_perplexity"], "final_perplexity": summary["final_perplexity"],
            "failed": failed, "minutes": (time.perf_counter() - t0) / 60, "run_dir": str(run_dir)})
        _write(result, cfg, out)


def _write(result: dict, cfg, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "user_dp.json").write_text(json.dumps(result, indent=2) + "\n")
    d = result["data"]
    lines = [
        "# Person vs record as the privacy unit", "",
        f"**Synthetic people** (the default data has no user column): the {d['records']} drug reviews cut into "
        f"{d['people']} seeded groups of 1-{MAX_PERSON} reviews of one condition, each called one person. "
        f"**A short run**, not a full benchmark (the machine is shared, 2 cores): {cfg.model.name}, "
        f"{cfg.num_clients} clients (natural partition: whole people by condition), {result['rounds']} round(s) of "
        f"{result['local_steps']} local steps, train.batch_size {cfg.train.batch_size} (records per step, or people "
        f"per step at the user unit with up to {cfg.privacy.records_per_user} records each), held-out: "
        f"{result['max_eval_examples']} records per client of held-out people. Machine: {result['machine']}.", "",
        "| run | unit | target (ε, δ) | σ per client | q per client | pooled held-out perplexity base → final "
        "| failed client trainings | minutes |", "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['label']} | {p['unit']} | ({p['epsilon']:.3g}, {p['delta']:.2g}) | "
                     f"{', '.join(f'{s:.3g}' for s in p['sigma'])} | {', '.join(f'{q:.3g}' for q in p['sample_rate'])} | "
                     f"{p['base_perplexity']:.2f} → {p['final_perplexity']:.2f} | {p['failed']} | {p['minutes']:.1f} |")
    lines += ["", "Rows 2 and 3 give the same guarantee, one person at (ε, δ) = (8, 1e-5); row 1 protects only one "
              "review. Group privacy for k records: (kε, k·e^((k-1)ε)·δ), the standard bound for (ε, δ)-DP."]
    (out / "user_dp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
