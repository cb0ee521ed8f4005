"""Aggregation methods: FFA-LoRA is exact, FedSA-LoRA keeps B on the client, server optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.aggregation import kept, set_trainable, shared
from fedtune.server.aggregation import ServerOptimizer
from fedtune.client import handle_evaluate, handle_train
from fedtune.runfolder import kept_adapter_path
from fedtune.server import initial_adapter
from fedtune.server.strategy import AdapterFedAvg
from tests.conftest import tiny_config
from tests.client.test_client import _context, _message

R, D_IN, D_OUT = 4, 6, 5
A_KEY, B_KEY = "layer.lora_A.weight", "layer.lora_B.weight"


def _reply(node, arrays, examples):
    ask = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": examples, "refused": 0}),
        "client": ConfigRecord({"name": f"client-{node}"}),
    }), reply_to=ask)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_ffa_aggregate_is_exactly_the_average_of_the_clients_BA(task_identity):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(R, D_IN)).astype(np.float32)  # frozen, the same everywhere (seeded)
    bs = [rng.normal(size=(D_OUT, R)).astype(np.float32) for _ in range(3)]
    weights = [10, 30, 60]
    strategy = AdapterFedAvg(num_clients=3, clients_per_round=3, template={B_KEY: (D_OUT, R)})
    replies = [_reply(i + 1, shared("ffa", {A_KEY: a, B_KEY: b}), w) for i, (b, w) in enumerate(zip(bs, weights))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == [B_KEY]  # A never travels
    mean_of_products = sum(w * (b.astype(np.float64) @ a) for b, w in zip(bs, weights)) / sum(weights)
    np.testing.assert_allclose(arrays[B_KEY].numpy().astype(np.float64) @ a, mean_of_products, rtol=1e-5, atol=1e-6)


def test_fedavg_of_both_factors_is_not_the_average_product(task_identity):
    """Why ffa and fedsa exist: mean(B)·mean(A) != mean(B·A) once both factors differ."""
    rng = np.random.default_rng(1)
    pairs = [(rng.normal(size=(R, D_IN)), rng.normal(size=(D_OUT, R))) for _ in range(3)]
    strategy = AdapterFedAvg(num_clients=3, clients_per_round=3, template={A_KEY: (R, D_IN), B_KEY: (D_OUT, R)})
    replies = [_reply(i + 1, {A_KEY: a.astype(np.float32), B_KEY: b.astype(np.float32)}, 1) for i, (a, b) in enumerate(pairs)]
    arrays, _ = strategy.aggregate_train(1, replies)
    product = arrays[B_KEY].numpy() @ arrays[A_KEY].numpy()
    assert not np.allclose(product, np.mean([b @ a for a, b in pairs], axis=0), atol=1e-2)


def test_methods_split_the_adapter_into_sent_and_kept_parts():
    state = {A_KEY: 1, B_KEY: 2}
    assert shared("fedavg", state) == state and kept("fedavg", state) == {}
    assert shared("ffa", state) == {B_KEY: 2} and kept("ffa", state) == {A_KEY: 1}
    assert shared("fedsa", state) == {A_KEY: 1} and kept("fedsa", state) == {B_KEY: 2}


def test_server_optimizers():
    old = {"w": np.zeros(3, np.float32)}
    avg = {"w": np.array([0.02, -0.5, 0.0], np.float32)}
    np.testing.assert_allclose(ServerOptimizer("none").step(old, avg)["w"], avg["w"])
    np.testing.assert_allclose(ServerOptimizer("avgm", lr=1.0, momentum=0.0).step(old, avg)["w"], avg["w"], rtol=1e-6)
    # Adam's first (bias-corrected) step moves every coordinate by about lr in the update's direction.
    adam = ServerOptimizer("adam", lr=0.1, tau=1e-9).step(old, avg)["w"]
    np.testing.assert_allclose(adam, [0.1, -0.1, 0.0], atol=1e-6)
    # Momentum: the second step of avgm adds the remembered first update.
    opt = ServerOptimizer("avgm", lr=1.0, momentum=0.5)
    first = opt.step(old, avg)
    second = opt.step(first, {"w": first["w"] + 1.0})
    np.testing.assert_allclose(second["w"], first["w"] + 1.0 + 0.5 * avg["w"], rtol=1e-6)


@pytest.fixture
def initial(tiny_path):
    return initial_adapter(tiny_config(), tiny_path)


def test_fedsa_replies_carry_only_lora_A_and_B_stays_on_the_client(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"aggregation": "fedsa"}, privacy={"dp": False})
    ctx = _context(cfg)
    sent = shared("fedsa", initial)
    reply = handle_train(_message(sent, 1), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    keys = list(reply.content["arrays"].keys())
    assert keys and all(".lora_A." in k for k in keys) and set(keys) == set(sent)
    full_bytes = ArrayRecord(initial).count_bytes()
    assert reply.content["metrics"]["upload-bytes"] < full_bytes
    # The client's own B was trained (it starts at zero) and kept in its folder, not sent.
    from safetensors.torch import load_file

    own = load_file(str(kept_adapter_path(tmp_path, "client-0")))
    assert set(own) == set(kept("fedsa", initial)) and any(v.abs().sum() > 0 for v in own.values())
    # Evaluation uses the client's own B with the A the server sends.
    ev = handle_evaluate(_message(sent, 1, MessageType.EVALUATE), ctx)
    assert not ev.has_error()
    from fedtune.client.setup import _MODELS

    model = next(iter(_MODELS.values())).model
    b_now = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert all(torch.equal(p.detach().cpu(), own[n.replace(".default", "")]) for n, p in b_now.items())


def test_ffa_trains_and_sends_only_lora_B(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"aggregation": "ffa"})
    reply = handle_train(_message(shared("ffa", initial), 1), _context(cfg))
    assert not reply.has_error()
    keys = list(reply.content["arrays"].keys())
    assert keys and all(".lora_B." in k for k in keys)
    assert any(np.abs(v).sum() > 0 for v in reply.content["arrays"].to_numpy_ndarrays())  # B moved off zero
    from fedtune.client.setup import _MODELS

    model = next(iter(_MODELS.values())).model
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    a_now = {n.replace(".default", ""): p.detach().cpu() for n, p in model.named_parameters() if "lora_A" in n}
    assert all(torch.equal(a_now[k], initial[k]) for k in kept("ffa", initial))  # A is still the seeded init
    set_trainable(model, "fedavg")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_ffa_under_secure_aggregation_sums_only_lora_B(tmp_path, task_identity, initial):
    from tests.secagg.test_secagg_flower import NODES, Grid, _cfg, _close, _plain_average, _secure

    sent = shared("ffa", initial)
    change = {"federation": {"aggregation": "ffa"}, "train": {"local_steps": 1}}
    plain = _plain_average(_cfg(tmp_path, "plain").replace(**change), sent, NODES)
    cfg = _cfg(tmp_path, "secure").replace(**change)
    sec = _secure(cfg, sent, Grid(cfg))
    assert not sec.aborted and set(sec.arrays.keys()) == set(sent)
    _close(sec.arrays, plain, cfg, len(NODES))
