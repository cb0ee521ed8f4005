"""How LoRA adapters are aggregated: which tensors each method trains and sends, which
stay on the client (the server optimizers applied to the average: fedtune.server.aggregation).

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
