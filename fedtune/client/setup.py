"""A client's typed setup for one message: its config, model, data and seeded generators.

The base model and the client's tokenized data are cached per process, so a simulation
worker (a Ray actor serving many clients) loads the model once, not once per round.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from fedtune import config as config_mod
from fedtune.deploy.node import LocalNode, from_node_config as deployed_node, local_config, local_examples
from fedtune.errors import FedtuneError
from fedtune.privacy.defaults import resolve as resolve_train
from fedtune.privacy.user_level import dataset_units
from fedtune.runfolder import read_json, run_dir_for

# torch, transformers, peft, opacus and datasets are imported where a message needs them:
# a deployed client runs each message in a fresh process, and the SecAgg+ key stages
# (advertise, share, unmask) need none of them.
if TYPE_CHECKING:
    import torch

    from fedtune.data import TokenizedData


@dataclass
class LoadedModel:
    model: object  # PeftModel, trainable LoRA only
    device: torch.device
    amp_dtype: torch.dtype | None
    path: str
    initial: dict[str, torch.Tensor]  # the adapter at its seeded init (A from run.seed, B zero)
    _tokenizer: object = None

    @property
    def tokenizer(self):
        """Loaded on first use: a deployed client with its examples cached needs none."""
        if self._tokenizer is None:
            from fedtune.model import load_tokenizer  # lazy: transformers, only when examples are tokenized

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer


@dataclass
class ClientSetup:
    cfg: config_mod.Config
    index: int
    name: str
    m: LoadedModel
    train: TokenizedData
    heldout: TokenizedData
    run_dir: Path
    pad_id: int  # the tokenizer's padding id (masked out, but batches stay identical everywhere)
    node: LocalNode | None = None  # a deployed client's own settings (its policy); None in simulation
    train_choice: dict | None = None  # the DP-aware defaults this client chose (fedtune.privacy.defaults)


_MODELS: dict[tuple, LoadedModel] = {}
_DATA: dict[tuple, tuple[TokenizedData, TokenizedData, int]] = {}

# A process that imported torch and transformers spends most of its exit (~1 s) letting the
# garbage collector walk their ~400k objects; frozen at exit, they are left to the OS.
atexit.register(gc.freeze)


def config_from_context(context: Context) -> config_mod.Config:
    return config_mod.from_flat(dict(context.run_config))


def own_config(context: Context) -> config_mod.Config:
    """This client's config: in deployment its own client.toml over the server's run config."""
    node = deployed_node(context.node_config)
    return config_from_context(context) if node is None else local_config(config_from_context(context), node)


def _model(cfg: config_mod.Config) -> LoadedModel:
    key = (cfg.model, cfg.lora, cfg.run.seed)
    if key not in _MODELS:
        import torch  # lazy: the key stages of secure aggregation need no torch

        from fedtune.model import (  # lazy: torch, transformers, peft
            add_lora, get_adapter_state, load_base_model, resolve_device, resolve_model, resolve_precision,
        )

        _MODELS.clear()  # one base model per process
        # train.threads, else the cores Ray gave this simulated client (it sets OMP_NUM_THREADS),
        # else torch's default (all cores of a deployed client's machine).
        threads = cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = resolve_device(cfg.model.device)
        path = resolve_model(cfg.model.name, cfg.model.cache_dir)
        model = add_lora(load_base_model(path, device), cfg, seed=cfg.run.seed)
        _MODELS[key] = LoadedModel(model, device, resolve_precision(cfg.model.precision, device), path,
                                   get_adapter_state(model))
    return _MODELS[key]


def setup(context: Context) -> ClientSetup:
    """The client of this Flower context: deployed (its node config) or simulated."""
    cfg = config_from_context(context)
    node = deployed_node(context.node_config)  # a deployed client's own settings; None in simulation
    if node is not None:
        return _deployed_setup(local_config(cfg, node), node)
    partitions = context.node_config.get("num-partitions")
    return simulated_setup(cfg, int(context.node_config.get("partition-id", 0)),
                           int(partitions) if partitions is not None else None, context.run_id)


def simulated_setup(cfg: config_mod.Config, index: int, partitions: int | None = None,
                    run_id: int | None = None) -> ClientSetup:
    """Simulated client ``index`` of ``cfg``'s federation (its partition of the data set)."""
    from fedtune.data import client_examples, client_name  # lazy: datasets, transformers

    if partitions is not None and partitions != cfg.num_clients:
        raise FedtuneError(
            f"the federation has {partitions} simulated clients but the config wants {cfg.num_clients}; "
            f"pass --federation-config 'num-supernodes={cfg.num_clients}' or set federation.clients"
        )
    m = _model(cfg)
    run_dir = run_dir_for(cfg, run_id)
    key = (cfg.data, cfg.audit, cfg.federation.clients, cfg.federation.mode, cfg.run.seed, cfg.model.max_length,
           m.path, index, run_dir)
    if key not in _DATA:
        _DATA[key] = (*client_examples(cfg, index, m.tokenizer, extra_train=_planted(cfg, run_dir, index)),
                      m.tokenizer.pad_token_id)
    train, heldout, pad_id = _DATA[key]
    return with_train_defaults(ClientSetup(cfg, index, client_name(cfg, index), m, train, heldout, run_dir, pad_id))


def _deployed_setup(cfg: config_mod.Config, node) -> ClientSetup:
    """Deployment: the operator's data file, budget and state folder (fedtune.deploy.node)."""
    m = _model(cfg)
    key = ("deployed", node.data_file, cfg.data, cfg.run.seed, cfg.model.max_length, m.path)
    if key not in _DATA:
        _DATA.clear()  # one client's data set per worker: memory stays bounded however many runs ask
        _DATA[key] = local_examples(cfg, node, m.path, lambda: m.tokenizer)
    train, heldout, pad_id = _DATA[key]
    return with_train_defaults(ClientSetup(cfg, 0, node.name, m, train, heldout, node.run_dir(cfg), pad_id, node))


def with_train_defaults(s: ClientSetup) -> ClientSetup:
    """``s`` with automatic train settings (0) made concrete from public inputs and its record count."""
    s.cfg, choice = resolve_train(s.cfg, dataset_units(s.cfg, s.train))
    s.train_choice = choice.to_dict() if choice is not None else None
    return s


def _planted(cfg: config_mod.Config, run_dir: Path, index: int) -> list[dict]:
    """This client's share of the audit's planted records (simulation only)."""
    if not (cfg.audit.canaries or cfg.audit.secrets):
        return []
    from fedtune.privacy.empirical import PLANT_FILE, planted_records  # lazy: only audited runs

    path = run_dir / PLANT_FILE
    if not path.is_file():
        raise FedtuneError(f"{path} is missing: the server plants audit records before round 0; rerun the simulation")
    return planted_records(read_json(path), index, centralized=cfg.federation.mode == "centralized")


def reproducible_seed(s: ClientSetup, server_round: int, purpose: str) -> bytes | None:
    """32 bytes for ``purpose`` (tests only: privacy.seed ≥ 0), else None (use the OS's entropy).

    Derived from the client's name, not its partition index or node id, so a deployed client
    and the simulated client of the same name draw the same batches, noise and rounding."""
    if s.cfg.privacy.seed < 0:
        return None
    return hashlib.sha256(f"fedtune-test-seed|{s.cfg.privacy.seed}|{s.name}|{server_round}|{purpose}".encode()).digest()


def generators(s: ClientSetup, server_round: int) -> tuple[torch.Generator, torch.Generator]:
    """Sampling (CPU) and noise (model device) generators.

    Seeded from the OS's entropy each round; privacy.seed (tests only) makes them
    reproducible, and the ledger's plan records that the guarantee then does not hold.
    """
    import torch  # lazy: see the module's note

    fixed = [reproducible_seed(s, server_round, purpose) for purpose in ("sampling", "noise")]
    if fixed[0] is not None:
        seeds = tuple(int.from_bytes(f[:8], "big") >> 1 for f in fixed)
    else:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    sampling = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=s.m.device).manual_seed(seeds[1])
    return sampling, noise
