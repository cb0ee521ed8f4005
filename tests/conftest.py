"""Shared test setup: a private model cache, the tiny model, small configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tests never touch the user's cache; subprocesses (Flower, Ray workers) inherit this.
os.environ.setdefault("FEDTUNE_CACHE", tempfile.mkdtemp(prefix="fedtune-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process: `make test` runs two workers on two cores, each starting
# simulations and servers; more threads only oversubscribe the cores (OpenMP threads that
# wait on each other's barriers made the SmolLM2 audit arms several times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    from tests.processes import install

    install()  # no SuperLink, SuperNode or Ray process outlives a killed test run


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from fedtune.model import TINY_MODEL, resolve_model

    return resolve_model(TINY_MODEL)


def tiny_config(**sections):
    """simulations/tiny.toml with ``section={"key": value}`` changes."""
    from fedtune import config

    return config.load(ROOT / "simulations" / "tiny.toml").replace(**sections)


@pytest.fixture
def tiny_lora(tiny_path):
    """(config, tokenizer, LoRA model) on the CPU, lora_B nudged off zero so every LoRA
    parameter has a non-zero gradient."""
    import torch

    from fedtune.model import add_lora, load_base_model, load_tokenizer

    cfg = tiny_config()
    model = add_lora(load_base_model(tiny_path, torch.device("cpu")), cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return cfg, load_tokenizer(tiny_path), model


@pytest.fixture
def task_identity():
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def secagg_collect(client, msg, vector, real=True):
    """The collect stage as fedtune's Flower client runs it (secagg.flower_client._collect): the
    shares first (a tampered one stops the client before it trains), then the masked input."""
    client.receive_shares(msg)
    return client.masked_input(vector, real)
