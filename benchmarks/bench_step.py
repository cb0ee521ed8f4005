"""Cost of DP on a client's local step: LoRA without DP vs LoRA with DP-SGD (Opacus).

Speed is measured side by side in one process, alternating one step of each on the same
batches, so machine noise hits both alike; the DP/no-DP ratio is taken per pair. Peak
memory is measured in a fresh process per mode (RSS on the CPU, allocator peak on CUDA).

    python benchmarks/bench_step.py                 # default model, writes benchmarks/results/step.{json,md}
    python benchmarks/bench_step.py --model tiny-random-llama --pairs 3 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune import config as config_mod  # noqa: E402
from fedtune.data import client_data, collate, tokenize  # noqa: E402
from fedtune.model import (  # noqa: E402
    add_lora, load_base_model, load_tokenizer, resolve_device, resolve_model, resolve_precision,
)
from fedtune.privacy import make_plan  # noqa: E402
from fedtune.train import DPParams, forward_logits, per_sequence_loss, privatize  # noqa: E402

MODES = ("lora", "lora+dp")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def setup(cfg, threads: int):
    torch.set_num_threads(threads)
    device = resolve_device(cfg.model.device)
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    train, _ = client_data(cfg, 0)
    data = tokenize(train, tok, cfg.model.max_length)
    b = cfg.train.batch_size
    batches = [collate(data, list(range(i * b, (i + 1) * b)), tok.pad_token_id) for i in range(len(data) // b)]
    return device, resolve_precision(cfg.model.precision, device), path, tok, data, batches


def make_step(mode: str, cfg, path, device, amp, data):
    """A function doing one optimizer step on a batch, for ``mode``."""
    model = add_lora(load_base_model(path, device), cfg, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    net = model
    if mode == "lora+dp":
        plan = make_plan(cfg, len(data))
        net, opt = privatize(model, opt, DPParams(plan.noise_multiplier, plan.clip_norm, plan.sample_rate,
                                                  cfg.train.batch_size), torch.Generator(device=device).manual_seed(0))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        per_sequence_loss(forward_logits(net, batch, device, amp), batch["labels"].to(device)).mean().backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def memory_of(mode: str, args) -> dict:
    """Peak memory of ``mode`` in a fresh process (this script with --memory MODE)."""
    cmd = [sys.executable, __file__, "--memory", mode, "--model", args.model, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_memory(mode: str, cfg, threads: int) -> dict:
    """RSS sampled every 5 ms while stepping (getrusage's high-water mark is inherited
    from the parent process across fork, so it cannot be used here)."""
    device, amp, path, tok, data, batches = setup(cfg, threads)
    step = make_step(mode, cfg, path, device, amp, data)
    me = psutil.Process()
    rss_loaded = me.memory_info().rss / 2**20
    peak = [rss_loaded]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], me.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in batches[:3]:
        step(batch)
    done.set()
    sampler.join()
    out = {"peak_rss_mb": round(peak[0], 1), "model_loaded_rss_mb": round(rss_loaded, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measure_bounded(cfg, threads: int, batch: int, budget: int) -> dict:
    """Peak RSS of one DP-SGD step of logical ``batch`` with the physical batch fedtune picks
    for a memory budget (``budget`` MB; 0 = a client's share of this machine with two clients
    at a time, as a default simulation on two cores runs them)."""
    from fedtune.memory import physical_batch
    from fedtune.train import train_round

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    cfg = cfg.replace(train={"batch_size": batch, "memory_budget_mb": budget})
    device, amp, path, tok, data, _ = setup(cfg, threads)
    model = add_lora(load_base_model(path, device), cfg, seed=0)
    physical = physical_batch(model, cfg, device)
    me = psutil.Process()
    peak, done = [me.memory_info().rss / 2**20], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], me.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    plan = make_plan(cfg, len(data))
    # sample rate batch/N: a Poisson batch of about ``batch`` examples, split into physical ones
    stats = train_round(model, data, steps=1, batch_size=batch, learning_rate=cfg.train.learning_rate, weight_decay=0.0,
                        dp=DPParams(plan.noise_multiplier, plan.clip_norm, batch / len(data), batch), device=device,
                        amp_dtype=amp, pad_id=tok.pad_token_id, sampling_generator=torch.Generator().manual_seed(0),
                        noise_generator=torch.Generator(device=device).manual_seed(1), physical_batch_size=physical)
    done.set()
    sampler.join()
    return {"logical_batch": batch, "examples_drawn": stats.examples, "physical_batch": physical,
            "memory_budget_mb": budget or "auto (2 clients at a time)", "peak_rss_mb": round(peak[0], 1),
            "seconds": round(stats.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=config_mod.Config().model.name)
    ap.add_argument("--pairs", type=int, default=12, help="timed step pairs (after one warm-up pair)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = a default simulated client's share)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--memory", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--bounded", type=int, nargs=2, metavar=("BATCH", "BUDGET_MB"),
                    help="only: peak memory of one DP step of logical BATCH under a memory budget (0 = auto); "
                         "writes step_bounded_BATCH_BUDGET.json")
    args = ap.parse_args()
    # a step of batch 16 at lr 0.005 (the non-DP defaults; under DP the default batch is automatic)
    cfg = config_mod.load(ROOT / "simulations" / "default.toml", {"model.name": args.model, "train.batch_size": 16,
                                                                  "train.learning_rate": 0.005})
    if args.memory:
        print(json.dumps(measure_memory(args.memory, cfg, args.threads)))
        return
    if args.bounded:
        result = {"model": args.model, "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
                  f"{psutil.virtual_memory().total / 2**30:.1f} GiB, torch {torch.__version__}",
                  **measure_bounded(cfg, args.threads, *args.bounded)}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"step_bounded_{args.bounded[0]}_{args.bounded[1]}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return

    device, amp, path, tok, data, batches = setup(cfg, args.threads)
    steps = {mode: make_step(mode, cfg, path, device, amp, data) for mode in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: list[int] = []
    for i in range(args.pairs + 1):
        batch = batches[i % len(batches)]
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):  # alternate the order within pairs
            t0 = time.perf_counter()
            steps[mode](batch)
            if i > 0:  # pair 0 is warm-up
                times[mode].append(time.perf_counter() - t0)
        if i > 0:
            tokens.append(int(batch["attention_mask"].sum()))
        print(f"pair {i}/{args.pairs}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES if times[m]), flush=True)
    ratios = [d / n for n, d in zip(times["lora"], times["lora+dp"])]
    memory = {m: memory_of(m, args) for m in MODES}
    result = {
        "model": args.model, "device": str(device), "precision": {None: "fp32", torch.bfloat16: "bf16"}[amp], "threads": args.threads,
        "batch_size": cfg.train.batch_size, "max_length": cfg.model.max_length, "pairs": args.pairs,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "modes": {m: {"median_step_s": statistics.median(times[m]),
                      "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times[m])),
                      **memory[m]} for m in MODES},
        "dp_over_nodp_time_ratio": statistics.median(ratios),
        "dp_over_nodp_time_ratio_range": [min(ratios), max(ratios)],
        "target_ratio": 1.10,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {m} | {v['median_step_s']:.2f} | {v['tokens_per_s']:.0f} | {v['peak_rss_mb']:.0f} |" for m, v in result["modes"].items()
    )
    (out / "step.md").write_text(
        f"# Local step: LoRA vs LoRA + DP-SGD\n\n{args.model}, batch {cfg.train.batch_size} × ≤{cfg.model.max_length} "
        f"tokens (real drug reviews), {result['device']}, {result['precision']}, {args.threads} thread(s); "
        f"{args.pairs} alternating pairs after a warm-up. Machine: {result['machine']}.\n\n"
        f"| mode | median s/step | tokens/s | peak RSS MB |\n|---|---|---|---|\n{rows}\n\n"
        f"DP / no-DP step time: **{result['dp_over_nodp_time_ratio']:.3f}×** (median of pairs; range "
        f"{min(ratios):.3f}–{max(ratios):.3f}; target ≤ 1.10×).\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
