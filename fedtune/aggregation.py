"""How LoRA adapters are aggregated: which tensors each method trains and sends, which
stay on the client, and the optional server optimizer applied to the averaged update.

LoRA's update is ΔW = B·A. Averaging A and B separately (``fedavg``) is not the average
of the clients' B_i·A_i. Two alternatives:

- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): A stays at its random init (the same on every
  client and the server: ``add_lora`` draws it from ``run.seed``), only B is trained and
  sent, so mean_i(B_i)·A = mean_i(B_i·A) exactly; only B is uploaded.
- ``fedsa`` (FedSA-LoRA, Guo et al., ICLR 2025): A is shared and averaged, B stays on the
  client between rounds (its own personalization); only A is sent. There is no global
  B·A: client i uses B_i·mean(A).

Every method sends a weighted *linear* average of what it sends, so all three work with
secure aggregation (the server needs only the sum) and with client-level DP (clip and
noise the tensors sent). The server optimizers post-process that average, so they do too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Method:
    sends: str  # the LoRA factor(s) whose tensors travel: "lora_A", "lora_B" or "" (both)
    trains_a: bool  # A has gradients (false: frozen at its seeded init)
    exact: bool  # the global B·A equals the average of the clients' B·A (fedsa: no global B·A)
    secagg: bool  # a linear sum of what clients send: works with secure aggregation
    client_dp: bool  # works with client-level DP (clip + noise on what is sent)


METHODS = {
    "fedavg": Method(sends="", trains_a=True, exact=False, secagg=True, client_dp=True),
    "ffa": Method(sends="lora_B", trains_a=False, exact=True, secagg=True, client_dp=True),
    "fedsa": Method(sends="lora_A", trains_a=True, exact=False, secagg=True, client_dp=True),
}
# The optimizers' defaults are Flower's (FedAvgM, FedAdam, FedYogi).
SERVER_OPTIMIZERS = {"none": 1.0, "avgm": 1.0, "adam": 0.1, "yogi": 0.01}


def is_shared(method: str, key: str) -> bool:
    """Whether the adapter tensor ``key`` travels between client and server."""
    sends = METHODS[method].sends
    return not sends or f".{sends}." in key


def shared(method: str, state: dict) -> dict:
    """The part of an adapter state that ``method`` sends."""
    return {k: v for k, v in state.items() if is_shared(method, k)}


def kept(method: str, state: dict) -> dict:
    """The part of an adapter state that ``method`` never sends."""
    return {k: v for k, v in state.items() if not is_shared(method, k)}


def set_trainable(model, method: str) -> None:
    """LoRA A frozen under ``ffa`` (so Opacus neither clips nor noises it), else trainable."""
    trains_a = METHODS[method].trains_a
    for name, p in getattr(model, "_module", model).named_parameters():
        if "lora_A" in name:
            p.requires_grad_(trains_a)
        elif "lora_B" in name:
            p.requires_grad_(True)


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
