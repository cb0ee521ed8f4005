"""DP utility study: which training settings keep the most of the non-DP gain at a given ε.

Runs the default simulation once per (point, ε, repeat), one after another, each point a
set of config overrides; records every run's config, held-out perplexity, minutes, compute
(example passes per client), repeat and the ``fedtune audit --verify`` result. Results are
appended to ``<out>/<name>.json`` after every run (a long study that stops keeps what it
did), and ``<name>.md`` / ``<name>.png`` are rewritten from it.

Repeats differ in the DP randomness only (Poisson sampling and noise come from the OS's
entropy each run); ``run.seed`` (data split, LoRA init) stays fixed so every run is
evaluated on the same held-out records.

    python benchmarks/bench_dp_study.py --point "b96-ffa:train.batch_size=96,federation.aggregation=ffa" \\
        --epsilons 8 --repeats 3
    python benchmarks/bench_dp_study.py --report-only          # rewrite md/png from the json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune import config as config_mod  # noqa: E402
from fedtune.cli import make_follower  # noqa: E402
from fedtune.driver import RunFailed  # noqa: E402
from fedtune.runfolder import read_json  # noqa: E402


def parse_point(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> (name, overrides); values parsed as TOML."""
    name, _, rest = text.partition(":")
    overrides = dict(config_mod.parse_assignment(a) for a in rest.split(",") if a.strip())
    return name, overrides


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def _compute(summary: dict, cfg) -> float:
    """Example passes per client over the run (mean over clients: steps × expected batch)."""
    rows = [c for c in summary["clients"] if c.get("steps_per_round")]
    if not rows:
        return math.nan
    return statistics.fmean(c["steps_per_round"] * cfg.federation.rounds * _batch(c, cfg) for c in rows)


def _batch(client: dict, cfg) -> float:
    """A client's expected batch: the config's, or under the DP-aware defaults q × N."""
    if cfg.train.batch_size or not client.get("sample_rate"):
        return cfg.train.batch_size
    return client["sample_rate"] * client["train_records"]


def _train_settings(summary: dict, cfg) -> dict:
    """The train settings the clients used: automatic ones (0) resolved as the clients did,
    from public inputs (fedtune.privacy.defaults), for the first client's record count."""
    from fedtune.privacy.defaults import resolve

    records = next((c["train_records"] for c in summary["clients"] if c.get("train_records")), 0)
    t = resolve(cfg, records)[0].train if records else cfg.train
    return {k: getattr(t, k) for k in ("batch_size", "local_epochs", "local_steps", "learning_rate")}


def one_run(config: str, name: str, overrides: dict, eps: float, repeat: int, runs: str) -> dict:
    from fedtune.simulate import simulate

    label = f"{name}-eps{eps:g}-r{repeat}" if math.isfinite(eps) else f"{name}-nodp-r{repeat}"
    flat = {**overrides, "run.output": runs, "run.name": f"study-{label}"}
    flat.update({"privacy.epsilon": eps} if math.isfinite(eps) else {"privacy.dp": False})
    cfg = config_mod.load(config, flat)
    print(f"== study: {label} ==", flush=True)
    t0 = time.perf_counter()
    run_dir = simulate(cfg, [], make_follower(quiet=True))
    return record(run_dir, cfg, name, overrides, eps, repeat, time.perf_counter() - t0)


def record(run_dir: Path, cfg, name: str, overrides: dict, eps: float, repeat: int, seconds: float) -> dict:
    """One study row from a finished run folder (its summary and `fedtune audit --verify`)."""
    from fedtune.privacy.audit import run_audit

    summary = read_json(run_dir / "summary.json")
    audit = run_audit(run_dir, verify=True)
    dp_rows = [c for c in summary["clients"] if c.get("epsilon") is not None]
    return {
        "point": name, "overrides": overrides, "epsilon_target": eps, "repeat": repeat, "run_dir": str(run_dir),
        "train": _train_settings(summary, cfg),
        "rounds": cfg.federation.rounds, "aggregation": cfg.federation.aggregation, "lora_r": cfg.lora.r,
        "clip_norm": cfg.privacy.clip_norm, "compute_per_client": _compute(summary, cfg),
        "noise_multiplier": max((c.get("noise_multiplier") or 0.0) for c in summary["clients"]),
        "epsilon_spent_max": max((c["epsilon"] for c in dp_rows), default=math.inf),
        "base_perplexity": summary["base_perplexity"], "final_perplexity": summary["final_perplexity"],
        "relative_change": summary["relative_change"], "seconds": seconds,
        "audit_verify": "passed" if not audit["problems"] else "FAILED: " + "; ".join(audit["problems"])[:300],
        "load_before": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--point", action="append", default=[], help="NAME:key=value,key=value (repeatable)")
    ap.add_argument("--epsilons", nargs="+", type=float, default=[8.0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--first-repeat", type=int, default=0)
    ap.add_argument("--name", default="dp_study")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-study-runs", help="where the study's run folders go")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--add-run", nargs=3, metavar=("RUN_DIR", "REPEAT", "SECONDS"),
                    help="record a run made elsewhere (e.g. by make demo) as a repeat of the first --point")
    ap.add_argument("--note", default="", help="with --add-run: how that run was made")
    ap.add_argument("--load-before", type=float, default=0.0, help="with --add-run: the 1-min load before it")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    results = load_results(path)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results["config"] = os.path.relpath(args.config, ROOT)
    if args.add_run:
        run_dir, repeat, seconds = Path(args.add_run[0]), int(args.add_run[1]), float(args.add_run[2])
        point = args.point[0]
        name, overrides = parse_point(point) if "=" in point else (point, {})  # a bare name: no overrides
        cfg = config_mod.load(run_dir / "config.toml")
        row = record(run_dir, cfg, name, overrides, cfg.privacy.epsilon, repeat, seconds)
        results["runs"].append({**row, "load_before": args.load_before, "note": args.note})
        path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    elif not args.report_only:
        for point in args.point:
            name, overrides = parse_point(point) if "=" in point else (point, {})  # a bare name: no overrides
            for eps in args.epsilons:
                for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
                    load = os.getloadavg()[0]
                    try:
                        row = one_run(args.config, name, overrides, eps, repeat, args.runs)
                    except RunFailed as exc:  # recorded, not hidden: e.g. out of memory on a shared machine
                        results.setdefault("failed", []).append({"point": name, "epsilon_target": eps,
                                                                 "repeat": repeat, "error": str(exc)[:500]})
                        path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
                        continue
                    row["load_before"] = load
                    results["runs"].append(row)
                    path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
                    print(json.dumps({k: row[k] for k in ("point", "epsilon_target", "final_perplexity",
                                                         "relative_change", "seconds", "audit_verify")}), flush=True)
    from bench_dp_report import write_report  # noqa: E402

    write_report(results, out / f"{args.name}.md", out / f"{args.name}.png")


if __name__ == "__main__":
    main()
