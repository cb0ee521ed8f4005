"""SecAgg+ against a malicious server with corrupted clients of its own, tested as the attacker.

Seven clients on the full graph (k = 6: t = 4, quorum 4 by default); the server controls
clients 6 and 7 (it drives their state machines: they endorse every statement and hand over
every share they hold). It tells honest clients 2 and 3 "the target survived" (statement A)
and honest 4 and 5 "the target dropped" (statement B); each statement reaches the quorum with
the corrupted clients' endorsements, so 2 and 3 reveal the target's self-mask shares and 4 and
5 its mask-key shares: with the corrupted clients' own, t of each, though only 2 < t of the
target's neighbours are corrupted. At the default colluders = 0 the attacker recovers the
target's input (the documented gap); with colluders = 2 the clients require t = 5 and quorum
5, the honest clients refuse and nothing is recovered."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.deploy.policy import Policy
from fedtune.errors import FedtuneError
from fedtune.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer, Stage, crypto, identity
from fedtune.secagg.protocol import pair_mask, self_mask, sign
from tests.conftest import tiny_config
from tests.secagg.test_secagg_malicious import Round

IDS, TARGET, CORRUPT = [1, 2, 3, 4, 5, 6, 7], 1, (6, 7)
A, B = [1, 2, 3, 6, 7], [2, 3, 4, 5, 6, 7]  # A: "the target survived" (told to 2, 3); B: "it dropped" (to 4, 5)
TOLD = {2: A, 3: A, 4: B, 5: B}


def _round(colluders: int) -> Round:
    """Round with the server's setup and every client's own c = ``colluders``."""
    r = Round(roster=True, ids=IDS)
    r.server = SecAggServer(SecAggParams(field_bits=20, length=16, colluders=colluders), IDS, roster=r.roster)
    setup = r.server.advertise_request()
    r.clients = {i: SecAggClient(i, setup, r.keys[i], colluders=colluders) for i in IDS}
    return r


def _statement(r: Round, told: list[int], to: int) -> dict:
    """The consistency request for statement ``told``, as the server would build it for ``to``."""
    srv, near = r.server, [j for j in told if j != to]
    return {"survivors": told, "real": told, "masked_with": {j: srv._masked_with[j] for j in told},
            "declarations": {j: srv._tags["decl"][j][to] for j in near}}


def _endorsement(r: Round, c: int, told: list[int], to: int) -> tuple[bytes, bytes]:
    """Corrupted client c's signature on ``told`` and its tag on it for ``to``: made with its own
    identity and pairwise keys, skipping the checks an honest client makes."""
    statement, digest = (told, told, []), r.server.setup.digest
    data = identity.statement(identity.SURVIVORS, digest, *statement)
    return identity.sign(r.keys[c], identity.SURVIVORS, digest, *statement), r.clients[c]._tag(to, data)


def _split(r: Round) -> dict[int, dict]:
    """The attack: each honest neighbour of the target signs the statement it is told, sees it
    endorsed by the corrupted clients (and its honest co-signer), and is asked for the shares that
    statement allows. The corrupted clients add both shares they hold of the target."""
    signed = {h: r.ask(h, "consistency", _statement(r, told, h)) for h, told in TOLD.items()}
    revealed = {}
    for honest, told in TOLD.items():
        if signed[honest] is None:
            continue
        co = [h for h, t in TOLD.items() if t is told and h != honest and signed[h] is not None]
        ends = {c: _endorsement(r, c, told, honest) for c in CORRUPT}
        held = [j for j in IDS if j != honest]
        msg = {"survivors": [j for j in held if j in told], "dropped": [j for j in held if j not in told],
               "signatures": {**{c: e[0] for c, e in ends.items()}, **{h: signed[h]["sig"] for h in co}},
               "tags": {**{c: e[1] for c, e in ends.items()}, **{h: signed[h]["tags"][honest] for h in co}}}
        if (out := r.ask(honest, "unmask", msg)) is not None:
            revealed[honest] = out
    for c in CORRUPT:
        held = r.clients[c]._held[TARGET]
        revealed[c] = {"b_shares": {TARGET: held.b_share}, "sk_shares": {TARGET: held.sk_share}}
    return revealed


def _recover(r: Round, revealed: dict[int, dict]) -> np.ndarray | None:
    """The target's input from its self-mask seed and mask key, if t shares of each came in."""
    srv, setup = r.server, r.server.setup
    t = setup.threshold

    def rebuild(kind):
        got = [(srv._holders[TARGET].index(h) + 1, rep[kind][TARGET]) for h, rep in revealed.items()
               if TARGET in rep[kind]]
        return crypto.combine_shares(sorted(got)[:t]) if len(got) >= t else None

    b, sk = rebuild("b_shares"), rebuild("sk_shares")
    if b is None or sk is None:
        return None
    y = srv._masked[TARGET].astype(np.int64) - self_mask(setup, TARGET, b).astype(np.int64)
    for j in IDS:
        if j != TARGET:
            mask = pair_mask(setup, TARGET, crypto.private_from_bytes(sk), j, srv._pk_mask[j]).astype(np.int64)
            y -= sign(TARGET, j) * mask
    return (y % (1 << setup.params.field_bits)).astype(np.uint32)


def test_at_colluders_0_a_server_with_two_clients_splits_the_survivors_and_recovers_the_target():
    r = _round(0)
    assert (r.server.setup.threshold, r.server.setup.quorum) == (4, 4)  # 2 corrupted neighbours < t
    r.to_collect()
    revealed = _split(r)
    assert set(revealed) == set(IDS) - {TARGET} and not r.errors  # every honest one saw a quorum and revealed
    recovered = _recover(r, revealed)
    assert recovered is not None and np.array_equal(recovered, r.inputs[TARGET])  # the gap colluders closes


def test_at_colluders_2_the_honest_clients_refuse_the_split_and_nothing_is_recovered():
    r = _round(2)
    assert (r.server.setup.threshold, r.server.setup.quorum) == (5, 5)
    r.to_collect()
    revealed = _split(r)
    assert set(revealed) == set(CORRUPT) and _recover(r, revealed) is None
    for honest in (2, 3):  # A leaves the target 4 surviving neighbours, t = 5: refused before signing
        assert "stage 'consistency'" in r.errors[honest] and "t=5 needed" in r.errors[honest]
    for honest in (4, 5):  # B is signed by 4, 5, 6, 7: 4 endorsements, 5 needed
        assert "stage 'unmask': only 4 survivors signed the survivor set" in r.errors[honest]
        assert "5 needed" in r.errors[honest] and "revealing nothing" in r.errors[honest]
    for honest in TOLD:
        assert r.clients[honest].stage is Stage.ABORTED and not r.clients[honest]._held


def test_an_honest_round_at_colluders_2_still_sums_exactly():
    r = _round(2)
    r.to_collect()
    result = r.honest_finish()
    assert result.clients == tuple(IDS) and not r.errors
    assert np.array_equal(result.total, sum(r.inputs[c].astype(np.uint64) for c in IDS) % (1 << 20))


@pytest.mark.parametrize("threshold", [None, 3])
def test_a_setup_below_the_clients_colluders_is_refused_at_advertise(threshold):
    """The server's setup says colluders = 0 (t = 3, quorum 3), or claims 2 with t = 3; a client
    whose own c is 2 refuses before it makes a key."""
    r = Round(roster=True, ids=IDS)
    params = SecAggParams(field_bits=20, length=16, degree=4, threshold=threshold,
                          colluders=0 if threshold is None else 2)
    setup = SecAggServer(params, IDS, roster=r.roster).advertise_request()
    with pytest.raises(SecAggError) as e:
        SecAggClient(2, setup, r.keys[2], colluders=2)
    text = str(e.value)
    assert text.startswith("client 2: stage 'advertise': the server's setup (t=3 of 4 neighbours")
    assert "tolerating 2 colluding clients needs (t >= 4, quorum >= 5)" in text
    assert "set secagg.colluders = 2" in text and text.endswith("refusing the round, nothing revealed")


def test_colluders_the_graph_cannot_tolerate_are_refused():
    setup = SecAggServer(SecAggParams(field_bits=20, length=16), IDS).advertise_request()
    with pytest.raises(SecAggError, match="tolerating 6 colluding clients needs t >= 7 of each client.s 6 neighbours"):
        SecAggClient(2, setup, colluders=6)


def test_a_client_policy_minimum_beats_the_runs_lower_colluders(monkeypatch):
    """A deployed client takes max(the run's secagg.colluders, its policy.secagg_colluders): a
    server sending a run with 0 cannot lower the operator's 2 (and a run may ask for more)."""
    from fedtune.client import secure

    node_config = Policy(secagg=True, secagg_colluders=2).check("client.toml").to_node_config()
    policy = Policy.from_node_config(node_config)
    assert policy.secagg_colluders == 2
    monkeypatch.setattr(secure, "deployed_node", lambda nc: SimpleNamespace(policy=policy))
    for run, expected in ((0, 2), (3, 3)):
        cfg = tiny_config(federation={"clients": 5}, secagg={"enabled": True, "colluders": run})
        monkeypatch.setattr(secure, "config_from_context", lambda context, cfg=cfg: cfg)
        assert secure.colluders(SimpleNamespace(node_config=node_config)) == expected
    with pytest.raises(FedtuneError, match="policy.secagg_colluders must be an integer >= 0"):
        Policy(secagg=True, secagg_colluders=-1).check("client.toml")
    with pytest.raises(FedtuneError, match="policy.secagg_colluders applies under policy.secagg = true"):
        Policy(secagg_colluders=1).check("client.toml")


@pytest.mark.parametrize("secagg, message", [
    ({"colluders": -1}, "secagg.colluders must be in 0..3 with 5 clients per round"),
    ({"colluders": 4}, "secagg.colluders must be in 0..3 with 5 clients per round"),
    ({"colluders": 2, "threshold": 3}, "secagg.threshold = 3 is below the 4 that secagg.colluders = 2 needs"),
])
def test_config_rejects_colluders_the_round_cannot_meet(secagg, message):
    with pytest.raises(FedtuneError, match=message):
        tiny_config(federation={"clients": 5}, secagg={"enabled": True, **secagg})
    assert tiny_config(federation={"clients": 5}, secagg={"enabled": True, "colluders": 3}).secagg.threshold == 0


# ---- through Flower: the real ClientApp handlers, each client's c from its own run config ----------------------
@pytest.mark.parametrize("server_colluders", [0, 1])
def test_through_flower_a_server_below_the_clients_colluders_is_refused_at_advertise(tmp_path, task_identity,
                                                                                      tiny_path, server_colluders):
    """4 clients with secagg.colluders = 1 (t = 3 of 3, quorum 3): a server announcing 0 gets a
    one-line refusal from each at advertise and sums nothing; one announcing 1 sums all four."""
    from flwr.app import ArrayRecord

    from fedtune.secagg.flower import Encoding, secure_train
    from fedtune.server import initial_adapter
    from tests.secagg.test_secagg_flower import NODES, Grid

    cfg = tiny_config(run={"dir": str(tmp_path / "secure")}, privacy={"seed": 5}, federation={"clients": len(NODES)},
                      secagg={"enabled": True, "colluders": 1})
    grid, g = Grid(cfg), cfg.secagg
    enc = Encoding(g.bits, g.clip, g.max_weight, n_max=len(NODES))
    sec = secure_train(grid, NODES, 1, ArrayRecord(initial_adapter(tiny_config(), tiny_path)), enc, degree=g.degree,
                       threshold=0, timeout=60, min_inputs=g.min_inputs, colluders=server_colluders)
    if server_colluders == 0:
        assert sec.aborted and sec.arrays is None and sec.included == []
        assert all("stage 'advertise'" in sec.lost[n] and "colluders=0" in sec.lost[n] and
                   "set secagg.colluders = 1" in sec.lost[n] for n in NODES), sec.lost
        assert "share" not in {stage for stage, _, _ in grid.seen}  # no key was ever exchanged
    else:
        assert not sec.aborted and sec.included == NODES
