"""Aggregation and personalization: fedavg vs ffa, with DP (ε = 8) and without, each
followed by per-client personalization (fine-tuning from the global adapter).

Runs the default simulation (4 clinics, drug reviews split by condition, SmolLM2-135M)
once per (aggregation, DP) pair, one after another, and tabulates per-client held-out
perplexity of the base, local-only, global and personalized adapters (mean and worst
client). Results are rewritten after every run, so a cut-short benchmark keeps what it measured.

    python benchmarks/bench_personalize.py                          # 4 runs, personalize.steps = 10
    python benchmarks/bench_personalize.py --config simulations/tiny.toml --out /tmp/p
    python benchmarks/bench_personalize.py --merge /tmp/a/personalize.json /tmp/b/personalize.json
"""

from __future__ import annotations

import argparse
import io
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
from fedtune.personalize import MODELS  # noqa: E402
from fedtune.runfolder import read_json  # noqa: E402
from fedtune.simulate import simulate  # noqa: E402

# With DP the federated rounds spend ε = 8 (the target); the budget leaves room for personalization.
SETTINGS = {
    "dp": {"privacy.epsilon": 8.0, "privacy.budget": 10.0, "personalize.dp": True},
    "no-dp": {"privacy.dp": False, "personalize.dp": False},
}


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=110, sharey=True)
    width = 0.8 / len(MODELS)
    for ax, stat in zip(axes, ("average", "worst")):
        for i, m in enumerate(MODELS):
            ax.bar([x + i * width for x in range(len(points))], [p[stat][m] for p in points], width, label=m)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(points))], [p["label"] for p in points], fontsize=8)
        ax.set_title(f"{stat} client", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalize.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    points = result["points"]
    for p in points:  # failed client replies (e.g. killed for memory) are counted, never hidden
        p.setdefault("failed", _failed(Path(p["run_dir"])))
    _plot(points, out / "personalize.png")
    rows = []
    for p in points:
        a, w = p["average"], p["worst"]
        eps = "∞ (no DP)" if p["epsilon_max"] is None else f"{p['epsilon_federated']:.2f} → {p['epsilon_max']:.2f}"
        rows.append(f"| {p['aggregation']} | {eps} | {p['upload_bytes']} | {a['base']:.2f} | {a['local']:.2f} | "
                    f"{a['global']:.2f} | {a['personalized']:.2f} | {w['global']:.2f} | {w['personalized']:.2f} | "
                    f"{'–' if p['failed'] is None else p['failed']} | {p['seconds'] / 60:.1f} |")
    sections = []
    for p in points:
        clients = p["clients"]
        better = sum(c["perplexity"]["personalized"] < c["perplexity"]["global"] for c in clients)
        a = p["average"]
        lines = [f"### {p['label']}", "",
                 f"Personalized beats global for {better} of {len(clients)} clients; mean global "
                 f"{a['global']:.2f} vs local-only {a['local']:.2f} "
                 f"({'global better' if a['global'] < a['local'] else 'local-only better'}).", "",
                 "| client | train records | held-out records | ppl base | ppl local-only | ppl global | ppl personalized "
                 "| acc. majority label | acc. base | acc. local-only | acc. global | acc. personalized |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in clients:
            acc = c.get("accuracy")
            lines.append(f"| {c['client']} | {c['train_records']} | {c['heldout_records']} | "
                         + " | ".join(f"{c['perplexity'][m]:.2f}" for m in MODELS) + " | "
                         + (f"{c['majority_accuracy']:.1%} | " + " | ".join(f"{acc[m]:.1%}" for m in MODELS)
                            if acc else " | ".join(["–"] * 5)) + " |")
        accs = p.get("accuracy")
        for stat in ("average", "worst"):
            lines.append(f"| **{stat}** | | | " + " | ".join(f"{p[stat][m]:.2f}" for m in MODELS) + " | "
                         + ((f"{accs['majority']:.1%} | " if stat == "average" else " | ")
                            + " | ".join(f"{accs[stat][m]:.1%}" for m in MODELS) if accs else " | ".join(["–"] * 5))
                         + " |")
        if p.get("plot"):
            lines += ["", f"![{p['label']}]({p['plot']})"]
        sections.append("\n".join(lines))
    (out / "personalize.md").write_text(
        f"# Aggregation and personalization\n\n{result['setup']}\n\n"
        "| aggregation | ε federated → after personalization (max over clients) | upload bytes per client per round | "
        "mean base | mean local-only | mean global | mean personalized | worst global | worst personalized | "
        "failed client replies (train + evaluate) | minutes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
        "\n\nHeld-out perplexity per client, averaged over clients (mean) and of the worst client (lower is better). "
        "Rating accuracy (the drug reviews' rating class: negative / neutral / positive) is scored by label "
        "likelihood: a held-out review counts as right when the true rating in its prompt makes the review more "
        "likely than the other ratings do; the majority-label column always answers the client's most common "
        "training rating.\n\n![mean and worst client](personalize.png)\n\n## Per client\n\n"
        + "\n\n".join(sections) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--aggregations", nargs="+", default=["fedavg", "ffa"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=10, help="personalize.steps")
    ap.add_argument("--rounds", type=int, default=0, help="federation.rounds (0 = the config's)")
    ap.add_argument("--max-eval", type=int, default=-1, help="data.max_eval_examples per client (-1 = the config's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-bench-runs", help="where the run folders go")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only combine the points of earlier personalize.json files")
    args = ap.parse_args()
    if args.merge:  # e.g. settings run as separate processes
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        _write({**parts[0], "points": [p for part in parts for p in part["points"]]}, Path(args.out))
        return

    cfg0 = config_mod.load(args.config)
    rounds = args.rounds or cfg0.federation.rounds
    max_eval = cfg0.data.max_eval_examples if args.max_eval < 0 else args.max_eval
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    result = {
        "config": os.path.relpath(args.config, ROOT), "model": cfg0.model.name, "clients": cfg0.num_clients,
        "rounds": rounds, "max_eval_examples": max_eval, "personalize_steps": args.steps, "machine": machine, "points": [],
        "setup": (f"{os.path.relpath(args.config, ROOT)}: {cfg0.num_clients} clients ({cfg0.data.source}, partition "
                  f"{cfg0.data.partition} by {cfg0.data.partition_by}; held-out records per client: "
                  f"{max_eval or 'all'}), {cfg0.model.name}, {rounds} round(s), then "
                  f"personalization by fine-tuning ({args.steps} steps at lr {cfg0.personalize.lr:g}; with DP: DP-SGD "
                  f"at the run's σ and q, charged to each client's ledger, privacy.budget 10). Machine: {machine}."),
    }
    for setting in args.settings:
        for aggregation in args.aggregations:
            label = f"{aggregation}, {'ε=8' if setting == 'dp' else 'no DP'}"
            overrides = {"run.output": args.runs, "run.name": f"pers-{aggregation}-{setting}",
                         "federation.aggregation": aggregation, "federation.rounds": rounds,
                         "data.max_eval_examples": max_eval,
                         "personalize.method": "finetune", "personalize.steps": args.steps, **SETTINGS[setting]}
            cfg = config_mod.load(args.config, overrides)
            print(f"== {label} ==", flush=True)
            t0 = time.perf_counter()
            run_dir = simulate(cfg, [], make_follower(quiet=True))
            pers = read_json(run_dir / "personalization.json")
            summary = read_json(run_dir / "summary.json")
            uploads = [c.get("upload-bytes") for c in _train_rows(run_dir)]
            fed_eps = [c["epsilon_before"] for c in pers["clients"] if "epsilon_before" in c]
            result["points"].append({
                "label": label, "aggregation": aggregation, "dp": setting == "dp",
                "epsilon_federated": max(fed_eps) if fed_eps else None,
                "epsilon_max": max(c.get("epsilon_after", 0.0) for c in pers["clients"]) if setting == "dp" else None,
                "upload_bytes": max(u for u in uploads if u is not None),
                "base_perplexity_pooled": summary["base_perplexity"], "final_perplexity_pooled": summary["final_perplexity"],
                "average": pers["average"], "worst": pers["worst"], "clients": pers["clients"],
                "accuracy": pers.get("accuracy"), "plot": _copy_plot(run_dir, Path(args.out), aggregation, setting),
                "seconds": time.perf_counter() - t0, "run_dir": str(run_dir),
            })
            _write(result, Path(args.out))
    print(json.dumps(result["points"], indent=2))


def _copy_plot(run_dir: Path, out: Path, aggregation: str, setting: str) -> str:
    """The run's per-client plot, next to the results; its file name."""
    name = f"personalize_{aggregation}_{setting}.png"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes((run_dir / "personalization.png").read_bytes())
    return name


def _failed(run_dir: Path) -> int | None:
    """Client training or evaluation replies that failed in the run (None: run folder gone)."""
    from fedtune.runfolder import read_jsonl

    if not (run_dir / "metrics.jsonl").exists():
        return None
    return sum(r.get("status") == "failed" for r in read_jsonl(run_dir / "metrics.jsonl"))


def _train_rows(run_dir: Path) -> list[dict]:
    from fedtune.runfolder import read_jsonl

    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train" and r.get("status") == "ok"]


if __name__ == "__main__":
    main()
