"""DP-aware training defaults: batch size, steps and learning rate from public inputs only.

Under DP-SGD the noise on a step's mean gradient is σ·C/B, while every example's gradient
is clipped (on the default task per-example norms are ~4.6 against C = 1, so clipping is
normalisation and C only scales). What trains is the signal-to-noise ratio of the whole run,
~ B·√T/σ at a fixed number of example passes B·T: larger batches, hence fewer steps, win
until there are too few steps to optimise at all (Li et al., ICLR 2022; benchmarks/results/
dp_study.md). So when the user leaves ``train.batch_size`` (or ``train.learning_rate``) at 0,
a DP client picks:

- steps: ``MIN_STEPS`` in the run, spread over the rounds (at least 1 per round);
- batch size: the compute budget (``train.dp_compute`` × ``train.local_epochs`` passes per
  round over its N records) divided by those steps, at most N (then sample rate 1);
- learning rate: ``DP_LEARNING_RATE`` (the study's best at these batch sizes; Adam divides by
  the noise's scale, so it does not depend on C).

Inputs are ε, δ, N (the client's records, or people under the user unit), the rounds, the
compute budget and the model's name: no record's content, so choosing costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import calibrate_noise

MIN_STEPS = 4  # steps in a run below which Adam barely moves the adapter (study: 2 steps lose)
DP_LEARNING_RATE = 0.02  # study's best for AdamW on LoRA at B ≈ N/4–N/2 (benchmarks/results/dp_study.md)
NO_DP_BATCH, NO_DP_LEARNING_RATE = 16, 5e-3  # the non-DP defaults (no noise: small batches, more steps)
MAX_NOISE_PER_EXAMPLE = 0.5  # σ/B above this: the noise on one step's mean gradient is half a clipped
#                              gradient per coordinate or more: no step learns anything


@dataclass(frozen=True)
class TrainChoice:
    batch_size: int
    local_steps: int  # per round
    learning_rate: float
    noise_multiplier: float  # σ the choice implies (the plan calibrates it again, identically)
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def choose(epsilon: float, delta: float, records: int, rounds: int, passes_per_round: float,
           model: str, accountant: str = "rdp", steps_per_round: int = 0) -> TrainChoice:
    """The DP-aware batch size, steps per round and learning rate (pure: same inputs, same choice).

    ``passes_per_round``: the compute budget, example passes per round as a multiple of N;
    ``steps_per_round`` > 0: the user's steps (then only the batch is chosen)."""
    if records < 1 or rounds < 1 or not passes_per_round > 0:
        raise FedtuneError(f"no DP step can be planned for {records} records over {rounds} rounds at "
                           f"{passes_per_round:g} passes per round; give the client records and a compute budget")
    budget = passes_per_round * records * rounds  # example passes over the run
    steps = steps_per_round or max(1, math.ceil(MIN_STEPS / rounds))
    batch = min(records, int(budget // (steps * rounds)))
    if batch < 1:
        raise FedtuneError(
            f"a compute budget of {budget:g} example passes trains no batch of {steps * rounds} steps; "
            "raise train.dp_compute or train.local_epochs"
        )
    q = batch / records
    try:
        sigma = calibrate_noise(epsilon, delta, q, steps * rounds, accountant)
    except (ValueError, RuntimeError) as exc:  # Opacus gives up below some ε
        raise FedtuneError(f"ε={epsilon:g}, δ={delta:g} buys no noisy step at sample rate {q:.3g} ({exc}); "
                           "raise privacy.epsilon or privacy.delta") from None
    if sigma / batch > MAX_NOISE_PER_EXAMPLE:
        raise FedtuneError(
            f"at ε={epsilon:g}, δ={delta:g} with {records} records, every step's noise (σ/B = {sigma:.3g}/{batch}) "
            f"exceeds {MAX_NOISE_PER_EXAMPLE:g} of a clipped gradient: no step would learn; raise privacy.epsilon "
            "or pool more records per client"
        )
    why = (f"DP-aware defaults (fedtune.privacy.defaults) for {model}: ε={epsilon:g}, δ={delta:g}, N={records}, "
           f"{rounds} rounds, budget {budget:g} example passes -> {steps * rounds} steps of expected batch {batch} "
           f"(q={q:.3g}, σ={sigma:.3g}, noise per example σ/B={sigma / batch:.3g}), lr {DP_LEARNING_RATE:g}; "
           "set train.batch_size / train.local_steps / train.learning_rate to choose yourself")
    return TrainChoice(batch, steps, DP_LEARNING_RATE, sigma, why)


def resolve(cfg, records: int):
    """``cfg`` with the automatic train settings (0 = auto) made concrete for ``records``, and the
    DP choice made (None when nothing was automatic or DP is off)."""
    t, p = cfg.train, cfg.privacy
    if t.batch_size > 0 and t.learning_rate > 0:
        return cfg, None
    if not p.dp:
        return cfg.replace(train={"batch_size": t.batch_size or NO_DP_BATCH,
                                  "learning_rate": t.learning_rate or NO_DP_LEARNING_RATE}), None
    if t.batch_size > 0:  # the user's batch and steps; only the learning rate is ours
        choice = TrainChoice(t.batch_size, t.local_steps, DP_LEARNING_RATE, 0.0,  # σ: the plan calibrates it
                             f"DP-aware default learning rate {DP_LEARNING_RATE:g} (fedtune.privacy.defaults); "
                             "set train.learning_rate to choose yourself")
        return cfg.replace(train={"learning_rate": DP_LEARNING_RATE}), choice
    choice = choose(p.epsilon, p.delta, records, cfg.federation.rounds, t.local_epochs * t.dp_compute,
                    cfg.model.name, p.accountant, t.local_steps)
    lr = t.learning_rate or choice.learning_rate
    return cfg.replace(train={"batch_size": choice.batch_size, "local_steps": choice.local_steps,
                              "learning_rate": lr}), choice


def announce_choice(cfg, sizes: dict[str, tuple[int, int]]) -> str:
    """One line for the console: the first client's automatic choice (records unit; others alike)."""
    if not sizes or cfg.privacy.unit != "record":
        return ""
    name, (records, _) = next(iter(sizes.items()))
    _, choice = resolve(cfg, records)
    return f"{name}: {choice.why}" if choice is not None else ""
