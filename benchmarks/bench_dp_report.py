"""Tables and plot of a DP utility study (benchmarks/bench_dp_study.py's json)."""

from __future__ import annotations

import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_POINT = "default"  # the no-DP run of this point is the gain the DP runs are measured against


def no_dp_reference(runs: list[dict]) -> tuple[float, str]:
    """Perplexity of the default non-DP run: this study's own, else the committed sweep's."""
    own = [r["final_perplexity"] for r in runs if r["point"] == REFERENCE_POINT and not math.isfinite(r["epsilon_target"])]
    if own:
        return statistics.fmean(own), f"this study's `{REFERENCE_POINT}` no-DP run(s)"
    sweep = json.loads((ROOT / "benchmarks" / "results" / "sweep.json").read_text())
    ppl = next(p["final_perplexity"] for p in sweep["points"] if not math.isfinite(p["epsilon_target"]))
    return ppl, "benchmarks/results/sweep.json's no-DP run (the same config and held-out records)"


def groups(runs: list[dict]) -> dict[tuple[str, float], list[dict]]:
    out: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        out[(r["point"], r["epsilon_target"])].append(r)
    return out


def _settings(r: dict) -> str:
    t = r["train"]
    steps = f"steps {t['local_steps']}" if t["local_steps"] else f"epochs {t['local_epochs']:g}"
    return (f"B {t['batch_size']}, {steps}, {r['rounds']} rounds, lr {t['learning_rate']:g}, "
            f"{r['aggregation']}, r {r['lora_r']}")


def row(point: str, eps: float, rs: list[dict], base: float, ref: float) -> dict:
    ppl = [r["final_perplexity"] for r in rs]
    share = [(base - p) / (base - ref) for p in ppl]
    return {
        "point": point, "epsilon": eps, "n": len(rs), "settings": _settings(rs[0]),
        "compute": rs[0]["compute_per_client"], "sigma": rs[0]["noise_multiplier"],
        "ppl_mean": statistics.fmean(ppl), "ppl_min": min(ppl), "ppl_max": max(ppl),
        "ppl_sd": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
        "change_mean": statistics.fmean(r["relative_change"] for r in rs),
        "share_mean": statistics.fmean(share), "share_min": min(share), "share_max": max(share),
        "minutes": statistics.fmean(r["seconds"] for r in rs) / 60,
        "audit": "all passed" if all(r["audit_verify"] == "passed" for r in rs) else "FAILED",
    }


def write_report(results: dict, md_path: Path, png_path: Path) -> None:
    runs = results["runs"]
    if not runs:
        return
    base = statistics.fmean(r["base_perplexity"] for r in runs)
    ref, ref_from = no_dp_reference(runs)
    default_compute = next((r["compute_per_client"] for r in runs if r["point"] == REFERENCE_POINT), 192.0)
    rows = [row(p, e, rs, base, ref) for (p, e), rs in groups(runs).items()]
    eps_label = lambda e: f"{e:g}" if math.isfinite(e) else "∞ (no DP)"  # noqa: E731
    lines = [
        f"| {r['point']} | {eps_label(r['epsilon'])} | {r['settings']} | {r['compute'] / default_compute:.2f}× | "
        f"{r['sigma']:.3g} | {r['n']} | {r['ppl_mean']:.2f} ({r['ppl_min']:.2f}–{r['ppl_max']:.2f}) | "
        f"{100 * r['change_mean']:+.1f}% | {100 * r['share_mean']:.0f}% ({100 * r['share_min']:.0f}–"
        f"{100 * r['share_max']:.0f}%) | {r['minutes']:.1f} | {r['audit']} |"
        for r in rows
    ]
    loads = [r["load_before"] for r in runs]
    md_path.write_text(
        f"# DP utility study\n\n{results['config']} with the overrides of each point; record-level DP-SGD at "
        f"δ = 1e-5. Machine: {results['machine']}, shared (1-min load average before the runs "
        f"{min(loads):.1f}–{max(loads):.1f}). Base perplexity {base:.2f}; the gain kept is measured against "
        f"the default non-DP run, perplexity {ref:.2f} ({ref_from}). Compute: example passes per client "
        f"(steps × batch × rounds) over the default run's. Repeats differ only in the DP randomness (sampling "
        "and noise from the OS's entropy); ranges are min–max. Every run's `fedtune audit --verify` result is in "
        f"{md_path.with_suffix('.json').name}.\n\n"
        "| point | ε | settings | compute | σ | runs | held-out ppl, mean (range) | vs base | gain kept (range) | "
        "minutes | audit --verify |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) +
        f"\n\n![gain kept against ε]({png_path.name})\n"
    )
    _plot(rows, png_path)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for i, point in enumerate(sorted({r["point"] for r in rows})):
        pts = sorted((r for r in rows if r["point"] == point and math.isfinite(r["epsilon"])), key=lambda r: r["epsilon"])
        if not pts:
            continue
        x = [r["epsilon"] for r in pts]
        y = [100 * r["share_mean"] for r in pts]
        err = [[100 * (r["share_mean"] - r["share_min"]) for r in pts], [100 * (r["share_max"] - r["share_mean"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=point)
    ax.axhline(50, color="grey", ls=":", label="50% of the non-DP gain")
    ax.set_xscale("log")
    ax.set_xlabel("ε (δ = 1e-5, record-level, per client over the run)")
    ax.set_ylabel("share of the non-DP perplexity gain kept (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.write_bytes(buf.getvalue())
