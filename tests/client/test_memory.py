"""Bounded training memory: the physical batch comes from a memory budget, a batch that
fits is never split (seeded runs stay bit-exact), and a split batch gives the same update
with and without DP."""

from __future__ import annotations

import copy

import pytest
import torch

from fedtune.data import client_data, tokenize
from fedtune.memory import budget_mb, parallel_clients, per_example_mb, physical_batch
from fedtune.train import DPParams, train_round
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_the_estimate_is_above_what_the_step_benchmark_measured():
    """SmolLM2-135M's shape; bench_step.py measured (4601 - ~1000) MB / 16 ≈ 225 MB an example."""
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                          vocab_size=49152)
    mb = per_example_mb(smollm2, 128)
    assert 225 < mb < 2 * 225
    assert per_example_mb(smollm2, 256) > 2 * mb  # attention maps grow with the square of the length


def test_the_machine_is_shared_by_the_clients_that_run_at_once(monkeypatch):
    import psutil

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what Ray sets for a simulated client of 4 cores
    assert parallel_clients(num_clients=10) == 4 and parallel_clients(num_clients=2) == 2
    assert budget_mb(0, CPU, 10) == pytest.approx(psutil.virtual_memory().total * 0.75 / 2**20 / 4)
    assert budget_mb(3000, CPU, 10) == 3000.0  # the user's budget wins
    monkeypatch.delenv("OMP_NUM_THREADS")  # a deployed client: the machine is its own
    assert parallel_clients(num_clients=10) == 1


def test_a_budget_chooses_the_physical_batch(tiny_lora):
    cfg, _, model = tiny_lora
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    each = per_example_mb(model.config, cfg.model.max_length)
    fixed = cfg.replace(train={"physical_batch_size": 5})
    assert physical_batch(model, fixed, CPU) == 5
    budget = int(weights + 700 + 3.5 * each) + 1
    assert physical_batch(model, cfg.replace(train={"memory_budget_mb": budget}), CPU) == 3
    assert physical_batch(model, cfg.replace(train={"memory_budget_mb": 1}), CPU) == 1  # never 0
    # The tiny config on this machine fits whole batches: seeded runs are not split, so stay bit-exact.
    assert physical_batch(model, tiny_config(), CPU) >= 8 * tiny_config().train.batch_size


@pytest.mark.parametrize("dp", [None, DPParams(noise_multiplier=0.5, clip_norm=0.1, sample_rate=0.5, expected_batch_size=6)])
def test_a_split_batch_gives_the_same_update(tiny_lora, dp):
    """Physical batches accumulate into one step: with DP (Opacus' skip-step accumulation)
    and without (each piece weighs its share), not one optimizer step per piece."""
    cfg, tok, model = tiny_lora
    data = tokenize(client_data(cfg, 0)[0].select(range(12)), tok, cfg.model.max_length)
    results = []
    for chunk in (0, 2):
        m = copy.deepcopy(model)
        train_round(m, data, steps=2, batch_size=6, learning_rate=1e-2, weight_decay=0.0, dp=dp, device=CPU,
                    amp_dtype=None, pad_id=tok.pad_token_id, sampling_generator=torch.Generator().manual_seed(0),
                    noise_generator=torch.Generator().manual_seed(1), physical_batch_size=chunk)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad]))
    assert ((results[1] - results[0]).norm() / results[0].norm()).item() < 1e-5


def test_physical_batches_group_similar_lengths(tiny_lora):
    """Each physical batch pads to its longest example: the step's examples go into
    batches by length (the same examples, once each), so short ones do not pad to long."""
    from fedtune.train import _record_pieces

    cfg, tok, _ = tiny_lora
    data = tokenize(client_data(cfg, 0)[0].select(range(12)), tok, cfg.model.max_length)
    indices = list(range(12))
    pieces, _ = _record_pieces(indices, 2, data)
    assert sorted(i for p in pieces for i in p) == indices
    lengths = [[len(data.ids[i]) for i in p] for p in pieces]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))
    padded = sum(len(p) * max(ls) for p, ls in zip(pieces, lengths))
    unsorted = sum(2 * max(len(data.ids[i]) for i in indices[k:k + 2]) for k in range(0, 12, 2))
    assert padded < unsorted  # the two shorter records share a batch
