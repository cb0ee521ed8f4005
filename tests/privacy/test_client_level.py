"""Client-level DP (DP-FedAvg): accounting, clipping, noise, Poisson client sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.privacy import epsilon, epsilon_independent
from fedtune.privacy.client_level import Sampler, clip_update, make_server_plan, update_norm
from fedtune.server.strategy import ClientDPFedAvg
from tests.conftest import tiny_config


@pytest.mark.parametrize("q, sigma, rounds", [(1.0, 1.0, 5), (0.5, 1.2, 20), (0.1, 0.9, 100), (0.02, 0.8, 500)])
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_client_level_epsilon_agrees_with_dp_accounting(q, sigma, rounds, accountant):
    cfg = tiny_config(client_dp={"enabled": True, "sample_rate": q, "noise_multiplier": sigma, "accountant": accountant},
                      federation={"rounds": rounds, "clients": 50})
    plan = make_server_plan(cfg)
    assert plan.round_history == (sigma, q, 1) and plan.dataset_size == 50
    ours = epsilon([plan.round_history] * rounds, plan.delta, accountant)
    theirs = epsilon_independent([(sigma, q, 1)] * rounds, plan.delta, accountant)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_calibrated_server_plan_hits_the_target():
    cfg = tiny_config(client_dp={"enabled": True, "epsilon": 4.0, "sample_rate": 0.3}, federation={"rounds": 30, "clients": 40})
    plan = make_server_plan(cfg)
    assert 3.9 < epsilon([plan.round_history] * 30, plan.delta) <= 4.0


def test_clip_update_bounds_the_update_norm():
    old = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    new = {"a": torch.full((3, 4), 2.0), "b": torch.ones(5) * 3}
    clipped = clip_update(new, old, 0.5)
    assert update_norm({k: v.numpy() for k, v in clipped.items()}, {k: v.numpy() for k, v in old.items()}) == pytest.approx(0.5)
    assert clip_update(old, old, 0.5) is old  # within the bound: untouched


def test_server_noise_has_the_calibrated_standard_deviation():
    cfg = tiny_config(client_dp={"enabled": True, "noise_multiplier": 1.3, "clip_norm": 0.2, "sample_rate": 0.5},
                      federation={"clients": 8})
    plan = make_server_plan(cfg)
    out = Sampler(seed=0).noisy_average([], {"w": (200, 100)}, plan, expected_clients=4.0)
    assert abs(out["w"].std() / (1.3 * 0.2 / 4.0) - 1) < 0.03 and abs(out["w"].mean()) < 0.002


def test_poisson_sampling_rate():
    sampled = [len(Sampler(seed=s).sample(list(range(100)), 0.3)) for s in range(50)]
    assert 28 < np.mean(sampled) < 32 and len(set(sampled)) > 5  # varies: Poisson, not fixed-size


def _reply(node, arrays):
    ask = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                "metrics": MetricRecord({"num-examples": 10, "refused": 0}),
                                "client": ConfigRecord({"name": f"client-{node}"})}), reply_to=ask)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_dp_fedavg_averages_with_equal_weights_and_rejects_unclipped_updates(task_identity):
    cfg = tiny_config(client_dp={"enabled": True, "noise_multiplier": 1e-9, "clip_norm": 1.0, "sample_rate": 1.0},
                      federation={"clients": 2})
    template = {"w": (2, 2)}
    strategy = ClientDPFedAvg(num_clients=2, template=template, plan=make_server_plan(cfg), sampler=Sampler(seed=0))
    strategy._global = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    ok = {"w": np.full((2, 2), 0.25, np.float32)}  # norm 0.5
    too_long = {"w": np.full((2, 2), 5.0, np.float32)}  # norm 10 > C
    arrays, _ = strategy.aggregate_train(1, [_reply(1, ok), _reply(2, too_long)])
    assert [o.status for o in strategy.outcomes] == ["ok", "rejected"]
    assert "exceeds the clip norm" in strategy.outcomes[1].reason
    np.testing.assert_allclose(arrays["w"].numpy(), 0.25 / 2, atol=1e-6)  # sum / (q·N), not / accepted
