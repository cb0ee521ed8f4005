"""The neighbour graph's seed against a lying server, through the real ClientApp handlers: a
revealed seed that does not match its commitment, a graph of the server's choosing, different
graphs told to different clients, altered or withheld nonces. Every client refuses in one line
naming the stage and the party, before it trains: nothing is masked, revealed or spent.
And names bound to keys: a deployed client (registered key) before a ServerApp without the
keys folder fails the round loudly instead of falling back to self-reported names."""

from __future__ import annotations

import inspect
import os

from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedtune.privacy import Ledger
from fedtune.runfolder import ledger_path
from fedtune.secagg import coin
from fedtune.secagg.flower import from_record, to_record
from tests.secagg.test_secagg_flower import NODES, Grid, _cfg, _secure, initial  # noqa: F401 (fixture)


def _rewrite(msg: Message, node: int, change) -> Message:
    """The message with its protocol body changed by ``change(body)``."""
    body = from_record(msg.content["config"])
    change(body)
    extra = {k: v for k, v in msg.content["config"].items() if "." not in k and k not in body}
    content = {"config": to_record(body, **extra)}
    if "arrays" in msg.content.array_records:
        content["arrays"] = msg.content["arrays"]
    return Message(RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN)


def _nothing_spent(tmp_path) -> None:
    for i in range(len(NODES)):
        assert Ledger(ledger_path(tmp_path / "secure", f"client-{i}")).spends() == []


def _run(tmp_path, initial, tamper, drop=None):
    cfg = _cfg(tmp_path, "secure")
    grid = Grid(cfg, drop=drop, tamper=tamper)
    sec = _secure(cfg, initial, grid)
    assert sec.aborted and sec.arrays is None and not sec.included
    assert not any(stage == "collect" for stage, _, _ in grid.seen)  # no client was asked to train or mask
    _nothing_spent(tmp_path)
    return sec


def test_a_revealed_seed_that_does_not_match_its_commitment_is_refused(tmp_path, task_identity, initial):
    def tamper(stage, node, msg):
        if stage == "advertise":  # the server reveals another seed than it committed to
            return _rewrite(msg, node, lambda b: b.update(server_seed=os.urandom(32)))
        return msg

    sec = _run(tmp_path, initial, tamper)
    for n in NODES:
        assert f"client {n}: stage 'advertise': the server's revealed graph seed does not match the commitment" \
            in sec.lost[n]


def test_a_graph_of_the_servers_choosing_is_refused(tmp_path, task_identity, initial):
    chosen = os.urandom(32)  # e.g. one that puts a target among the server's own nodes

    def tamper(stage, node, msg):
        return _rewrite(msg, node, lambda b: b.update(graph_seed=chosen)) if stage == "advertise" else msg

    sec = _run(tmp_path, initial, tamper)
    assert all("the server's graph seed is not the one drawn from its revealed seed" in sec.lost[n] for n in NODES)


def test_different_graphs_told_to_different_clients_are_refused_at_share(tmp_path, task_identity, initial,
                                                                        monkeypatch):
    """Half the clients get a second, self-consistent coin (its own commitment, seed and graph
    seed): each passes its own checks, but the two halves' setups differ, so their signatures
    on each other's keys fail and no one sends a share. (The lying server forwards the keys
    without checking their signatures itself.)"""
    from fedtune.secagg.server import SecAggServer

    def forward(self, cid, kind, sig, label, *fields):
        self._sigs[kind][cid] = sig
        return True

    monkeypatch.setattr(SecAggServer, "_signed", forward)
    other = os.urandom(32)
    half = set(NODES[:2])

    def tamper(stage, node, msg):
        if node not in half:
            return msg
        if stage == "identify":
            return _rewrite(msg, node, lambda b: b.update(graph_commit=coin.commit(other)))
        if stage == "advertise":
            return _rewrite(msg, node, lambda b: b.update(server_seed=other, graph_seed=coin.draw(other, b["nonces"])))
        return msg

    sec = _run(tmp_path, initial, tamper)
    for n in NODES:
        assert f"client {n}: stage 'share'" in sec.lost[n] and "not signed by its identity key" in sec.lost[n]
        named = int(sec.lost[n].split("the keys the server gave for client ")[1].split()[0])
        assert (named in half) != (n in half)  # the party named is one told the other graph


def test_a_nonce_altered_after_the_commitments_were_fixed_is_refused(tmp_path, task_identity, initial):
    target = NODES[2]

    def tamper(stage, node, msg):
        if stage == "advertise":  # one client's nonce replaced (e.g. by one ground to place the target)
            return _rewrite(msg, node, lambda b: b["nonces"].update({target: os.urandom(32)}))
        return msg

    sec = _run(tmp_path, initial, tamper)
    for n in NODES:
        assert f"client {n}: stage 'advertise': the graph nonces in the server's setup are not the ones committed " \
               "to before stage 'graph'" in sec.lost[n]


def test_a_client_left_out_of_the_graph_seed_refuses(tmp_path, task_identity, initial):
    victim = NODES[1]

    def tamper(stage, node, msg):
        if stage == "advertise" and node == victim:  # its nonce swapped for another (commitments and seed to match)
            def change(b):
                b["nonces"][victim] = os.urandom(32)
                b["graph_seed"] = coin.draw(b["server_seed"], b["nonces"])
            return _rewrite(msg, node, change)
        return msg

    cfg = _cfg(tmp_path, "secure")
    sec = _secure(cfg, initial, Grid(cfg, tamper=tamper))  # the others' setups are honest: they go on
    assert f"client {victim}: stage 'advertise': the graph nonces in the server's setup are not the ones" \
        in sec.lost[victim] and victim not in sec.included
    assert Ledger(ledger_path(tmp_path / "secure", "client-1")).spends() == []


def test_a_node_that_commits_and_does_not_reveal_aborts_the_round(tmp_path, task_identity, initial):
    sec = _run(tmp_path, initial, None, drop={NODES[3]: "graph"})
    assert f"stage 'graph': node {NODES[3]} did not reveal the nonce it committed to" in sec.aborted


# ---- names bound to keys in deployment --------------------------------------------------------
def test_a_registered_client_before_a_server_without_the_keys_folder_fails_the_round(tmp_path, task_identity,
                                                                                      initial):
    from fedtune.certs import make_client_key
    from fedtune.secagg.flower import Encoding, secure_train
    from fedtune.secagg.roster import registered_check

    private, _ = make_client_key(tmp_path / "keys", "client-1")
    cfg = _cfg(tmp_path, "secure")
    grid = Grid(cfg)
    grid.contexts[NODES[1]].node_config["identity-key"] = str(private)  # it signs with its registered key
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(NODES))
    sec = secure_train(grid, NODES, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0,
                       timeout=60, admit=registered_check(""))  # FEDTUNE_CLIENT_KEYS absent
    assert sec.aborted.startswith(f"secure aggregation: stage 'identify': node {NODES[1]} ('client-1') holds a "
                                  "registered key (a deployment), but this ServerApp has no FEDTUNE_CLIENT_KEYS folder")
    assert not any(stage == "graph" for stage, _, _ in grid.seen)
    # With the folder, the same node is admitted under its name; the unregistered ones are not.
    grid = Grid(cfg)
    grid.contexts[NODES[1]].node_config["identity-key"] = str(private)
    sec = secure_train(grid, NODES, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0,
                       timeout=60, admit=registered_check(str(tmp_path / "keys")))
    assert NODES[1] not in sec.lost and sec.names[NODES[1]] == "client-1"
    assert all("has no registered key" in sec.lost[n] for n in NODES if n != NODES[1])


def test_flower_hands_the_superlinks_environment_down_to_the_serverapp():
    """fedtune server start sets FEDTUNE_CLIENT_KEYS for flower-superlink; Flower 1.42 starts
    SuperExec (superlink/cli/flower_superlink.py) and SuperExec starts flwr-serverapp
    (supercore/superexec/executor/subprocess_executor.py) with subprocess.Popen and no env=,
    so both inherit it, and flwr-serverapp runs the ServerApp in its own process. Pinned
    here: a Flower upgrade that starts them with a fresh environment fails this test."""
    import importlib

    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    subprocess_executor = importlib.import_module("flwr.supercore.superexec.executor.subprocess_executor")

    for source in (inspect.getsource(flower_superlink.SuperLinkLifespan._start_superexec_if_needed),
                   inspect.getsource(subprocess_executor.SubprocessExecutor.launch)):
        assert "subprocess.Popen(" in source and "env=" not in source
