"""SecAgg+ through Flower messages: the server's secure round against real ClientApp
handlers (tiny model, real DP-SGD) over an in-memory grid that can drop or tamper."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import config
from fedtune.client import handle_train
from fedtune.client.app import REVEALED_UNDER_SECAGG
from fedtune.secagg.flower import STAGE, Encoding, from_record, secure_train, to_record
from fedtune.server import initial_adapter
from tests.conftest import tiny_config

NODES = [101, 202, 303, 404]


class Grid:
    """Routes each message to the node's ClientApp handler; ``drop`` silences a node from a
    stage on, ``tamper(stage, node, message)`` may change what the node receives."""

    def __init__(self, cfg, drop=None, tamper=None):
        self.contexts = {n: Context(run_id=7, node_id=n, node_config={"partition-id": i, "num-partitions": len(NODES)},
                                    state=RecordDict(), run_config=config.to_flat(cfg)) for i, n in enumerate(NODES)}
        self.drop = drop or {}  # node -> first stage it misses
        self.tamper = tamper
        self.seen: list[tuple[str, int, Message]] = []  # every reply the server received
        self.stages = ["identify", "graph", "advertise", "share", "collect", "consistency", "unmask"]

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, stage = msg.metadata.dst_node_id, str(msg.content["config"][STAGE])
            if node in self.drop and self.stages.index(stage) >= self.stages.index(self.drop[node]):
                continue
            if self.tamper:
                msg = self.tamper(stage, node, msg)
            reply = handle_train(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            self.seen.append((stage, node, reply))
            replies.append(reply)
        return replies


def _train_message(arrays, server_round=1):
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=NODES[0], message_type=MessageType.TRAIN)


def _cfg(tmp_path, name):
    return tiny_config(run={"dir": str(tmp_path / name)}, privacy={"seed": 5}, federation={"clients": len(NODES)},
                       secagg={"enabled": True})


def _plain_average(cfg, initial, nodes):
    """What FedAvg gives without secure aggregation: the example-weighted mean of the clients."""
    ctxs = Grid(cfg).contexts
    total, weight = None, 0.0
    for n in nodes:
        reply = handle_train(_train_message(ArrayRecord(initial)), ctxs[n])
        w = reply.content["metrics"]["num-examples"]
        vec = {k: v.numpy().astype(np.float64) * w for k, v in reply.content["arrays"].items()}
        total = vec if total is None else {k: total[k] + vec[k] for k in vec}
        weight += w
    return {k: v / weight for k, v in total.items()}, weight


@pytest.fixture(scope="module")
def initial(tiny_path):
    return initial_adapter(tiny_config(), tiny_path)


def _secure(cfg, initial, grid, nodes=NODES):
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(nodes))
    return secure_train(grid, nodes, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0, timeout=60)


def _close(secure: ArrayRecord, plain_and_weight, cfg, n: int):
    """Equal within the fixed-point rounding bound of the weighted sum and of the total weight."""
    plain, weight = plain_and_weight
    coder = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=n).coder()
    sum_err, weight_err = coder.error_bound(n)
    bound = (sum_err + max(np.abs(v).max() for v in plain.values()) * weight_err) / (weight - weight_err)
    assert 0 < bound < 1e-4  # the check means something: far below the size of an update
    for k, v in plain.items():
        np.testing.assert_allclose(secure[k].numpy(), v, atol=bound, rtol=0)


def test_secure_round_equals_the_plain_weighted_average(tmp_path, task_identity, initial):
    plain = _plain_average(_cfg(tmp_path, "plain"), initial, NODES)
    cfg = _cfg(tmp_path, "secure")
    grid = Grid(cfg)
    sec = _secure(cfg, initial, grid)
    assert not sec.aborted and sec.included == NODES
    _close(sec.arrays, plain, cfg, len(NODES))
    # The server saw no example count and no loss, only masked field elements and keys.
    for stage, node, reply in grid.seen:
        assert set(reply.content.metric_records.get("metrics", {})) <= set(REVEALED_UNDER_SECAGG) | {"upload-bytes", "secagg-seconds"}
        if stage == "collect":
            masked = reply.content["masked"]["masked"].numpy()
            assert masked.dtype == np.uint8 and "arrays" not in reply.content.array_records
    # Upload at most the fp32 plaintext (20 bits + 2 for 4 clients = 22 of 32 bits).
    size = sum(v.numel() for v in initial.values())
    collect = [r for s, _, r in grid.seen if s == "collect"]
    assert all(r.content["masked"]["masked"].numpy().size <= 1.1 * 4 * size for r in collect)


@pytest.mark.parametrize("stage", ["advertise", "share", "collect", "unmask"])
def test_a_client_dropping_at_any_stage(tmp_path, task_identity, initial, stage):
    cfg = _cfg(tmp_path, "secure")
    sec = _secure(cfg, initial, Grid(cfg, drop={NODES[1]: stage}))
    assert not sec.aborted
    kept = NODES if stage == "unmask" else [n for n in NODES if n != NODES[1]]  # an unmask dropout is in the sum
    assert sec.included == kept
    _close(sec.arrays, _plain_average(_cfg(tmp_path, "plain"), initial, kept), cfg, len(kept))
    if stage != "unmask":
        assert NODES[1] in sec.lost and stage in sec.lost[NODES[1]]


def test_too_many_dropouts_abort_with_nothing_aggregated(tmp_path, task_identity, initial):
    cfg = _cfg(tmp_path, "secure")
    sec = _secure(cfg, initial, Grid(cfg, drop={NODES[0]: "collect", NODES[1]: "collect", NODES[2]: "collect"}))
    assert sec.aborted and sec.arrays is None and sec.included == []


def test_a_tampered_share_is_rejected_naming_the_sender(tmp_path, task_identity, initial):
    victim, sender = NODES[2], NODES[0]

    def tamper(stage, node, msg):
        if stage == "collect" and node == victim:
            body = from_record(msg.content["config"])
            blob = bytearray(body["ciphertexts"][sender])
            blob[-1] ^= 1
            body["ciphertexts"][sender] = bytes(blob)
            extra = {k: v for k, v in msg.content["config"].items() if "." not in k}
            msg = Message(RecordDict({"config": to_record(body, **extra), "arrays": msg.content["arrays"]}),
                          dst_node_id=node, message_type=MessageType.TRAIN)
        return msg

    cfg = _cfg(tmp_path, "secure")
    grid = Grid(cfg, tamper=tamper)
    sec = _secure(cfg, initial, grid)
    assert not sec.aborted and victim not in sec.included  # the round goes on without it
    assert f"client {sender}" in sec.lost[victim] and "authentication" in sec.lost[victim]
    # ...and the victim stopped before training: nothing spent from its ledger.
    from fedtune.privacy import Ledger
    from fedtune.runfolder import ledger_path

    assert Ledger(ledger_path(tmp_path / "secure", "client-2")).spends() == []


def test_a_restarted_server_gets_the_same_updates_masked_anew_at_no_cost(tmp_path, task_identity, initial):
    """A secure round asked again (the server restarted: new contexts, fresh keys) with the
    same global adapter: every client re-masks the update it paid for, spends nothing, and
    both sessions aggregate the same stored updates."""
    from fedtune import release
    from fedtune.privacy import Ledger
    from fedtune.runfolder import ledger_path, release_path

    cfg = _cfg(tmp_path, "secure").replace(privacy={"seed": -1})  # fresh DP noise: a retrain would differ
    first = _secure(cfg, initial, Grid(cfg))
    again = _secure(cfg, initial, Grid(cfg))
    assert not first.aborted and not again.aborted and again.included == NODES
    names = [f"client-{i}" for i in range(len(NODES))]
    for name in names:
        assert [e["type"] for e in Ledger(ledger_path(tmp_path / "secure", name)).entries()] == ["plan", "spend", "resend"]
    for node in NODES:
        assert again.replies[node].content["metrics"]["resent"] == 1
    kept = [release.load(release_path(tmp_path / "secure", name)) for name in names]
    weight = sum(r.weight for r in kept)
    plain = {k: sum(r.state[k].astype(np.float64) * r.weight for r in kept) / weight for k in kept[0].state}
    _close(first.arrays, (plain, weight), cfg, len(NODES))
    _close(again.arrays, (plain, weight), cfg, len(NODES))


@pytest.mark.slow
def test_a_simulation_with_secagg_matches_one_without(tmp_path):
    """Through Flower's simulation engine: the same seeded run with and without --secagg
    ends at the same held-out perplexity (up to fixed-point rounding), and under secagg no
    example count or loss of a client reaches the server's records."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fedtune.runfolder import read_jsonl
    from tests.conftest import ROOT

    finals = {}
    for label, extra in (("plain", []), ("secure", ["--secagg"])):
        out = tmp_path / label
        res = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"),
                              "--output", str(out), "--set", "privacy.seed=3", *extra],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert res.returncode == 0, res.stdout + res.stderr
        (run_dir,) = out.iterdir()
        rows = read_jsonl(run_dir / "metrics.jsonl")
        finals[label] = json.loads((run_dir / "summary.json").read_text())["final_perplexity"]
        trains = [r for r in rows if r["phase"] == "train"]
        assert len(trains) == 6 and all(r["status"] == "ok" for r in trains)
        if label == "secure":
            assert all("num-examples" not in r and "train-loss" not in r for r in trains)
            assert [r["secagg-included"] for r in rows if r["phase"] == "round" and r["round"] > 0] == [3, 3]
            audit = subprocess.run([sys.executable, "-m", "fedtune.cli", "audit", str(run_dir), "--verify"],
                                   capture_output=True, text=True, timeout=300)
            assert audit.returncode == 0 and "verification passed" in audit.stdout, audit.stdout + audit.stderr
        finals[label + "-adapter"] = load_file(run_dir / "adapters" / "global" / "adapter_model.safetensors")
    assert finals["secure"] == pytest.approx(finals["plain"], rel=1e-3)
    plain, secure = finals["plain-adapter"], finals["secure-adapter"]
    diff = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert 0 < diff < 1e-5  # two aggregation paths, equal up to 24-bit fixed-point rounding


@pytest.mark.parametrize("config_items, why", [
    ({STAGE: "advertise", "server-round": 1}, "malformed setup"),
    ({STAGE: "teleport", "server-round": 1}, "unknown stage"),
    ({STAGE: "unmask", "server-round": 1}, "holds no round state"),
])
def test_malformed_protocol_messages_get_an_error_reply_not_a_crash(tmp_path, task_identity, config_items, why):
    cfg = _cfg(tmp_path, "secure")
    ctx = Grid(cfg).contexts[NODES[0]]
    reply = handle_train(Message(RecordDict({"config": ConfigRecord(config_items)}), dst_node_id=NODES[0],
                                 message_type=MessageType.TRAIN), ctx)
    assert reply.has_error() and why in reply.error.reason and f"node {NODES[0]}" in reply.error.reason
