"""A client's last release, kept so that a round the server asks for again costs nothing.

A server that crashed mid-round asks again, once restarted, for a round that some clients
already trained and paid for. What a client released is already DP-noised, so sending the
same update again is post-processing and spends nothing. The client therefore stores what
it releases (atomically, next to its ledger; only the latest round) after the ledger spend
and before the reply. Asked again for the same round of the same run with the same global
adapter (same fingerprint), it sends the stored update again and its ledger gets a
``resend`` note, not a spend. Any other request is a new release, charged as usual.

Under secure aggregation one release goes into one sum: when the client signs the input
set of its sum (the consistency stage) it records that set here (``bind``), before its
signature leaves. A resend is masked again only with that set recorded, and declares it:
the clients then sign only that very set, with every real input a resend bound to it,
so the second sum is the first again (fedtune.secagg.client._check_bound). A release whose
set was never recorded is not masked again (the round goes on without it). Under
distributed DP a resend would draw fresh noise, so it is refused outright (fedtune.client).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedtune.errors import FedtuneError
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
    input_set: str = ""  # secure: hex digest of the input set of the sum it went into (identity.input_set)


def store(path: Path, r: Release) -> None:
    from safetensors.numpy import save

    meta = {"round": str(r.server_round), "fingerprint": r.fingerprint, "weight": repr(r.weight),
            "metrics": json.dumps(r.metrics), "client": json.dumps(r.client), "input-set": r.input_set}
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
                       json.loads(meta["metrics"]), json.loads(meta["client"]), meta.get("input-set", ""))
    except (OSError, KeyError, ValueError, SafetensorError):
        return None


def bind(path: Path, server_round: int, input_set: str) -> None:
    """Record the input set of the secure sum the stored release of ``server_round`` goes into
    (durably, before the client signs it); a different set already recorded is refused."""
    last = load(path)
    if last is None or last.server_round != server_round or last.input_set == input_set:
        return  # a refusal this round (no release): nothing to bind
    if last.input_set:
        raise FedtuneError(f"round {server_round}'s update already went into a sum over another set of clients; "
                           "refusing to sign this one")
    last.input_set = input_set
    store(path, last)
