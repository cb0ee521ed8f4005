"""One client's local training round (DP-SGD with Opacus, or plain) and evaluation.

Read top to bottom: the loss, the round, the held-out evaluation.

DP-SGD here is Opacus' own parts, assembled by hand instead of ``make_private`` so the
batches stay ours: Poisson sampling (``UniformWithReplacementSampler``), per-sample
gradients (``GradSampleModule``, hooks), clipping and Gaussian noise (``DPOptimizer``).
Only the LoRA parameters are trainable, so only they get per-sample gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.data import TokenizedData, collate
from fedtune.model import autocast
from fedtune.privacy import user_level


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its own labelled tokens.

    Not the model's ``labels=`` loss: that averages over all tokens of the batch, which
    couples examples and makes Opacus' per-sample gradients wrong. Padding and prompt
    tokens carry label -100 and count for nothing.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = (labels != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def forward_logits(model, batch: dict[str, torch.Tensor], device, amp_dtype) -> torch.Tensor:
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    # Explicit, contiguous position ids: each row is its own sequence (Opacus needs batch-shaped inputs).
    position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0).repeat(input_ids.shape[0], 1)
    with autocast(device, amp_dtype):
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


@dataclass(frozen=True)
class DPParams:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    expected_batch_size: int
    records_per_user: int = 0  # > 0: one person is the unit (fedtune.privacy.user_level)


@dataclass
class RoundStats:
    loss: float  # mean per-sequence training loss (nan if no example was drawn)
    steps: int
    examples: int  # examples drawn over all steps
    empty_steps: int  # Poisson steps that drew no example (noise-only steps)
    seconds: float


def privatize(model, optimizer: torch.optim.Optimizer, dp: DPParams, noise_generator=None):
    """Opacus around ``model`` (per-sample gradients, hooks) and ``optimizer`` (clip each
    example's gradient to ``clip_norm``, add N(0, (σ·C)²) to the sum, divide by the
    expected batch size). Returns the wrapped pair."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
        expected_batch_size=dp.expected_batch_size, loss_reduction="mean", generator=noise_generator,
    )
    return net, optimizer


def _dummy_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A one-row batch with no labelled token: stands in for an empty Poisson batch."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}


def _batches(data: TokenizedData, steps: int, batch_size: int, dp: DPParams | None, generator: torch.Generator):
    """Index lists, one per step: Poisson-sampled under DP, else shuffled fixed-size."""
    n = len(data)
    if dp is not None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        yield from UniformWithReplacementSampler(
            num_samples=n, sample_rate=dp.sample_rate, generator=generator, steps=steps
        )
        return
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def _record_pieces(indices, physical_batch_size: int, data: TokenizedData) -> tuple[list[list[int]], None]:
    """The step's examples in physical batches of similar length (each pads to its longest);
    the step's update is their sum, so the split changes nothing but the padding."""
    indices = sorted((int(i) for i in indices), key=lambda i: len(data.ids[i]))
    chunk = physical_batch_size or max(1, len(indices))
    return [indices[i:i + chunk] for i in range(0, len(indices), chunk)] or [[]], None


def train_round(
    model, data: TokenizedData, *, steps: int, batch_size: int, learning_rate: float, weight_decay: float,
    dp: DPParams | None, device: torch.device, amp_dtype, pad_id: int,
    sampling_generator: torch.Generator, noise_generator: torch.Generator | None = None,
    physical_batch_size: int = 0, on_step=None,
) -> RoundStats:
    """``steps`` optimizer steps on ``model``'s trainable (LoRA) parameters, in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    net = model
    if dp is not None:
        net, optimizer = privatize(model, optimizer, dp, noise_generator)
    people = None
    if dp is not None and dp.records_per_user > 0:  # user-level DP: steps of people, not records
        people = user_level.person_sampler(data, dp.records_per_user, dp.sample_rate)
    model.train()
    t0 = time.perf_counter()
    loss_sum, examples, empty = 0.0, 0, 0
    try:
        batches = (_batches(data, steps, batch_size, dp, sampling_generator) if people is None
                   else people.steps(steps, sampling_generator))
        for step, indices in enumerate(batches):
            pieces, sizes = (_record_pieces(indices, physical_batch_size, data) if people is None
                             else people.pieces(indices, physical_batch_size))
            if not pieces[0]:
                empty += 1
            for j, piece in enumerate(pieces):
                last = j == len(pieces) - 1
                if dp is not None:  # accumulate clipped per-sample grads; noise + update on the last piece
                    optimizer.signal_skip_step(do_skip=not last)
                if dp is not None or j == 0:  # without DP the pieces' gradients add up in .grad
                    optimizer.zero_grad(set_to_none=True)
                batch = collate(data, piece, pad_id) if piece else _dummy_batch(pad_id)
                seq_loss = per_sequence_loss(forward_logits(net, batch, device, amp_dtype), batch["labels"].to(device))
                # An empty Poisson batch still takes a (pure-noise) step, as the accountant assumes. Without
                # DP each piece weighs its share of the batch (1.0 when unsplit: the same step as before).
                loss = seq_loss.mean() * ((1.0 if piece else 0.0) if dp is not None else len(piece) / len(indices))
                loss.backward()
                if sizes is not None:  # one row per person: the mean of its records' gradients
                    user_level.combine_per_person(optimizer.params, sizes[j])
                if dp is not None or last:
                    optimizer.step()
                if piece:
                    loss_sum += float(seq_loss.detach().sum())
                    examples += len(piece)
            if on_step is not None:
                on_step(step + 1, steps)
    finally:
        if dp is not None:
            net._close()  # remove Opacus' hooks and attributes: the cached model is reused
        optimizer.zero_grad(set_to_none=True)
    return RoundStats(
        loss=loss_sum / examples if examples else math.nan, steps=steps, examples=examples,
        empty_steps=empty, seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def completion_nll(model, data: TokenizedData, *, batch_size: int, device, amp_dtype, pad_id: int) -> tuple[list[float], list[int]]:
    """Per example, in ``data``'s order: (summed next-token loss, predicted tokens) of its completion."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))  # similar lengths pad less
    nll, tokens = [0.0] * len(data), [0] * len(data)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate(data, rows, pad_id)
        logits = forward_logits(model, batch, device, amp_dtype)[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                     ignore_index=-100, reduction="none").view(labels.shape)
        for i, loss, count in zip(rows, token_loss.sum(1).tolist(), (labels != -100).sum(1).tolist()):
            nll[i], tokens[i] = loss, count
    return nll, tokens


def evaluate(model, data: TokenizedData, *, batch_size: int, device, amp_dtype, pad_id: int) -> tuple[float, int]:
    """(summed next-token loss, number of predicted tokens) over ``data``'s completions."""
    nll, tokens = completion_nll(model, data, batch_size=batch_size, device=device, amp_dtype=amp_dtype, pad_id=pad_id)
    return math.fsum(nll), sum(tokens)


def label_accuracy(model, choices: TokenizedData, truth: list[int], *, batch_size: int, device, amp_dtype,
                   pad_id: int) -> float:
    """Share of records whose true label makes the completion most likely (``choices`` holds
    each record once per label, record-major)."""
    nll, _ = completion_nll(model, choices, batch_size=batch_size, device=device, amp_dtype=amp_dtype, pad_id=pad_id)
    k = len(nll) // max(len(truth), 1)
    hits = sum(min(range(k), key=lambda j: nll[i * k + j]) == t for i, t in enumerate(truth))
    return hits / len(truth) if truth else math.nan
