"""fp32 against bf16 autocast for a client's DP-SGD step on this CPU, side by side.

`model.precision = "auto"` should pick bf16 only where it is faster. This times one
LoRA + DP-SGD step (Opacus, batch 16 of real drug reviews, one torch thread: a default
simulated client's share) in each precision, alternating on the same batches so machine
noise hits both alike, and takes the ratio per pair. It also compares the two precisions'
per-sequence losses on the same weights (the LoRA layers and their clipping stay fp32
under autocast: fedtune.model.keep_lora_in_fp32).

    python benchmarks/bench_precision.py               # writes benchmarks/results/precision.{json,md}
    python benchmarks/bench_precision.py --model tiny-random-llama --pairs 2 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_step import cpu_name, make_step, setup  # noqa: E402
from fedtune import config as config_mod  # noqa: E402
from fedtune.model import add_lora, load_base_model, resolve_precision  # noqa: E402
from fedtune.train import forward_logits, per_sequence_loss  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def cpu_features() -> dict:
    return {"avx512": torch.cpu._is_avx512_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx": torch.cpu._is_amx_tile_supported()}


@torch.no_grad()
def loss_agreement(cfg, path, device, batches) -> float:
    """Largest relative difference of a per-sequence loss, bf16 autocast against fp32."""
    model = add_lora(load_base_model(path, device), cfg, seed=0)
    model.eval()
    worst = 0.0
    for batch in batches[:4]:
        labels = batch["labels"].to(device)
        ref = per_sequence_loss(forward_logits(model, batch, device, None), labels)
        low = per_sequence_loss(forward_logits(model, batch, device, torch.bfloat16), labels)
        worst = max(worst, float(((low - ref).abs() / ref.abs()).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=config_mod.Config().model.name)
    ap.add_argument("--pairs", type=int, default=10, help="timed step pairs (after one warm-up pair)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    cfg = config_mod.load(ROOT / "simulations" / "default.toml",
                          {"model.name": args.model, "train.batch_size": 16, "train.learning_rate": 0.02})
    device, _, path, _, data, batches = setup(cfg, args.threads)
    steps = {name: make_step("lora+dp", cfg, path, device, amp, data) for name, amp in PRECISIONS.items()}
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for i in range(args.pairs + 1):
        batch = batches[i % len(batches)]
        order = list(PRECISIONS) if i % 2 == 0 else list(reversed(PRECISIONS))  # alternate who goes first
        for name in order:
            t0 = time.perf_counter()
            steps[name](batch)
            if i > 0:  # the first pair warms up
                times[name].append(time.perf_counter() - t0)
        print(f"pair {i}/{args.pairs}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in times if times[n]), flush=True)
    ratios = [f / b for f, b in zip(times["fp32"], times["bf16"])]
    result = {
        "model": args.model, "batch": 16, "threads": args.threads, "device": str(device),
        "machine": {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, **cpu_features()},
        "auto_picks": str(resolve_precision("auto", device)),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds_per_step": {n: [round(t, 3) for t in v] for n, v in times.items()},
        "median_s": {n: round(statistics.median(v), 3) for n, v in times.items()},
        "speedup_bf16": {"median": round(statistics.median(ratios), 3),
                         "min": round(min(ratios), 3), "max": round(max(ratios), 3)},
        "max_rel_loss_diff": round(loss_agreement(cfg, path, device, batches), 5),
    }
    write(result, Path(args.out))


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(r, indent=1) + "\n")
    m = r["machine"]
    lines = [
        "# DP-SGD step: fp32 against bf16 autocast", "",
        f"{r['model']}, LoRA + DP-SGD (Opacus), batch {r['batch']} × ≤128 tokens (real drug reviews), "
        f"{r['device']}, {r['threads']} thread(s); {len(r['seconds_per_step']['fp32'])} alternating pairs after a "
        f"warm-up. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; AVX-512 {m['avx512']}, "
        f"AVX512-BF16 {m['avx512_bf16']}, AMX {m['amx']}. Load average before {r['load_before']}, "
        f"after {r['load_after']}.", "",
        "| precision | median s/step | s/example |", "|---|---|---|",
    ]
    for name, med in r["median_s"].items():
        lines.append(f"| {name} | {med:.2f} | {med / r['batch']:.3f} |")
    s = r["speedup_bf16"]
    lines += ["", f"fp32 / bf16 step time: **{s['median']:.2f}×** (median of pairs; range {s['min']:.2f}–{s['max']:.2f}). "
              f"Per-sequence losses, bf16 against fp32 on the same weights: at most {r['max_rel_loss_diff']:.2%} apart. "
              f"`model.precision = \"auto\"` on this machine picks: {r['auto_picks']}."]
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
