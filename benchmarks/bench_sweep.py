"""Privacy–utility sweep: held-out perplexity of the global adapter against ε.

Runs the default simulation once per ε (record-level DP-SGD; ∞ = the same run without
DP), one after another, and plots the final held-out perplexity against ε next to the
base model's.

    python benchmarks/bench_sweep.py                                   # ε = 1, 3, 8, ∞
    python benchmarks/bench_sweep.py --config simulations/tiny.toml --epsilons 1 inf --out /tmp/s
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune import config as config_mod  # noqa: E402
from fedtune.cli import make_follower  # noqa: E402
from fedtune.runfolder import read_json  # noqa: E402
from fedtune.simulate import simulate  # noqa: E402


def _eps_label(eps: float) -> str:
    return f"{eps:g}" if math.isfinite(eps) else "∞ (no DP)"


def _plot(points: list[dict], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p for p in points if math.isfinite(p["epsilon_target"])]
    infinite = [p for p in points if not math.isfinite(p["epsilon_target"])]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot([p["epsilon_target"] for p in finite], [p["final_perplexity"] for p in finite], "o-", label="DP-SGD (record-level)")
    xmax = max((p["epsilon_target"] for p in finite), default=1.0) * 2.5
    for p in infinite:
        ax.plot([xmax], [p["final_perplexity"]], "s", color="C3", label="no DP (ε = ∞)")
    ax.axhline(base, color="grey", ls=":", label="base model")
    ax.set_xscale("log")
    ticks = [p["epsilon_target"] for p in finite] + ([xmax] if infinite else [])
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks[: len(finite)]] + (["∞"] if infinite else []))
    ax.minorticks_off()
    ax.set_xlabel("ε (δ fixed; per client, over the whole run)")
    ax.set_ylabel("held-out perplexity (global adapter)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "simulations" / "default.toml"))
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default="/tmp/fedtune-bench-runs", help="where the sweep's run folders go")
    args = ap.parse_args()

    points, base = [], None
    for eps in args.epsilons:
        label = f"eps-{eps:g}" if math.isfinite(eps) else "no-dp"
        overrides = {"run.output": args.runs, "run.name": f"sweep-{label}"}
        overrides.update({"privacy.epsilon": eps} if math.isfinite(eps) else {"privacy.dp": False})
        cfg = config_mod.load(args.config, overrides)
        print(f"== sweep: {label} ==", flush=True)
        t0 = time.perf_counter()
        run_dir = simulate(cfg, [], make_follower(quiet=False))
        summary = read_json(run_dir / "summary.json")
        base = summary["base_perplexity"]
        spent = max(c["epsilon"] for c in summary["clients"])
        points.append({
            "label": label, "epsilon_target": eps, "epsilon_spent_max": spent, "delta": cfg.privacy.delta,
            "noise_multiplier": summary["clients"][0]["noise_multiplier"], "final_perplexity": summary["final_perplexity"],
            "relative_change": summary["relative_change"], "seconds": time.perf_counter() - t0, "run_dir": str(run_dir),
        })

    cfg = config_mod.load(args.config)
    result = {
        "config": os.path.relpath(args.config, ROOT), "model": cfg.model.name, "clients": cfg.num_clients,
        "rounds": cfg.federation.rounds, "delta": cfg.privacy.delta, "base_perplexity": base, "points": points,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    _plot(points, base, out / "sweep.png")
    rows = "\n".join(
        f"| {_eps_label(p['epsilon_target'])} | "
        f"{p['noise_multiplier']:.3g} | {p['final_perplexity']:.2f} | {100 * p['relative_change']:+.1f}% | {p['seconds'] / 60:.1f} |"
        for p in points
    )
    (out / "sweep.md").write_text(
        f"# Privacy–utility sweep\n\n{result['config']}: {cfg.num_clients} clients, {cfg.model.name}, "
        f"{cfg.federation.rounds} rounds, record-level DP-SGD at δ = {cfg.privacy.delta:g} ({result['machine']}). "
        f"One run per ε; base model perplexity {base:.2f}.\n\n"
        "| ε | noise σ | held-out perplexity | vs base | minutes |\n|---|---|---|---|---|\n" + rows +
        "\n\n![perplexity against ε](sweep.png)\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
