"""What stays on a client between rounds: the tensors its aggregation method keeps (fedsa:
lora_B) and the last release, sent again at no cost when a restarted server asks for
exactly what it paid for (fedtune.release)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedtune import release
from fedtune.aggregation import kept
from fedtune.client.setup import ClientSetup, reproducible_seed
from fedtune.errors import FedtuneError
from fedtune.privacy import Ledger
from fedtune.runfolder import atomic_write_bytes, kept_adapter_path, release_path
from fedtune.secagg.flower import LocalUpdate

if TYPE_CHECKING:
    import torch


def load_kept(run_dir: Path, name: str, initial: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """The adapter tensors ``method`` keeps on this client: its saved copy, else the seeded init."""
    from safetensors.torch import load_file  # lazy: torch

    path = kept_adapter_path(run_dir, name)
    own = kept(method, initial)
    if own and path.is_file():
        saved = load_file(str(path))
        if set(saved) == set(own):
            return saved
    return own


def save_kept(run_dir: Path, name: str, state: dict[str, torch.Tensor], method: str) -> None:
    """Store the part of ``state`` that never leaves the client (fedsa: its lora_B), atomically."""
    from safetensors.torch import save  # lazy: torch

    own = kept(method, state)
    if own:
        atomic_write_bytes(kept_adapter_path(run_dir, name), save({k: v.contiguous() for k, v in own.items()}))


def full_adapter(s: ClientSetup, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the server sent plus what the aggregation method keeps on this client."""
    return {**load_kept(s.run_dir, s.name, s.m.initial, s.cfg.federation.aggregation), **received}


def resend(s: ClientSetup, ledger: Ledger, server_round: int, asked: str, secure: bool) -> LocalUpdate | None:
    """The stored release again, if the server asks for exactly what it paid for (fedtune.release)."""
    last = release.load(release_path(s.run_dir, s.name))
    if last is None or (last.server_round, last.fingerprint) != (server_round, asked):
        return None
    head = last.client.get("ledger-head")
    if not any(e["type"] == "spend" and e["round"] == server_round and e["hash"] == head for e in ledger.entries()):
        return None  # not the spend this ledger recorded: train and pay again
    seed = reproducible_seed(s, server_round, "encoding")
    if secure and s.cfg.client_dp.enabled and seed is None:
        # Re-encoding draws fresh distributed-DP noise: two sums of the same update would average it down.
        raise FedtuneError(f"{s.name} already sent round {server_round} in a secure sum with its distributed-DP "
                           "noise; it will not send it again in a second sum (the round goes on without it)")
    if secure and not last.input_set:  # one release, one sum (fedtune.release)
        raise FedtuneError(f"{s.name} already masked round {server_round}'s update into a secure sum whose input set "
                           "it never signed; it will not mask it into another (the round goes on without it)")
    ledger.record_resend(server_round, head)
    state = last.state
    if not secure:
        import torch  # lazy: the secure path sends numpy arrays

        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return LocalUpdate(state, last.weight, {**last.metrics, "resent": 1}, last.client, seed,
                       bytes.fromhex(last.input_set))


def store_release(s: ClientSetup, server_round: int, asked: str, arrays: dict, metrics: dict, client: dict) -> None:
    """Paid for and about to leave: kept, so that the same request again costs nothing."""
    release.store(release_path(s.run_dir, s.name),
                  release.Release(server_round, asked, arrays, float(len(s.train)), metrics, client))
