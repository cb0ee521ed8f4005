"""A deployed client's ClientApp: what its operator decides overrides what the server asks.

The SuperNode passes the client's own settings (client/client.toml) as Flower node
config. With them the ClientApp trains on the local data file only, enforces the local
privacy budget (the run config's privacy.budget is ignored), keeps its ledger in the
local state folder, and refuses what a deployment must not accept: seeded DP noise
(unless the operator allows it, for tests) and planted audit records.

Every message runs in a fresh process, so the tokenized local examples are cached in the
state folder (state/cache/examples.npz, keyed by the data file's and the tokenizer's bytes
and the settings that shape them): a message then needs neither the tokenizer nor
``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fedtune import __version__
from fedtune import config as config_mod
from fedtune.deploy.policy import Policy
from fedtune.errors import FedtuneError
from fedtune.privacy.user_level import operator_unit
from fedtune.runfolder import atomic_write_bytes

if TYPE_CHECKING:
    from fedtune.data import TokenizedData

EXAMPLES_FORMAT = "fedtune-examples/1"  # change it when tokenization changes: old caches are then recomputed
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


@dataclass(frozen=True)
class LocalNode:
    name: str
    data_file: str
    budget: float
    state_dir: str
    model_cache: str
    allow_seeded: bool
    min_inputs: int = 3  # secure aggregation: the fewest real inputs a sum of this client's may hold
    dataset: str = ""  # the data set's name: its lifetime ledger
    policy: Policy = field(default_factory=Policy)
    user_field: str = ""  # the operator's person column: user-level DP, whatever the server asks

    def run_dir(self, cfg: config_mod.Config) -> Path:
        """This client's folder for the run: its ledger (runs/<run>/clients/<name>/ledger.jsonl)."""
        name = cfg.run.name
        if not name or "/" in name or name in (".", ".."):
            raise FedtuneError(f"the server's run.name {name!r} is not a plain folder name; the client refuses it")
        return Path(self.state_dir) / "runs" / name


def from_node_config(node_config: Mapping[str, Any]) -> LocalNode | None:
    """The client's own settings, or None in simulation (no ``fedtune-client`` key)."""
    if "fedtune-client" not in node_config:
        return None
    try:
        node = LocalNode(str(node_config["fedtune-client"]), str(node_config["data-file"]),
                         float(node_config["budget"]), str(node_config["state-dir"]),
                         str(node_config.get("model-cache", "")), bool(node_config.get("allow-seeded", False)),
                         int(node_config.get("min-inputs", 3)),
                         str(node_config.get("dataset", node_config["fedtune-client"])),
                         Policy.from_node_config(node_config),
                         str(node_config.get("user-field", "")).strip())
    except (KeyError, ValueError) as exc:
        raise FedtuneError(f"the SuperNode's node config lacks {exc}; start it with `fedtune client start`") from None
    if not node.budget > 0:
        raise FedtuneError(f"client budget must be > 0 (got {node.budget}); set client.budget")
    return node


def local_config(cfg: config_mod.Config, node: LocalNode) -> config_mod.Config:
    """The server's run config with the operator's budget, unit, loss disclosure and model cache."""
    if cfg.privacy.seed >= 0 and not node.allow_seeded:
        raise FedtuneError(f"{node.name} refuses a run with seeded DP noise (privacy.seed={cfg.privacy.seed}): the "
                           "guarantee would not hold; set client.allow_seeded = true only for tests")
    if cfg.audit.canaries or cfg.audit.secrets:
        raise FedtuneError(f"{node.name} refuses planted audit records (audit.canaries/secrets): they are for simulations")
    reason = node.policy.model_violation(cfg.model.name)
    if reason:  # before any model is loaded: the worker holds only models its operator accepts
        raise FedtuneError(f"{node.name} refused the run: policy: {reason}")
    # Whether per-client losses leave is the operator's choice (policy.reveal_losses), never the server's.
    return cfg.replace(privacy={"budget": node.budget, "reveal_losses": node.policy.reveal_losses,
                                **operator_unit(cfg, node)},
                       data={"user_field": node.user_field or cfg.data.user_field},
                       model={"cache_dir": node.model_cache or cfg.model.cache_dir})


def data_config(cfg: config_mod.Config, data_file: str) -> config_mod.Config:
    """The config that reads one client's whole file (no partition). The file's ``split``
    column, when it has one, says which records are held out; else data.eval_fraction is."""
    return cfg.replace(data={"source": data_file, "partition": "iid"},
                       federation={"clients": 1, "clients_per_round": 0, "mode": "federated", "min_clients": 0},
                       secagg={"enabled": False}, client_dp={"enabled": False, "min_clients": 0})


def local_examples(cfg: config_mod.Config, node: LocalNode, model_path: str,
                   tokenizer: Callable[[], Any]) -> tuple[TokenizedData, TokenizedData, int]:
    """(train, held-out, padding id) of the local data file, from the cache when it matches."""
    from fedtune.data import client_examples  # lazy: torch

    dcfg = data_config(cfg, node.data_file)
    key = _examples_key(dcfg, model_path)
    path = Path(node.state_dir) / "cache" / "examples.npz"
    cached = _load_examples(path, key) if key else None
    if cached is not None:
        return cached
    tok = tokenizer()
    train, heldout = client_examples(dcfg, 0, tok)
    if key:
        _save_examples(path, key, train, heldout, tok.pad_token_id)
    return train, heldout, tok.pad_token_id


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _examples_key(dcfg: config_mod.Config, model_path: str) -> str | None:
    """What the tokenized examples depend on; None (no cache) for a model that is not a local folder."""
    model = Path(model_path)
    if not model.is_dir():
        return None
    try:
        tokenizer = {p.name: _file_digest(p) for p in sorted(model.iterdir()) if p.is_file() and p.suffix not in _WEIGHTS}
        data = _file_digest(Path(dcfg.data.source))
    except OSError:  # e.g. the data file is gone: reading it says so in one line
        return None
    return hashlib.sha256(json.dumps({
        "format": EXAMPLES_FORMAT, "fedtune": __version__, "data": asdict(dcfg.data), "seed": dcfg.run.seed,
        "max_length": dcfg.model.max_length, "data_file": data, "tokenizer": tokenizer,
    }, sort_keys=True, default=str).encode()).hexdigest()


def _save_examples(path: Path, key: str, train: TokenizedData, heldout: TokenizedData, pad_id: int) -> None:
    import io

    import numpy as np

    arrays = {"key": np.array(key), "pad_id": np.array(pad_id)}
    for part, data in (("train", train), ("heldout", heldout)):
        arrays[f"{part}_ids"] = np.concatenate([x.numpy() for x in data.ids])
        arrays[f"{part}_lengths"] = np.array([len(x) for x in data.ids], dtype=np.int64)
        arrays[f"{part}_starts"] = np.array(data.starts, dtype=np.int64)
        if data.users is not None:  # user-level DP: each example's person
            arrays[f"{part}_users"] = np.array(data.users, dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue(), mode=0o600)  # derived from the private data: owner only


def _load_examples(path: Path, key: str) -> tuple[TokenizedData, TokenizedData, int] | None:
    """The cached examples, or None when missing, stale or unreadable (then they are recomputed)."""
    import numpy as np
    import torch

    from fedtune.data import TokenizedData  # lazy: torch

    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            parts = [TokenizedData(list(torch.from_numpy(z[f"{part}_ids"]).split(z[f"{part}_lengths"].tolist())),
                                   z[f"{part}_starts"].tolist(),
                                   z[f"{part}_users"].tolist() if f"{part}_users" in z else None)
                     for part in ("train", "heldout")]
            return parts[0], parts[1], int(z["pad_id"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
