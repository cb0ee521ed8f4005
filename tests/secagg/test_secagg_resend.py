"""One release, one sum: a resent update (a restarted server asking for a round again) is
masked only into a sum over the very input set of its first sum, with every real input a
resend bound to that set; so the second sum is the first again. Tested as the attacker: a
server that resumes with a smaller or different set of clients to subtract two sums."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedtune import release
from fedtune.runfolder import release_path
from fedtune.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer, identity
from tests.secagg.test_secagg_flower import NODES, Grid, _cfg, initial  # noqa: F401 (fixture)

M, LENGTH = 20, 16


class Session:
    """A secure round of ``ids`` (same identity keys every session) up to the consistency stage."""

    def __init__(self, keys, ids, inputs, bound=None, real=None):
        roster = {c: identity.public_bytes(keys[c]) for c in ids}
        self.server = SecAggServer(SecAggParams(field_bits=M, length=LENGTH, round=1), ids, roster=roster)
        setup = self.server.advertise_request()
        self.clients = {c: SecAggClient(c, setup, keys[c]) for c in ids}
        srv, cl, real = self.server, self.clients, real or {}
        srv.receive_advertise({c: cl[c].advertise_keys() for c in ids})
        srv.receive_share({c: cl[c].share_keys(m) for c, m in srv.share_requests().items()})
        replies = {}
        for c, m in srv.collect_requests().items():
            cl[c].receive_shares(m)
            real_c = real.get(c, True)
            replies[c] = cl[c].masked_input(inputs[c] if real_c else inputs[c] * 0, real_c, (bound or {}).get(c, b""))
        srv.receive_collect(replies)
        self.errors: dict[int, str] = {}

    def finish(self):
        srv = self.server
        signed = {}
        for c, m in srv.consistency_requests().items():
            try:
                signed[c] = self.clients[c].consistency(m)
            except SecAggError as e:
                self.errors[c] = str(e)
        srv.receive_consistency(signed)  # aborts without a quorum: then nothing is ever unmasked
        return srv.receive_unmask({c: self.clients[c].unmask(m) for c, m in srv.unmask_requests().items()})


IDS = [1, 2, 3, 4, 5]


@pytest.fixture()
def first():
    keys = {c: identity.generate() for c in IDS}
    rng = np.random.default_rng(1)
    inputs = {c: rng.integers(0, 1 << 12, LENGTH).astype(np.uint32) for c in IDS}
    s = Session(keys, IDS, inputs)
    total = s.finish().total
    sets = {c: s.clients[c].input_set for c in IDS}
    assert len(set(sets.values())) == 1  # every client signed, and records, the same input set
    return keys, inputs, total, sets


def test_without_the_binding_a_resume_with_fewer_clients_reveals_the_left_out_update(first):
    keys, inputs, total, _ = first
    again = Session(keys, IDS[:4], inputs).finish().total  # the resends, unbound (the old behaviour)
    assert np.array_equal((total.astype(np.int64) - again) % (1 << M), inputs[5])  # why the binding exists


def test_a_resume_with_fewer_clients_gets_no_second_sum(first):
    keys, inputs, _, sets = first
    s = Session(keys, IDS[:4], inputs, bound=sets)  # a smaller clients_per_round after the restart
    with pytest.raises(SecAggError, match="only 0 survivors signed"):
        s.finish()
    for c in IDS[:4]:
        assert "stage 'consistency'" in s.errors[c] and "revealing nothing" in s.errors[c]
        assert not s.clients[c]._held  # its neighbours' shares are gone: nothing can be revealed later


def test_a_different_subset_or_a_fresh_input_in_the_set_gets_no_second_sum(first):
    keys, inputs, _, sets = first
    keys[6] = identity.generate()
    inputs[6] = inputs[5] * 0 + 7
    s = Session(keys, [1, 2, 3, 4, 6], inputs, bound=sets)  # client 5 swapped for a new one (fresh input)
    with pytest.raises(SecAggError, match="only 0 survivors signed"):
        s.finish()
    assert all("input is not a resend bound to this very input set" in s.errors[c] for c in [1, 2, 3, 4])


def test_a_client_turned_refuser_changes_the_set(first):
    keys, inputs, _, sets = first
    s = Session(keys, IDS, inputs, bound={c: sets[c] for c in IDS[:4]}, real={5: False})
    with pytest.raises(SecAggError, match="only 0 survivors signed"):
        s.finish()


def test_the_same_set_of_the_same_resends_gives_the_same_sum(first):
    keys, inputs, total, sets = first
    assert np.array_equal(Session(keys, IDS, inputs, bound=sets).finish().total, total)


def test_through_flower_a_resume_with_fewer_clients_or_an_unsigned_release_gets_no_second_sum(
        tmp_path, task_identity, initial):
    """Session 1: four clients, one of which never signs the input set (it drops at the
    consistency stage; its input stays in the sum). Session 2, after a restart, with three of
    them: they refuse at consistency. Session 3 with all four: the one whose release has no
    signed set refuses to mask it again, the others refuse the smaller set."""
    from fedtune.secagg.flower import Encoding, secure_train

    cfg = _cfg(tmp_path, "secure").replace(privacy={"seed": -1})
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(NODES))

    def session(grid, nodes):
        return secure_train(grid, nodes, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0,
                            timeout=60)

    one = session(Grid(cfg, drop={NODES[3]: "consistency"}), NODES)
    assert not one.aborted and one.included == NODES
    kept = {n: release.load(release_path(tmp_path / "secure", f"client-{i}")) for i, n in enumerate(NODES)}
    assert all(kept[n].input_set for n in NODES[:3]) and kept[NODES[3]].input_set == ""
    two = session(Grid(cfg), NODES[:3])
    assert two.aborted and two.arrays is None
    assert all("stage 'consistency'" in two.lost[n] and "revealing nothing" in two.lost[n] for n in NODES[:3])
    three = session(Grid(cfg), NODES)
    assert three.aborted and three.arrays is None
    assert "whose input set it never signed; it will not mask it into another" in three.lost[NODES[3]]
