"""Client-level DP: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

Each round every client joins independently with probability q (Poisson sampling,
which the accountant credits). A client clips its whole update (adapter minus the
global adapter) to L2 norm C; the server checks the bound, sums the updates, adds
Gaussian noise N(0, (σC)²) to every coordinate of the sum and divides by the expected
number of clients qN (a fixed denominator, so one client changes the average by at
most C/(qN)). All clients weigh the same. One round is one release of the
Poisson-subsampled Gaussian mechanism; rounds compose in the same accountant as DP-SGD.
"""

from __future__ import annotations

import math
import random
import secrets

import numpy as np

from fedtune.privacy.accounting import calibrate_noise
from fedtune.privacy.budget import Plan

UNIT = "one client (all of its data); neighbouring federations differ by adding or removing one client"
COVERS = "every global adapter the server releases (each round's model), whatever the clients' updates"
NOT_COVERED = "the clients' updates as the server receives them (the server is trusted to add the noise)"


def make_server_plan(cfg) -> Plan:
    """σ calibrated once for every round of the run (one release per round)."""
    c = cfg.client_dp
    rounds = cfg.federation.rounds
    sigma = c.noise_multiplier or calibrate_noise(c.epsilon, c.delta, c.sample_rate, rounds, c.accountant)
    return Plan(
        dp=True, noise_multiplier=sigma, sample_rate=c.sample_rate, steps_per_round=1, planned_rounds=rounds,
        clip_norm=c.clip_norm, delta=c.delta, accountant=c.accountant, target_epsilon=c.epsilon,
        budget=cfg.client_budget, dataset_size=cfg.num_clients, calibrated=c.noise_multiplier <= 0,
        seeded=cfg.privacy.seed >= 0,
    )


def update_norm(new: dict, old: dict) -> float:
    """L2 norm of ``new - old`` over every tensor (flat)."""
    return math.sqrt(sum(float(((np.asarray(new[k], np.float64) - np.asarray(old[k], np.float64)) ** 2).sum()) for k in old))


def clip_update(new: dict, old: dict, clip_norm: float) -> dict:
    """``old + (new - old)`` scaled down to norm ``clip_norm`` if it is longer (torch tensors)."""
    norm = update_norm({k: v.numpy() for k, v in new.items()}, {k: v.numpy() for k, v in old.items()})
    if norm <= clip_norm:
        return new
    scale = clip_norm / norm
    return {k: old[k] + (new[k] - old[k]) * scale for k in old}


class Sampler:
    """Poisson client sampling and Gaussian noise for the server.

    OS entropy by default (``secrets``); a seed (tests only) makes both reproducible.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.choice = random.Random(seed) if seed is not None else secrets.SystemRandom()
        self.noise = np.random.default_rng(seed if seed is not None else secrets.randbits(128))

    def sample(self, nodes: list[int], rate: float) -> list[int]:
        return [n for n in sorted(nodes) if self.choice.random() < rate]

    def noisy_average(self, deltas: list[dict[str, np.ndarray]], shapes: dict[str, tuple[int, ...]],
                      plan: Plan, expected_clients: float) -> dict[str, np.ndarray]:
        """(Σ deltas + N(0, (σC)²)) / (q·N), per tensor, in float64 then float32."""
        std = plan.noise_multiplier * plan.clip_norm
        out = {}
        for key, shape in shapes.items():
            total = np.zeros(shape, np.float64)
            for d in deltas:
                total += d[key]
            total += self.noise.normal(0.0, std, size=shape)
            out[key] = (total / expected_clients).astype(np.float32)
        return out
