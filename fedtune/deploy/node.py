"""A deployed client's ClientApp: what its operator decides overrides what the server asks.

The SuperNode passes the client's own settings (client/client.toml) as Flower node
config. With them the ClientApp trains on the local data file only, enforces the local
privacy budget (the run config's privacy.budget is ignored), keeps its ledger in the
local state folder, and refuses what a deployment must not accept: seeded DP noise
(unless the operator allows it, for tests) and planted audit records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedtune import config as config_mod
from fedtune.errors import FedtuneError


@dataclass(frozen=True)
class LocalNode:
    name: str
    data_file: str
    budget: float
    state_dir: str
    model_cache: str
    allow_seeded: bool

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
                         str(node_config.get("model-cache", "")), bool(node_config.get("allow-seeded", False)))
    except (KeyError, ValueError) as exc:
        raise FedtuneError(f"the SuperNode's node config lacks {exc}; start it with `fedtune client start`") from None
    if not node.budget > 0:
        raise FedtuneError(f"client budget must be > 0 (got {node.budget}); set client.budget")
    return node


def local_config(cfg: config_mod.Config, node: LocalNode) -> config_mod.Config:
    """The server's run config with the operator's budget and model cache."""
    if cfg.privacy.seed >= 0 and not node.allow_seeded:
        raise FedtuneError(f"{node.name} refuses a run with seeded DP noise (privacy.seed={cfg.privacy.seed}): the "
                           "guarantee would not hold; set client.allow_seeded = true only for tests")
    if cfg.audit.canaries or cfg.audit.secrets:
        raise FedtuneError(f"{node.name} refuses planted audit records (audit.canaries/secrets): they are for simulations")
    return cfg.replace(privacy={"budget": node.budget},
                       model={"cache_dir": node.model_cache or cfg.model.cache_dir})


def data_config(cfg: config_mod.Config, data_file: str) -> config_mod.Config:
    """The config that reads one client's whole file (no partition). The file's ``split``
    column, when it has one, says which records are held out; else data.eval_fraction is."""
    return cfg.replace(data={"source": data_file, "partition": "iid"},
                       federation={"clients": 1, "clients_per_round": 0, "mode": "federated"},
                       secagg={"enabled": False}, client_dp={"enabled": False})


def local_examples(cfg: config_mod.Config, node: LocalNode, tokenizer):
    from fedtune.data import client_examples

    return client_examples(data_config(cfg, node.data_file), 0, tokenizer)
