"""Distributed DP: client-level DP when the server is trusted with neither updates nor noise.

With client-level DP and secure aggregation both on, every client of a round
(Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021 — "DDG"):

1. clips its update to L2 norm C and scales it to integer units of size γ,
2. rounds it to integers by conditional randomized rounding (redrawn until the
   integer vector's norm is at most Δ2, the bound of DDG Thm 2 / Google's
   ``rounded_l2_norm_bound``),
3. adds discrete Gaussian noise N_Z(0, σ²) to every coordinate (Canonne, Kamath,
   Steinke 2020, Algorithm 3; randomness from a fresh OS seed through ChaCha20),
4. and only then masks the vector for SecAgg+.

The server unmasks Σ_i (x_i + z_i): the sum of n clients' noise, close to a discrete
Gaussian of variance nσ². DDG Proposition 14 bounds one release's Rényi DP at every
order α by (α/2)·(Δ2/(√n·σ) + √d·τ)², τ = 10·Σ_{k=1}^{n-1} exp(-2π²σ²·k/(k+1)): the RDP of
a Gaussian mechanism with noise multiplier σ_eff = 1 / (Δ2/(√n·σ) + √d·τ). Each round is
therefore accounted as a Gaussian release at σ_eff(n) for the n clients whose noise is
actually in the sum, with the RDP accountant (an RDP bound, so not with PRV/PLD).

σ is set so that ``min_clients`` clients' noise reaches the calibrated central noise
multiplier; a round with fewer clients in the sum is aborted before unmasking, so
nothing is released and nothing is spent.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from fedtune.errors import FedtuneError
from fedtune.prg import expand
from fedtune.privacy.client_level import make_server_plan

UNIT = ("one client (all of its data): neighbouring federations differ in one client's update, present or "
        "replaced by nothing")
COVERS = "the noisy sum the server unmasks each round and every global adapter derived from it"
NOT_COVERED = "which clients took part in a round (the server sees who sends messages)"
MECHANISM = "distributed discrete Gaussian (DDG) under SecAgg+"
ROUNDING_BETA = 1e-6  # conditional rounding redraws with probability at most this per try
TAIL_SIGMAS = 16  # the field holds the noise sum out to 16σ (P(beyond) < 1e-55 per value)
MIN_LOCAL_STDDEV = 2.0  # below this τ (the sum's distance from a discrete Gaussian) stops being negligible


def rounded_l2_bound(c: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """Δ2: the norm bound after conditional randomized rounding of a vector of norm ≤ c
    in ``dim`` dimensions, accepting with probability ≥ 1 - β (DDG Theorem 2)."""
    bound_1 = c + math.sqrt(dim)
    squared = c * c + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dim) / 2)
    return min(bound_1, math.sqrt(squared))


def tau(n: int, local_stddev: float) -> float:
    """DDG Theorem 1's τ for n clients each adding N_Z(0, σ²)."""
    s2 = local_stddev ** 2
    return 10 * sum(math.exp(-2 * math.pi ** 2 * s2 * k / (k + 1)) for k in range(1, n))


@dataclass(frozen=True)
class DDGPlan:
    """The public parameters every client and the server derive from the same config."""

    clip_norm: float  # C: each update's L2 norm (float units)
    gamma: float  # float value of one integer unit
    l2_bound: float  # Δ2: norm bound of the rounded integer vector
    local_stddev: float  # σ: each client's discrete Gaussian noise, integer units
    dim: int  # d: values per update
    min_clients: int  # fewer clients' noise in the sum: the round is aborted before unmasking
    max_clients: int  # the most clients a sum can hold (sizes the field)
    denominator: float  # the sum is divided by this fixed number (q·N): one client moves it by ≤ C/denominator
    field_bits: int  # m: the centred sum always fits in Z_{2^m}

    def noise_multiplier(self, n: int) -> float:
        """σ_eff of one round with ``n`` clients' noise in the sum (DDG Prop. 14, third bound)."""
        if n < 1:
            return 0.0
        return 1.0 / (self.l2_bound / (math.sqrt(n) * self.local_stddev) + math.sqrt(self.dim) * tau(n, self.local_stddev))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DDGPlan:
        ints = ("dim", "min_clients", "max_clients", "field_bits")
        try:
            return cls(**{k: (int if k in ints else float)(d[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as e:
            raise FedtuneError(f"distributed DP: malformed parameters ({e!r})") from None


def make_ddg_plan(noise_multiplier: float, clip_norm: float, bits: int, dim: int, min_clients: int,
              max_clients: int, denominator: float) -> DDGPlan:
    """Per-client σ so that ``min_clients`` clients give σ_eff ≥ ``noise_multiplier``.

    One integer unit is γ = C / 2^(bits-1): an update of norm C becomes a vector of norm 2^(bits-1).
    """
    if min_clients < 1 or max_clients < min_clients:
        raise FedtuneError(f"distributed DP: need 1 <= min_clients <= clients (got {min_clients}, {max_clients})")
    c = float(2 ** (bits - 1))
    gamma = clip_norm / c
    l2 = rounded_l2_bound(c, dim)
    sigma = noise_multiplier * l2 / math.sqrt(min_clients)
    if sigma < MIN_LOCAL_STDDEV:
        raise FedtuneError(f"distributed DP: each client's noise would be σ={sigma:.3g} integer units, below "
                           f"{MIN_LOCAL_STDDEV:g}; raise secagg.bits")
    plan = DDGPlan(clip_norm, gamma, l2, sigma, dim, min_clients, max_clients, denominator, 1)
    for _ in range(1000):  # τ > 0 costs a hair of σ_eff: raise σ until min_clients reach the target
        if plan.noise_multiplier(min_clients) >= noise_multiplier:
            break
        plan = DDGPlan(**{**plan.to_dict(), "local_stddev": plan.local_stddev * 1.0001})
    else:
        raise FedtuneError("distributed DP: cannot reach the noise target; raise secagg.bits")
    bound = max_clients * l2 + TAIL_SIGMAS * math.sqrt(max_clients) * plan.local_stddev
    m = (2 * math.ceil(bound) + 1).bit_length()
    return DDGPlan(**{**plan.to_dict(), "field_bits": m})


def plan_for(cfg, dim: int, noise_multiplier: float | None = None) -> DDGPlan:
    """The run's DDG parameters for updates of ``dim`` values. The client derives them from its own
    config (and refuses a server that asks for others); the server passes its ledger's σ."""
    z = make_server_plan(cfg).noise_multiplier if noise_multiplier is None else noise_multiplier
    n, c = cfg.num_clients, cfg.client_dp
    return make_ddg_plan(z, c.clip_norm, cfg.secagg.bits, dim, c.min_clients or n, n, c.sample_rate * n)


# ---- the client's side -----------------------------------------------------------------
class Uniform:
    """Uniform doubles in (0, 1) from a ChaCha20 stream under a fresh 256-bit OS seed."""

    def __init__(self, seed: bytes | None = None) -> None:
        self._expand, self._seed, self._used = expand, seed or os.urandom(32), 0

    def draw(self, n: int) -> np.ndarray:
        # A fresh key per draw (derived by position): the stream never repeats.
        key = hashlib.sha256(self._seed + self._used.to_bytes(8, "little")).digest()
        self._used += 1
        bits = self._expand(key, n, 64) >> np.uint64(11)  # 53 random bits
        return (bits.astype(np.float64) + 0.5) * 2.0 ** -53


def discrete_gaussian(sigma: float, size: int, uniform: Uniform) -> np.ndarray:
    """``size`` draws of N_Z(0, σ²) by CKS Algorithm 3: discrete Laplace proposals of scale
    t = ⌊σ⌋ + 1, accepted with probability exp(-(|y| - σ²/t)² / (2σ²)). Vectorized in
    float64 (as Google's distributed DP code does), not constant-time."""
    t = math.floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = int((size - filled) * 1.7) + 64  # acceptance is above 0.6 for σ ≥ 1
        u = uniform.draw(3 * want).reshape(3, want)
        # Geometric on {0, 1, ...} with P(G ≥ k) = e^{-k/t}; G1 - G2 is discrete Laplace(t).
        y = np.floor(-t * np.log(u[0])) - np.floor(-t * np.log(u[1]))
        accept = u[2] < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        y = y[accept][: size - filled]
        out[filled:filled + y.size] = y.astype(np.int64)
        filled += y.size
    return out


def conditional_round(x: np.ndarray, bound: float, uniform: Uniform) -> np.ndarray:
    """Unbiased randomized rounding of ``x`` to integers, redrawn until the norm is ≤ ``bound``."""
    floor = np.floor(x)
    for _ in range(100):
        r = floor + (uniform.draw(x.size) < (x - floor))
        if float(np.dot(r, r)) <= bound * bound:
            return r.astype(np.int64)
    raise FedtuneError("distributed DP: randomized rounding kept exceeding its norm bound (a bug)")


def add_ddg_noise(update: np.ndarray, plan: DDGPlan, uniform: Uniform | None = None) -> np.ndarray:
    """The client's integer vector: clip to C, scale by 1/γ, round, add its discrete Gaussian noise."""
    uniform = uniform or Uniform()
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    if x.size != plan.dim:
        raise FedtuneError(f"distributed DP: the update has {x.size} values, the plan {plan.dim}")
    if not np.isfinite(x).all():
        raise FedtuneError("distributed DP: the update has NaN or infinite values")
    norm = float(np.linalg.norm(x))
    if norm > plan.clip_norm:
        x = x * (plan.clip_norm / norm)
    ints = conditional_round(x / plan.gamma, plan.l2_bound, uniform)
    return ints + discrete_gaussian(plan.local_stddev, plan.dim, uniform)
