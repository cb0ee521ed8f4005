"""Server-side aggregation: weighted averaging, refusals, failures, malformed updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedtune.server.strategy import AdapterFedAvg, check_update

TEMPLATE = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _arrays(value):
    return _record({k: np.full(s, value, dtype=np.float32) for k, s in TEMPLATE.items()})


def _reply(node, content=None, error=None):
    """A reply from ``node``, as the server receives it."""
    ask = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(error, reply_to=ask) if error else Message(content, reply_to=ask)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _update(node, value, examples, **metrics):
    return _reply(node, RecordDict({
        "arrays": _arrays(value),
        "metrics": MetricRecord({"num-examples": examples, "refused": 0, "epsilon": 1.0, **metrics}),
        "client": ConfigRecord({"name": f"client-{node}"}),
    }))


@pytest.fixture
def strategy():
    return AdapterFedAvg(num_clients=4, clients_per_round=4, template=TEMPLATE)


def test_weighted_average_of_accepted_updates(task_identity, strategy):
    replies = [_update(1, 1.0, 100), _update(2, 4.0, 300)]
    arrays, _ = strategy.aggregate_train(1, replies)
    for value in arrays.to_numpy_ndarrays():
        np.testing.assert_allclose(value, (1.0 * 100 + 4.0 * 300) / 400, rtol=1e-6)
    assert [o.status for o in strategy.outcomes] == ["ok", "ok"]


def test_refusals_failures_and_bad_updates_are_told_apart(task_identity, strategy):
    refusal = _reply(3, RecordDict({
        "metrics": MetricRecord({"refused": 1, "epsilon": 7.9, "num-examples": 0}),
        "client": ConfigRecord({"name": "client-3", "reason": "privacy budget: ..."}),
    }))
    nan = _update(4, float("nan"), 10)
    failure = _reply(5, error=Error(code=1, reason="Exception ClientAppException occurred. Message: boom"))
    arrays, _ = strategy.aggregate_train(1, [_update(1, 2.0, 10), refusal, nan, failure])
    statuses = {o.client: (o.status, o.reason) for o in strategy.outcomes}
    assert statuses["client-1"][0] == "ok"
    assert statuses["client-3"] == ("refused", "privacy budget: ...")
    assert statuses["client-4"][0] == "rejected" and "NaN" in statuses["client-4"][1]
    assert statuses["node-5"] == ("failed", "boom")
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 2.0)  # only the good update counts


@pytest.mark.parametrize("arrays, weight, problem", [
    ({"a.lora_A.weight": np.zeros((2, 3), np.float32)}, 5, "keys differ"),
    ({"a.lora_A.weight": np.zeros((3, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}, 5, "shape"),
    ({"a.lora_A.weight": np.full((2, 3), 1e9, np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}, 5, "beyond"),
    ({"a.lora_A.weight": np.zeros((2, 3), np.int64), "a.lora_B.weight": np.zeros((3, 2), np.float32)}, 5, "dtype"),
    ({k: np.zeros(s, np.float32) for k, s in TEMPLATE.items()}, -1, "num-examples"),
    ({k: np.zeros(s, np.float32) for k, s in TEMPLATE.items()}, float("inf"), "num-examples"),
])
def test_check_update_names_the_problem(arrays, weight, problem):
    content = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": weight})})
    assert problem in check_update(content, TEMPLATE)


def test_all_refused_gives_no_new_global(task_identity, strategy):
    refusal = _reply(3, RecordDict({"metrics": MetricRecord({"refused": 1, "epsilon": 8.0, "num-examples": 0}),
                                    "client": ConfigRecord({"name": "client-3", "reason": "budget"})}))
    assert strategy.aggregate_train(2, [refusal]) == (None, None)


def test_local_mode_keeps_each_clients_adapter(task_identity):
    strategy = AdapterFedAvg(num_clients=2, clients_per_round=2, template=TEMPLATE, local=True)
    assert strategy.aggregate_train(1, [_update(1, 1.0, 10), _update(2, 5.0, 10)]) == (None, None)
    assert float(strategy.local_arrays[2].to_numpy_ndarrays()[0][0, 0]) == 5.0


def test_the_average_is_summed_by_client_name_not_arrival_order(task_identity):
    """The same updates from the same clients give a bit-identical average whatever order
    they arrive in and whatever node ids the clients have (simulation vs deployment)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(0)
    shapes = {"w": (64,)}
    updates = {f"client-{i}": rng.normal(size=64).astype(np.float32) * 10.0 ** rng.integers(-4, 4, 64)
               for i in range(5)}

    def replies(order, node_base):
        out = []
        for i in order:
            name = f"client-{i}"
            out.append(_reply(node_base + i, RecordDict({
                "arrays": _record({"w": updates[name]}),
                "metrics": MetricRecord({"num-examples": 10 + i, "refused": 0, "epsilon": 1.0}),
                "client": ConfigRecord({"name": name}),
            })))
        return out

    forward, backward = replies(range(5), 1), replies(reversed(range(5)), 90)
    naive = [aggregate_arrayrecords([m.content for m in r], "num-examples")["w"].numpy() for r in (forward, backward)]
    assert not np.array_equal(*naive)  # summing in arrival order would differ
    averages = [AdapterFedAvg(num_clients=5, clients_per_round=5, template=shapes).aggregate_train(1, r)[0]["w"].numpy()
                for r in (forward, backward)]
    assert np.array_equal(*averages)
