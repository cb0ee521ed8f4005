"""DP-SGD correctness: per-sample gradients, clipping, noise, empty Poisson batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedtune.data import client_data, collate, tokenize
from fedtune.privacy import make_plan
from fedtune.train import DPParams, forward_logits, per_sequence_loss, privatize, train_round

CPU = torch.device("cpu")


def _batch(cfg, tok, n=8):
    data = tokenize(client_data(cfg, 0)[0].select(range(n)), tok, cfg.model.max_length)
    assert len({len(x) for x in data.ids}) > 1, "want sequences of different lengths (padding)"
    return data, collate(data, list(range(n)), tok.pad_token_id)


def _reference_grads(model, data, tok, amp=None):
    """Per-example gradients from separate backward passes, each example alone and unpadded."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        one = collate(data, [i], tok.pad_token_id)
        per_sequence_loss(forward_logits(model, one, CPU, amp), one["labels"]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_dp_step_equals_clipped_per_example_reference(tiny_lora):
    cfg, tok, model = tiny_lora
    data, batch = _batch(cfg, tok)
    ref = _reference_grads(model, data, tok)
    norms = ref.norm(dim=1)
    clip = float(norms.median())  # half the examples get clipped
    assert (norms > clip).sum() >= 3, "clipping must be active"
    expected_update = (ref * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / len(data)

    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params]).clone()
    net, opt = privatize(model, torch.optim.SGD(params, lr=1.0),
                         DPParams(noise_multiplier=0.0, clip_norm=clip, sample_rate=0.5, expected_batch_size=len(data)))
    opt.zero_grad(set_to_none=True)
    per_sequence_loss(forward_logits(net, batch, CPU, None), batch["labels"]).mean().backward()
    per_sample = torch.cat([p.grad_sample.reshape(len(data), -1) for p in params], dim=1)
    assert _rel(per_sample, ref) < 1e-4  # Opacus' per-sample gradients are the per-example ones
    opt.step()
    net._close()
    update = before - torch.cat([p.detach().flatten() for p in params])
    assert _rel(update, expected_update) < 1e-4


def test_bf16_autocast_keeps_per_sample_gradients_in_fp32(tiny_lora):
    """Under bf16 autocast the LoRA math stays fp32, so clipping norms are exact."""
    cfg, tok, model = tiny_lora
    data, batch = _batch(cfg, tok)
    ref = _reference_grads(model, data, tok, amp=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    net, opt = privatize(model, torch.optim.SGD(params, lr=1.0),
                         DPParams(noise_multiplier=0.0, clip_norm=1e-3, sample_rate=0.5, expected_batch_size=len(data)))
    opt.zero_grad(set_to_none=True)
    per_sequence_loss(forward_logits(net, batch, CPU, torch.bfloat16), batch["labels"]).mean().backward()
    assert all(p.grad_sample.dtype == torch.float32 for p in params)
    per_sample = torch.cat([p.grad_sample.reshape(len(data), -1) for p in params], dim=1)
    assert _rel(per_sample, ref) < 2e-2  # bf16 base-model activations: close, not bit-equal
    opt.step()
    net._close()


def test_noise_has_the_calibrated_standard_deviation(tiny_lora):
    cfg, tok, model = tiny_lora
    plan = make_plan(cfg, dataset_size=200)
    assert plan.noise_multiplier > 0.3
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params]).clone()
    expected_batch = cfg.train.batch_size
    net, opt = privatize(model, torch.optim.SGD(params, lr=1.0),
                         DPParams(plan.noise_multiplier, plan.clip_norm, plan.sample_rate, expected_batch),
                         noise_generator=torch.Generator().manual_seed(3))
    # A batch whose loss has no labelled token: zero gradient, so the update is the noise alone.
    ids = torch.full((2, 4), tok.pad_token_id)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    opt.zero_grad(set_to_none=True)
    per_sequence_loss(forward_logits(net, batch, CPU, None), batch["labels"]).mean().backward()
    opt.step()
    net._close()
    noise = before - torch.cat([p.detach().flatten() for p in params])
    want = plan.noise_multiplier * plan.clip_norm / expected_batch
    assert noise.numel() > 3000
    assert abs(float(noise.std()) / want - 1) < 0.06  # ~5 standard errors at this many values
    assert abs(float(noise.mean())) < 4 * want / math.sqrt(noise.numel())


@pytest.mark.parametrize("dp", [True, False])
def test_train_round_counts_every_step_even_empty_poisson_batches(tiny_lora, dp):
    cfg, tok, model = tiny_lora
    data = tokenize(client_data(cfg, 0)[0].select(range(20)), tok, cfg.model.max_length)
    start = copy.deepcopy({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    params = DPParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=1e-4, expected_batch_size=1) if dp else None
    stats = train_round(model, data, steps=4, batch_size=4, learning_rate=1e-2, weight_decay=0.0, dp=params,
                        device=CPU, amp_dtype=None, pad_id=tok.pad_token_id,
                        sampling_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(1))
    assert stats.steps == 4
    if dp:  # q = 1e-4 over 20 records: every batch is empty, and each step is still a noisy update
        assert stats.empty_steps == 4 and stats.examples == 0
    else:
        assert stats.examples == 16
    moved = [not torch.equal(start[n], p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(moved) if dp else any(moved)
    assert not any(len(m._forward_hooks) for m in model.modules())  # Opacus hooks removed after the round


def test_physical_batch_splitting_gives_the_same_update(tiny_lora):
    """Splitting a Poisson batch into physical chunks must not change the DP step."""
    cfg, tok, model = tiny_lora
    data = tokenize(client_data(cfg, 0)[0].select(range(12)), tok, cfg.model.max_length)
    results = []
    for chunk in (0, 3):
        m = copy.deepcopy(model)
        train_round(m, data, steps=2, batch_size=6, learning_rate=1e-2, weight_decay=0.0,
                    dp=DPParams(noise_multiplier=0.5, clip_norm=0.1, sample_rate=0.5, expected_batch_size=6),
                    device=CPU, amp_dtype=None, pad_id=tok.pad_token_id,
                    sampling_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(1),
                    physical_batch_size=chunk)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad]))
    assert _rel(results[1], results[0]) < 1e-5
