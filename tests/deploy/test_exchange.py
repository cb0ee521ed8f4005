"""fedtune.exchange against Flower's own in-memory SuperLink state: a node that stops sending
heartbeats (a killed client) ends the wait as soon as the SuperLink marks it offline, and the
SuperLink's error reply is charged to that node, not to the SuperLink; a reply is taken within
a poll (0.2 s; Flower's deployed HttpGrid sleeps 3 s between asks, its in-memory one 0.1 s,
so the 3 s show only in deployment: benchmarks/bench_deploy_e2e.py); the deadline holds."""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedtune import exchange
from fedtune.server import initial_adapter
from tests.conftest import tiny_config

RUN_ID = 1  # the conftest task_identity's run


@pytest.fixture(scope="module")
def initial(tiny_path):
    return initial_adapter(tiny_config(), tiny_path)


def _link(beats: dict[str, float]) -> tuple[InMemoryGrid, object, dict[str, int]]:
    """A SuperLink state with one run and a node per name, each promising a heartbeat every
    ``beats[name]`` seconds (Flower marks it offline after 2 × that without one)."""
    factory = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(RUN_ID)
    run.primary_task_id, run.federation_id = 99, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)  # as flwr.simulation registers its run
    state.task_store[99] = Task(task_id=99, run_id=RUN_ID)
    nodes = {}
    for name, beat in beats.items():
        nodes[name] = state.create_node(NOOP_FLWR_AID, "owner", name.encode(), beat)
        assert state.activate_node(nodes[name], beat)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, state, nodes


def _answer(state, node: int, after: float) -> threading.Thread:
    """The client ``node``: takes the message waiting for it, answers it ``after`` s later."""
    def serve():
        deadline = time.monotonic() + 10
        while not (asked := state.get_message_ins(node_id=node, limit=None, run_id=RUN_ID)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(after)
        for msg in asked:
            reply = Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = reply.object_id  # as a SuperNode's push sets it
            assert state.store_message_res(reply)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _asks(nodes) -> list[Message]:
    TaskIdentity.node_id = SUPERLINK_NODE_ID  # messages from the ServerApp
    return [Message(RecordDict({"config": ConfigRecord({"q": 1})}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes]


def test_a_node_marked_offline_ends_the_wait_and_is_named(task_identity):
    grid, state, nodes = _link({"alive": 30.0, "killed": 0.5})  # 'killed' sends no heartbeat: offline after 1 s
    _answer(state, nodes["alive"], after=0.1)
    t0 = time.monotonic()
    replies = exchange.send_and_receive(grid, _asks(nodes.values()), timeout=60.0)
    waited = time.monotonic() - t0
    assert waited < 5.0, f"waited {waited:.1f} s for a node the SuperLink reported offline"
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == set(nodes.values()) and SUPERLINK_NODE_ID not in by_node
    assert not by_node[nodes["alive"]].has_error()
    dead = by_node[nodes["killed"]]
    assert dead.has_error() and "Node Unavailable" in dead.error.reason


def test_replies_come_within_a_poll_and_the_deadline_holds(task_identity):
    grid, state, nodes = _link({"a": 30.0, "b": 30.0, "silent": 30.0})  # 'silent' stays online, never answers
    _answer(state, nodes["a"], after=0.0)
    _answer(state, nodes["b"], after=0.3)
    t0 = time.monotonic()
    replies = exchange.send_and_receive(grid, _asks(nodes.values()), timeout=1.5)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 3.0
    assert {r.metadata.src_node_id for r in replies} == {nodes["a"], nodes["b"]}

    t0 = time.monotonic()
    _answer(state, nodes["a"], after=0.3)
    replies = exchange.send_and_receive(grid, _asks([nodes["a"]]), timeout=60.0)
    assert len(replies) == 1 and time.monotonic() - t0 < 1.5  # a poll after the answer


def test_a_pull_that_hangs_does_not_hold_the_deadline(task_identity):
    """Flower's pull of a reply whose objects never arrive (its client killed mid-upload) hangs
    until the SuperLink's 180 s push session expires; the wait still ends at its deadline."""
    grid, state, nodes = _link({"half-sent": 30.0})
    hang = threading.Event()
    real_pull = grid.pull_messages

    def pull_messages(ids):
        if state.message_ins_id_to_message_res_id:  # a reply is there: its objects "never arrive"
            hang.wait(30)
        return real_pull(ids)
    grid.pull_messages = pull_messages
    _answer(state, nodes["half-sent"], after=0.0)
    t0 = time.monotonic()
    try:
        replies = exchange.send_and_receive(grid, _asks(nodes.values()), timeout=1.0)
    finally:
        hang.set()
    assert replies == [] and time.monotonic() - t0 < 3.0


def test_key_stages_wait_the_stage_timeout_and_collect_the_round_timeout(tmp_path, initial, task_identity):
    """The real secure round over the in-process grid of tests/secagg/test_secagg_flower.py, one client
    silent from consistency on (killed after its masked update arrived): every key stage is
    sent with federation.stage_timeout, collect (training) with the round's timeout, and the
    silent client is dropped while its input stays in the sum."""
    from fedtune.secagg.flower import Encoding, secure_train
    from tests.secagg.test_secagg_flower import NODES, Grid, _cfg

    class Timed(Grid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            waits.setdefault(str(messages[0].content["config"]["secagg-stage"]), timeout)
            return super().send_and_receive(messages, timeout)

    waits: dict[str, float] = {}
    cfg = _cfg(tmp_path, "timed")
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(NODES))
    sec = secure_train(Timed(cfg, drop={NODES[3]: "consistency"}), NODES, 1, ArrayRecord(initial), enc,
                       degree=cfg.secagg.degree, threshold=0, timeout=600.0, stage_timeout=20.0)
    assert waits.pop("collect") == 600.0 and set(waits.values()) == {20.0}
    assert set(waits) == {"identify", "graph", "advertise", "share", "consistency", "unmask"}
    assert not sec.aborted and NODES[3] in sec.included and "'consistency'" in sec.lost[NODES[3]]
