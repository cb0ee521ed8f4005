"""No secure sum of fewer than secagg.min_inputs real inputs: refusals and dropouts count
out, below the floor the round aborts before any share is asked for, and a client refuses a
server that asks for a lower floor than its own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, RecordDict

from fedtune import config
from fedtune.secagg import SecAggAborted, SecAggClient, SecAggParams, SecAggServer, Stage
from fedtune.secagg.flower import Encoding, secure_train
from fedtune.server import initial_adapter
from tests.conftest import secagg_collect, tiny_config
from tests.secagg.test_secagg_flower import NODES, Grid, _close, _plain_average


def _core_round(real: dict[int, bool], min_inputs: int):
    """Advertise, share and collect for in-memory clients; ``real[c]`` says whether c trained."""
    ids = sorted(real)
    server = SecAggServer(SecAggParams(field_bits=20, length=8, min_inputs=min_inputs), ids)
    clients = {c: SecAggClient(c, server.advertise_request()) for c in ids}
    server.receive_advertise({c: clients[c].advertise_keys() for c in ids})
    server.receive_share({c: clients[c].share_keys(m) for c, m in server.share_requests().items()})
    zeros = np.zeros(8, dtype=np.uint32)
    replies = {c: secagg_collect(clients[c], m, zeros + (7 if real[c] else 0), real[c])
               for c, m in server.collect_requests().items()}
    return server, clients, replies


def test_three_clients_of_which_two_refuse_release_nothing():
    server, _, replies = _core_round({1: True, 2: False, 3: False}, min_inputs=2)
    with pytest.raises(SecAggAborted, match="only 1 real inputs .* min_inputs=2"):
        server.receive_collect(replies)
    assert server.stage is Stage.ABORTED
    with pytest.raises(SecAggAborted):  # the server never gets to ask for a share
        server.unmask_requests()


def test_a_reply_that_does_not_say_whether_it_is_real_is_rejected():
    server, _, replies = _core_round({1: True, 2: True, 3: True, 4: True}, min_inputs=2)
    del replies[4]["real"]
    server.receive_collect(replies)
    assert 4 not in server.active and "whether its input is real" in server.rejected[4]


def test_enough_real_inputs_sum_as_before():
    server, clients, replies = _core_round({1: True, 2: True, 3: False, 4: True}, min_inputs=3)
    server.receive_collect(replies)
    result = server.receive_unmask({c: clients[c].unmask(m) for c, m in server.unmask_requests().items()})
    assert result.clients == (1, 2, 3, 4) and result.real == (1, 2, 4)
    assert (result.total == 21).all()


# ---- through Flower, with real clients (budgets spent -> refusals) -------------------------------
@pytest.fixture(scope="module")
def initial(tiny_path):
    return initial_adapter(tiny_config(), tiny_path)


def _cfg(tmp_path, min_inputs=3):
    return tiny_config(run={"dir": str(tmp_path / "secure")}, privacy={"seed": 5}, federation={"clients": len(NODES)},
                       secagg={"enabled": True, "min_inputs": min_inputs})


def _refusing(grid: Grid, cfg, nodes):
    """``nodes`` get a budget below one round's ε: they refuse, in their own ledgers."""
    tight = cfg.replace(privacy={"budget": 1e-6})
    for n in nodes:
        old = grid.contexts[n]
        grid.contexts[n] = Context(run_id=old.run_id, node_id=n, node_config=old.node_config, state=RecordDict(),
                                   run_config=config.to_flat(tight))


def _secure(cfg, initial, grid, nodes, min_inputs):
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(nodes))
    return secure_train(grid, nodes, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0,
                        timeout=60, min_inputs=min_inputs)


def test_flower_round_of_three_with_two_refusals_releases_nothing(tmp_path, task_identity, initial):
    cfg = _cfg(tmp_path, min_inputs=2)
    grid = Grid(cfg)
    _refusing(grid, cfg, NODES[1:3])
    sec = _secure(cfg, initial, grid, NODES[:3], min_inputs=2)
    assert sec.aborted and "only 1 real inputs" in sec.aborted and sec.arrays is None and sec.included == []
    assert "unmask" not in {stage for stage, _, _ in grid.seen}  # no share was ever asked for


def test_a_refusal_counts_out_but_enough_others_still_aggregate(tmp_path, task_identity, initial):
    cfg = _cfg(tmp_path)
    grid = Grid(cfg)
    _refusing(grid, cfg, [NODES[3]])
    sec = _secure(cfg, initial, grid, NODES, min_inputs=3)
    assert not sec.aborted and sec.included == NODES and sec.real == NODES[:3]
    plain = _plain_average(tiny_config(run={"dir": str(tmp_path / "plain")}, privacy={"seed": 5},
                                       federation={"clients": len(NODES)}, secagg={"enabled": True}), initial, NODES[:3])
    _close(sec.arrays, plain, cfg, len(NODES))


def test_a_client_refuses_a_server_asking_for_a_lower_floor_than_its_own(tmp_path, task_identity, initial):
    cfg = _cfg(tmp_path, min_inputs=3)  # every client's own floor: 3
    grid = Grid(cfg)
    sec = _secure(cfg, initial, grid, NODES, min_inputs=2)
    assert sec.aborted and sec.arrays is None
    assert all("this client's secagg.min_inputs is 3" in sec.lost[n] for n in NODES), sec.lost


@pytest.mark.parametrize("value, why", [(1, "must be in 2..4"), (5, "must be in 2..4")])
def test_config_refuses_a_floor_below_two_or_above_the_clients_per_round(value, why):
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match=f"secagg.min_inputs {why}"):
        tiny_config(federation={"clients": 4}, secagg={"enabled": True, "min_inputs": value})


# ---- distributed DP: a refusing client still adds its noise --------------------------------------
def test_a_ddg_round_with_one_refusal_completes_with_its_noise_in_the_sum(tmp_path, task_identity, initial):
    """With client_dp.min_clients = all, a refusal used to drop its noise and abort the round.
    Now the refuser masks zero plus its own noise: the sum with it minus the sum without it is
    exactly that noise, and the spend counts 4 clients' noise."""
    from fedtune.client.setup import reproducible_seed, setup
    from tests.privacy.test_distributed_dp import _ddg_cfg, _ddg_round

    refuser = NODES[3]
    cfg = _ddg_cfg(tmp_path, "ddg", min_clients=4)
    grid = Grid(cfg)
    _refusing(grid, cfg, [refuser])
    sec, ledger, dplan = _ddg_round(cfg, tmp_path / "ddg", grid, initial)
    assert not sec.aborted and sec.included == NODES and sec.real == NODES[:3]
    (spend,) = ledger.spends()
    assert spend["clients_in_sum"] == 4 and spend["noise_multiplier"] == pytest.approx(dplan.noise_multiplier(4))

    # The same round without the refuser: fresh clients of the same seeded run train the same
    # updates with the same noise (the first ones would not resend into this smaller set: one
    # release, one sum); this server skips the min_clients check, to see what the refuser added.
    encoding = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=4, ddg=dplan)
    again = _ddg_cfg(tmp_path, "ddg-again", min_clients=4)
    sec3 = secure_train(Grid(again), NODES[:3], 1, ArrayRecord(initial), encoding, degree=cfg.secagg.degree,
                        threshold=0, timeout=60)
    assert not sec3.aborted and sec3.included == NODES[:3]
    enc = encoding.coder()
    seed = reproducible_seed(setup(grid.contexts[refuser]), 1, "encoding")
    noise = enc.encode(np.zeros(dplan.dim), 0.0, seed=seed)
    expected = enc.decode(noise, 1)[0] / dplan.denominator
    assert np.abs(expected).max() > 0  # the refuser's noise is not nothing
    got = np.concatenate([(sec.arrays[k].numpy().astype(np.float64) - sec3.arrays[k].numpy()).reshape(-1)
                          for k in initial])
    np.testing.assert_allclose(got, expected, atol=1e-6)



def test_nodes_beyond_what_the_field_holds_are_turned_away_before_the_round(tmp_path, task_identity, initial):
    cfg = _cfg(tmp_path)
    grid = Grid(cfg)
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=3)  # a field for 3 sums
    sec = secure_train(grid, NODES, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0, timeout=60)
    assert not sec.aborted and sec.included == NODES[:3] and "turned away" in sec.lost[NODES[3]]
    assert {stage for stage, node, _ in grid.seen if node == NODES[3]} == {"identify"}  # never got the setup


def test_a_client_refuses_a_setup_without_a_roster_or_with_more_clients_than_the_field_holds(tmp_path, task_identity):
    from flwr.app import Message, MessageType

    from fedtune.client import handle_train
    from fedtune.secagg import SecAggParams, SecAggServer, identity
    from fedtune.secagg.flower import ENCODING, STAGE, to_record
    from fedtune.secagg.roster import node_identity

    cfg = _cfg(tmp_path)
    ctx = Grid(cfg).contexts[NODES[0]]
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=3)
    roster = {n: identity.public_bytes(identity.generate()) for n in NODES}
    roster[NODES[0]] = identity.public_bytes(node_identity(ctx))
    params = SecAggParams(field_bits=enc.coder().field_bits, length=8, min_inputs=3)
    for server, why in ((SecAggServer(params, NODES), "has no identity roster"),  # the honest-but-curious mode
                        (SecAggServer(params, NODES, roster=roster), "does not fit its field")):  # 4 clients > 3
        setup = to_record(server.advertise_request(), **{STAGE: "advertise", "server-round": 1, ENCODING: enc.to_json()})
        reply = handle_train(Message(RecordDict({"config": setup}), dst_node_id=NODES[0],
                                     message_type=MessageType.TRAIN), ctx)
        assert reply.has_error() and why in reply.error.reason, reply.error.reason
