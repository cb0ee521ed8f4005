"""Before round 0: the initial adapter, the strategy, and every client connected."""

from __future__ import annotations

import time

import torch
from flwr.serverapp import Grid

from fedtune import config as config_mod
from fedtune.errors import FedtuneError
from fedtune.model import add_lora, get_adapter_state, load_base_model
from fedtune.privacy import Plan
from fedtune.privacy.client_level import Sampler
from fedtune.server.strategy import AdapterFedAvg, ClientDPFedAvg


def initial_adapter(cfg: config_mod.Config, model_path: str) -> dict[str, torch.Tensor]:
    """Fresh LoRA weights (A random from run.seed, B zero): the base model's behaviour."""
    base = load_base_model(model_path, torch.device("cpu"))
    state = get_adapter_state(add_lora(base, cfg, seed=cfg.run.seed))
    del base
    return state


def make_strategy(cfg: config_mod.Config, template: dict[str, tuple[int, ...]],
                  server_plan: Plan | None) -> AdapterFedAvg:
    """DP-FedAvg's Poisson sampling under client-level DP, else FedAvg over the adapter."""
    if server_plan is not None:
        return ClientDPFedAvg(num_clients=cfg.num_clients, template=template, plan=server_plan,
                              sampler=Sampler(cfg.privacy.seed if cfg.privacy.seed >= 0 else None))
    return AdapterFedAvg(num_clients=cfg.num_clients, clients_per_round=cfg.clients_per_round,
                         template=template, local=cfg.federation.mode == "local")


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (have := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise FedtuneError(
                f"only {have} of {wanted} clients connected within {timeout:.0f} s; start more clients, "
                f"or for `flwr run` pass --federation-config 'num-supernodes={wanted}'"
            )
        time.sleep(1.0)


def tolerate_dropouts(strategy) -> None:
    """Every client joined; from now on a round goes ahead with the clients still connected
    (Flower's strategies otherwise wait for all of them, so one dead client stalls the run)."""
    strategy.min_available_nodes = strategy.min_train_nodes = strategy.min_evaluate_nodes = 1
