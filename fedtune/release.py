"""A client's last release, kept so that a round the server asks for again costs nothing.

A server that crashed mid-round asks again, once restarted, for a round that some clients
already trained and paid for. What a client released is already DP-noised, so sending the
same update again is post-processing and spends nothing. The client therefore stores what
it releases (atomically, next to its ledger; only the latest round) after the ledger spend
and before the reply. Asked again for the same round of the same run with the same global
adapter (same fingerprint), it sends the stored update again and its ledger gets a
``resend`` note, not a spend. Any other request is a new release, charged as usual.

Under secure aggregation the stored update is the plain one; it is masked again with the
new session's keys (and, under distributed DP, noised again: that release is the server's
to account). Caveat: if the crashed session had already unmasked a sum, the server could
compare it with the new sum over a different set of clients; record-level DP still covers
the update, but secure aggregation's secrecy of it does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedtune.runfolder import atomic_write_bytes


def fingerprint(server_round: int, arrays: ArrayRecord, clip_norm: float, secure: bool) -> str:
    """SHA-256 of what the server asked: the round, the global adapter (keys, dtypes, shapes,
    values), the client-level clip bound and whether the update goes into a secure sum (which
    reveals fewer metrics)."""
    h = hashlib.sha256(f"round {server_round} clip {clip_norm!r} secure {secure}\n".encode())
    for key in sorted(arrays.keys()):
        value = np.ascontiguousarray(arrays[key].numpy())
        h.update(f"{key} {value.dtype.str} {value.shape}\n".encode())
        h.update(value.tobytes())
    return h.hexdigest()


@dataclass
class Release:
    server_round: int
    fingerprint: str
    state: dict[str, np.ndarray]  # the update as it left the client (before any masking)
    weight: float
    metrics: dict[str, Any]
    client: dict[str, Any]  # name, ledger-head: the hash of the spend that paid for it


def store(path: Path, r: Release) -> None:
    from safetensors.numpy import save

    meta = {"round": str(r.server_round), "fingerprint": r.fingerprint, "weight": repr(r.weight),
            "metrics": json.dumps(r.metrics), "client": json.dumps(r.client)}
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in r.state.items()}, metadata=meta))


def load(path: Path) -> Release | None:
    """The stored release, or None (none yet, or unreadable: then the round is trained and paid again)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return Release(int(meta["round"]), meta["fingerprint"], state, float(meta["weight"]),
                       json.loads(meta["metrics"]), json.loads(meta["client"]))
    except (OSError, KeyError, ValueError, SafetensorError):
        return None
