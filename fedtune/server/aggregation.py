"""The server's side of aggregation: the optional server optimizer applied to the clients'
weighted average (FedAvgM, FedAdam, FedYogi). Which tensors are averaged: fedtune.aggregation.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedtune.aggregation import SERVER_OPTIMIZERS


class ServerOptimizer:
    """FedAvgM / FedAdam / FedYogi (Reddi et al., 2021) on the averaged update.

    The pseudo-gradient is Δ = average − global; the math follows Flower's strategies
    (Adam with bias correction, Yogi's sign-controlled second moment, SGD momentum).
    ``none`` returns the average unchanged.
    """

    def __init__(self, kind: str = "none", lr: float = 0.0, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        self.kind, self.lr = kind, lr or SERVER_OPTIMIZERS[kind]
        self.momentum, self.beta2, self.tau = momentum, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, old: dict[str, np.ndarray], average: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "none":
            return average
        self.t += 1
        out = {}
        for k, x in old.items():
            x = np.asarray(x, np.float64)
            delta = np.asarray(average[k], np.float64) - x
            if self.kind == "avgm":
                self.m[k] = self.momentum * self.m[k] + delta if k in self.m else delta
                out[k] = x + self.lr * self.m[k]
                continue
            m = self.m.get(k, np.zeros_like(x))
            v = self.v.get(k, np.zeros_like(x))
            self.m[k] = m = self.momentum * m + (1 - self.momentum) * delta
            d2 = delta**2
            if self.kind == "adam":
                self.v[k] = v = self.beta2 * v + (1 - self.beta2) * d2
            else:  # yogi
                self.v[k] = v = v - (1 - self.beta2) * d2 * np.sign(v - d2)
            lr = self.lr * np.sqrt(1 - self.beta2**self.t) / (1 - self.momentum**self.t)
            out[k] = x + lr * m / (np.sqrt(v) + self.tau)
        return {k: v.astype(np.float32) for k, v in out.items()}

    def state(self) -> dict[str, np.ndarray]:
        """Moments and step count, flat (saved with each round's adapter, for a resume)."""
        return {"t": np.array([self.t], np.int64), **{f"m/{k}": v for k, v in self.m.items()},
                **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"][0])
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v/")}


def server_optimizer(cfg) -> ServerOptimizer:
    f = cfg.federation
    return ServerOptimizer(f.server_optimizer, f.server_lr, f.server_momentum, f.server_beta2, f.server_tau)


def optimize(opt: ServerOptimizer, old: ArrayRecord, average: ArrayRecord) -> ArrayRecord:
    """The server optimizer's step from the global ``old`` towards the clients' ``average``."""
    if opt.kind == "none":
        return average
    new = opt.step({k: v.numpy() for k, v in old.items()}, {k: v.numpy() for k, v in average.items()})
    return ArrayRecord({k: Array(v) for k, v in new.items()})
