"""Bounded training memory: the physical batch a client can afford, from a memory budget.

A DP-SGD step's memory grows with the examples in its batch (activations, logits and
Opacus' per-sample gradients), and a Poisson batch of a large logical size can outgrow a
machine. Each logical batch is therefore split into physical batches whose gradients are
accumulated before the one noisy step (fedtune.train; Opacus' own BatchMemoryManager
does the same), so any logical batch size trains and the update is the same.

``train.physical_batch_size`` > 0 fixes the split; 0 chooses it here, from
``train.memory_budget_mb`` (0 = this client's share of the machine: the accelerator's
memory, or the host's RAM divided among the clients that run at once) and a deliberately
conservative per-example estimate from the model's shape. A batch that fits is not split,
so small models and batches train exactly as before.
"""

from __future__ import annotations

import os

MB = 2**20
HOST_SHARE = 0.75  # of the machine's RAM for the clients; the rest: OS, Ray, server, page cache
OVERHEAD_MB = 700.0  # Python, torch, tokenizer, Opacus, optimizer state: beyond the weights


def per_example_mb(model_config, seq_len: int) -> float:
    """Training memory one example of ``seq_len`` tokens costs, in MB (fp32, over-estimated).

    Per layer: ~10 hidden-size and ~4 intermediate-size activations per token kept for the
    backward pass, plus ~3 attention maps per head; the logits over the vocabulary in 4
    copies (logits, fp32 cast, log-softmax, gradient). Calibrated against bench_step.py
    (SmolLM2-135M: ~225 MB measured per example at 128 tokens; this gives ~330)."""
    c = model_config
    layers, hidden = c.num_hidden_layers, c.hidden_size
    inter = getattr(c, "intermediate_size", 4 * hidden)
    heads = c.num_attention_heads
    per_token = layers * (10 * hidden + 4 * inter + 3 * heads * seq_len) + 4 * c.vocab_size
    return per_token * seq_len * 4 / MB


def parallel_clients(num_clients: int) -> int:
    """Clients that train at once on this machine: in simulation Ray gives each client
    OMP_NUM_THREADS cores of the machine; a deployed client has the machine to itself."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads <= 0:
        return 1
    return max(1, min(num_clients, (os.cpu_count() or 1) // threads))


def budget_mb(configured: int, device, num_clients: int) -> float:
    """The client's memory budget: ``train.memory_budget_mb`` or its share of the machine."""
    if configured > 0:
        return float(configured)
    parallel = parallel_clients(num_clients)
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory * 0.9 / MB / parallel
    import psutil

    return psutil.virtual_memory().total * HOST_SHARE / MB / parallel


def physical_batch(model, cfg, device) -> int:
    """Examples per forward/backward pass: ``train.physical_batch_size``, or as many as the
    budget holds beside the model (at least 1)."""
    if cfg.train.physical_batch_size > 0:
        return cfg.train.physical_batch_size
    budget = budget_mb(cfg.train.memory_budget_mb, device, cfg.num_clients)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    per_example = per_example_mb(model.config, cfg.model.max_length)
    fits = int((budget - weights - OVERHEAD_MB) // per_example)
    return max(1, fits)
