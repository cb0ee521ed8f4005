"""The privacy plan of one client and the rule that enforces its budget.

The plan is fixed before the first round and written to the ledger: σ is calibrated
once, for every step the client could take in the run (all rounds), so joining every
round still lands within the target ε. Each round, training starts only if the ledger's
history plus this round's steps stays within the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import calibrate_noise, epsilon
from fedtune.privacy.defaults import resolve


def steps_per_round(cfg, dataset_size: int) -> int:
    if cfg.train.local_steps > 0:
        return cfg.train.local_steps
    return max(1, round(cfg.train.local_epochs * dataset_size / cfg.train.batch_size))


@dataclass(frozen=True)
class Plan:
    dp: bool
    noise_multiplier: float  # σ (0 without DP)
    sample_rate: float  # q: each record (each person, user unit) joins a step's batch with this probability
    steps_per_round: int
    planned_rounds: int
    clip_norm: float
    delta: float
    accountant: str
    target_epsilon: float
    budget: float
    dataset_size: int
    calibrated: bool  # σ derived from target_epsilon (not set by hand)
    seeded: bool  # DP randomness seeded for a test: the guarantee does NOT hold
    privacy_unit: str = "record"  # record | user (then dataset_size counts people, q samples people)
    records_per_user: int = 0  # user unit: records of a sampled person per step, at most (0 = record unit)

    @classmethod
    def from_entry(cls, entry: dict) -> Plan:
        optional = ("privacy_unit", "records_per_user")  # absent from ledgers written before the user unit
        return cls(**{k: entry[k] for k in cls.__dataclass_fields__ if k in entry or k not in optional})

    def to_entry(self) -> dict:
        return {"type": "plan", **asdict(self)}

    @property
    def round_history(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def make_plan(cfg, dataset_size: int) -> Plan:
    """``dataset_size``: the client's records, or its people under the user unit (user_level.dataset_units).
    Automatic train settings (0) are made concrete first (fedtune.privacy.defaults)."""
    cfg = resolve(cfg, dataset_size)[0]
    p = cfg.privacy
    q = min(1.0, cfg.train.batch_size / dataset_size)
    k = steps_per_round(cfg, dataset_size)
    rounds = cfg.federation.rounds
    if not p.dp:
        sigma = 0.0
    elif p.noise_multiplier > 0:
        sigma = p.noise_multiplier
    else:
        sigma = calibrate_noise(p.epsilon, p.delta, q, k * rounds, p.accountant)
    return Plan(
        dp=p.dp, noise_multiplier=sigma, sample_rate=q, steps_per_round=k, planned_rounds=rounds,
        clip_norm=p.clip_norm if p.dp else 0.0, delta=p.delta, accountant=p.accountant,
        target_epsilon=p.epsilon if p.dp else math.inf, budget=cfg.budget if p.dp else math.inf,
        dataset_size=dataset_size, calibrated=p.dp and p.noise_multiplier <= 0, seeded=p.dp and p.seed >= 0,
        privacy_unit=p.unit, records_per_user=p.records_per_user if p.unit == "user" else 0,
    )


def check_affordable(plan: Plan, who: str, setting: str) -> None:
    """FedtuneError if the budget cannot pay for one step, or for one round, of ``plan``."""
    if not plan.dp:
        return
    one_step = epsilon([(plan.noise_multiplier, plan.sample_rate, 1)], plan.delta, plan.accountant)
    if one_step > plan.budget:
        raise FedtuneError(
            f"{setting}={plan.budget:g} is below what one step costs {who} (ε={one_step:.3g} at "
            f"σ={plan.noise_multiplier:.3g}, q={plan.sample_rate:.3g}); raise the budget"
        )
    one_round = epsilon([plan.round_history], plan.delta, plan.accountant)
    if one_round > plan.budget:
        raise FedtuneError(
            f"{setting}={plan.budget:g} pays for no whole round of {who} (one round costs ε={one_round:.3g}); "
            "raise the budget or lower train.local_epochs"
        )


@dataclass(frozen=True)
class RoundDecision:
    train: bool
    epsilon_before: float
    epsilon_after: float  # ε if this round is trained
    reason: str = ""


def check_round(history: list[tuple[float, float, int]], plan: Plan, step: tuple[float, float, int] | None = None,
                what: str = "this round", fix: str = "") -> RoundDecision:
    """The budget rule: whether ``step`` (default: one round of the plan) fits the budget.

    Used by the client (each round), the server (client-level DP, distributed DP) and
    personalization; ``what`` and ``fix`` only word the reason."""
    if not plan.dp:
        return RoundDecision(True, math.inf, math.inf)
    before = epsilon(history, plan.delta, plan.accountant)
    after = epsilon(list(history) + [step or plan.round_history], plan.delta, plan.accountant)
    if after > plan.budget:
        return RoundDecision(
            False, before, after,
            f"privacy budget: {what} would raise ε from {before:.3f} to {after:.3f} "
            f"(δ={plan.delta:g}), above the budget of {plan.budget:g}{fix}",
        )
    return RoundDecision(True, before, after)
