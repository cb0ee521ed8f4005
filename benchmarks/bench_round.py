"""Framework overhead of a simulated round: its wall time against the clients' own
compute (the sum of their training and evaluation time ÷ the clients that run at once).

It runs a simulation (the default one unless told otherwise) through `fedtune simulate`
and reads the timings the server and clients recorded in metrics.jsonl.

    python benchmarks/bench_round.py                       # default simulation
    python benchmarks/bench_round.py --config simulations/tiny.toml --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune import config as config_mod  # noqa: E402
from fedtune.cli import make_follower  # noqa: E402
from fedtune.runfolder import read_jsonl  # noqa: E402
from fedtune.simulate import simulate, simulation_resources  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-bench-runs", help="where the benchmark's run folder goes")
    args = ap.parse_args()
    cfg = config_mod.load(args.config, {"run.output": args.runs, "run.name": "bench-round"})
    res = simulation_resources(cfg)
    total_cpus = res["init-args-num-cpus"]
    concurrency = max(1, min(cfg.num_clients, total_cpus // res["client-resources-num-cpus"]))

    t0 = time.perf_counter()
    run_dir = simulate(cfg, [], make_follower(quiet=False))
    command_wall = time.perf_counter() - t0

    rows = read_jsonl(run_dir / "metrics.jsonl")
    per_round = []
    for r in (x for x in rows if x["phase"] == "round" and x["round"] > 0):
        n = r["round"]
        train = sum(x["train-seconds"] for x in rows if x["phase"] == "train" and x["round"] == n and x["status"] == "ok")
        evals = sum(x["eval-seconds"] for x in rows if x["phase"] == "evaluate" and x["round"] == n and x["status"] == "ok")
        ideal_train, ideal_round = train / concurrency, (train + evals) / concurrency
        per_round.append({
            "round": n, "train_wall_s": r["train-seconds"], "clients_train_s": train, "ideal_train_s": ideal_train,
            "train_overhead_ratio": r["train-seconds"] / ideal_train,
            "round_wall_s": r["train-seconds"] + r["evaluate-seconds"], "clients_train_eval_s": train + evals,
            "ideal_round_s": ideal_round, "round_overhead_ratio": (r["train-seconds"] + r["evaluate-seconds"]) / ideal_round,
        })
    base = next(x for x in rows if x["phase"] == "round" and x["round"] == 0)
    result = {
        "config": os.path.relpath(args.config, ROOT), "model": cfg.model.name, "clients": cfg.num_clients,
        "rounds": cfg.federation.rounds, "concurrency": concurrency, "cpus": total_cpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command_wall_s": command_wall, "round0_evaluate_s (includes client start-up and model load)": base["evaluate-seconds"],
        "rounds_detail": per_round, "target_round_overhead_ratio": 1.2, "run_dir": str(run_dir),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "round.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = "\n".join(
        f"| {r['round']} | {r['train_wall_s']:.1f} | {r['ideal_train_s']:.1f} | {r['train_overhead_ratio']:.3f} | "
        f"{r['round_wall_s']:.1f} | {r['ideal_round_s']:.1f} | **{r['round_overhead_ratio']:.3f}** |" for r in per_round
    )
    (out / "round.md").write_text(
        f"# Simulated round: wall time vs clients' compute\n\n{result['config']}: {cfg.num_clients} clients, "
        f"{cfg.model.name}, {concurrency} clients at a time on {total_cpus} CPU cores ({result['machine']}).\n"
        f"Ideal = clients' summed time ÷ {concurrency}.\n\n"
        "| round | training wall s | ideal s | ratio | round wall s (train + evaluate) | ideal s | ratio |\n"
        "|---|---|---|---|---|---|---|\n" + lines +
        f"\n\nTarget: round ≤ 1.2× ideal. The whole command took {command_wall:.0f} s; round 0 (evaluating the base "
        f"model, with client start-up and model loading) took {base['evaluate-seconds']:.0f} s.\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
