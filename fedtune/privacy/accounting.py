"""ε of a DP-SGD history, and the noise that reaches a target ε.

A history is a list of ``(noise_multiplier, sample_rate, steps)``: each entry is that
many steps of the Poisson-subsampled Gaussian mechanism. Opacus' accountants (RDP by
default, PRV for tighter numbers) do the math; Google's dp-accounting is the second,
independent implementation used to check recorded numbers.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Sequence

# Opacus (and torch with it) is imported on first use: a deployed client's secure-aggregation
# key stages import this package but never compute ε.

History = Sequence[tuple[float, float, int]]


@functools.cache
def rdp_orders() -> list[float]:
    """RDP orders: Opacus' defaults plus large ones, which small data sets at large ε need
    (otherwise the best order sits at the edge and ε is looser than it should be)."""
    from opacus.accountants import RDPAccountant

    return sorted(set(RDPAccountant.DEFAULT_ALPHAS) | {80, 96, 128, 192, 256, 384, 512, 1024})


def _options(accountant: str) -> dict:
    return {"alphas": rdp_orders()} if accountant == "rdp" else {}


def merged(history: History) -> list[tuple[float, float, int]]:
    """Neighbouring entries with the same (σ, q) as one entry (composition adds steps)."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        s, q, n = float(s), float(q), int(n)
        if n <= 0:
            continue
        if out and out[-1][:2] == (s, q):
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((s, q, n))
    return out


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``history`` (0 for an empty one), by Opacus."""
    history = merged(history)
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta, **_options(accountant)))


@functools.lru_cache(maxsize=256)  # a pure function that takes seconds: setup and every round reuse it
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest σ (to 0.01 in ε) whose ``steps`` steps at ``sample_rate`` stay within ε."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search probes huge σ, where the best order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant, epsilon_tolerance=0.01, **_options(accountant),
        ))


def epsilon_independent(history: History, delta: float, accountant: str = "rdp") -> float:
    """The same ε by Google's dp-accounting: RDP for ``rdp``, PLD for ``prv``."""
    import dp_accounting
    from dp_accounting import pld, rdp

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), int(n)
        )
        for s, q, n in merged(history)
    ]
    if not events:
        return 0.0
    if accountant == "rdp":
        acc = rdp.RdpAccountant(orders=rdp_orders())  # the same orders, another implementation
    else:
        acc = pld.PLDAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # dp-accounting warns (via absl) for every order it skips
    try:
        acc.compose(dp_accounting.ComposedDpEvent(events))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)
