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


# The longest test files, longest first: `make test` hands files to its two workers in
# collection order (--no-loadscope-reorder), so these start at once and the short ones fill
# in around them, instead of a long one starting last and running alone.
LONGEST_FIRST = ("test_memorization_", "test_user_run", "test_simulation", "test_deploy_restart",
                 "test_deploy_e2e", "test_parity_e2e", "test_personalize_e2e")


def pytest_collection_modifyitems(session, config, items):
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:  # per file, so that a file's tests stay together
        first = [i for i, prefix in enumerate(LONGEST_FIRST) if item.path.stem.startswith(prefix)]
        return (first[0] if first else len(LONGEST_FIRST), 0 if item.path in slow_files else 1)

    items.sort(key=rank)  # stable: within a rank, the collection order


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
