"""SecAgg+ against a malicious server that unmasks a *part* of the survivor set, tested as the
attacker. On a sparse neighbour graph (a ring of degree 8) a server that keeps the shares of
two clients from the arc between them, and lets the clients beyond the arc drop, can unmask
the sum of that arc's few inputs alone, while every client signed the same survivor set:
without the malicious-server checks the attack below recovers the arc's exact sum (so the test
can fail; fedtune's checks before this test's commit let it through too); with them, each
client checks, in its own declaration and its surviving neighbours' (tagged), that each
masked with every surviving neighbour and has at least t of them, and refuses: nothing is
recovered. Also:
a client is shown only its surviving neighbours' declarations, and refuses a
consistency request that leaves one out or shows another client's in its place."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from fedtune.secagg import SecAggAborted, SecAggClient, SecAggError, SecAggParams, SecAggServer, Stage, crypto, identity
from fedtune.secagg.protocol import pair_mask, self_mask, sign
from tests.conftest import secagg_collect
from tests.secagg.test_secagg_malicious import Round

N, M = 22, 24


class ArcAttack:
    """Ring positions 0..21 (the graph's own order): the arc 1..5 is the target, 0 and 6 its edge
    nodes, 7..10 and 18..21 drop at collect (so the arc has no other surviving neighbours)."""

    def __init__(self, roster: bool):
        ids = list(range(1, N + 1))
        keys = {c: identity.generate() for c in ids}
        self.roster = {c: identity.public_bytes(k) for c, k in keys.items()} if roster else {}
        srv = SecAggServer(SecAggParams(field_bits=M, length=16, degree=8), ids, bytes(32), roster=self.roster)
        self.server = srv
        self.clients = {c: SecAggClient(c, srv.advertise_request(), keys[c] if roster else None) for c in ids}
        ring = sorted(ids, key=lambda c: (hmac.new(srv.setup.graph_seed, c.to_bytes(8, "big"), hashlib.sha256).digest(), c))
        assert all(srv.setup.neighbours[ring[p]] == {ring[(p + d) % N] for d in (-4, -3, -2, -1, 1, 2, 3, 4)}
                   for p in range(N))  # the ring of degree 8 the docs describe
        self.arc, self.edge = ring[1:6], {ring[0], ring[6], ring[11], ring[17]}
        self.gone = set(ring[7:11] + ring[18:22])
        rng = np.random.default_rng(3)
        self.inputs = {c: rng.integers(0, 1 << 16, 16).astype(np.uint32) for c in ids}
        self.errors: dict[int, str] = {}

    ask = Round.ask  # a client's answer, or its refusal recorded in self.errors

    def run(self) -> dict[int, dict]:
        """The lying server's round; what each client revealed."""
        srv, cl = self.server, self.clients
        srv.receive_advertise({c: cl[c].advertise_keys() for c in cl})
        srv.receive_share({c: cl[c].share_keys(m) for c, m in srv.share_requests().items()})
        requests = srv.collect_requests()
        for h in self.arc:  # the lie: the edge nodes' shares never reach the arc, so it does not mask with them
            for o in self.edge:
                requests[h]["ciphertexts"].pop(o, None)
                requests[h]["commitments"].pop(o, None)
            srv._forwarded[h] -= self.edge
        srv._need_holders = lambda *a: None  # the edge nodes' self-masks are never rebuilt: the attacker does not care
        srv.receive_collect({c: secagg_collect(cl[c], m, self.inputs[c]) for c, m in requests.items()
                             if c not in self.gone})
        if srv.stage is Stage.CONSISTENCY:
            requests = srv.consistency_requests()
            for c, m in requests.items():  # O(degree): its surviving neighbours' declarations (its own it knows)
                assert set(m["declarations"]) == srv.setup.neighbours[c] & srv.active
            try:
                srv.receive_consistency({c: r for c, m in requests.items() if (r := self.ask(c, "consistency", m))})
            except SecAggAborted:
                return {}  # no quorum signed: nothing is asked for
        return {c: r for c, m in srv.unmask_requests().items() if (r := self.ask(c, "unmask", m)) is not None}

    def recover(self, revealed: dict[int, dict]) -> np.ndarray | None:
        """The arc's sum from the masked inputs and the revealed shares, if the server got enough."""
        srv, setup, t = self.server, self.server.setup, self.server.setup.threshold

        def rebuild(owner, kind):
            got = [(srv._holders[owner].index(h) + 1, r[kind][owner]) for h, r in revealed.items() if owner in r[kind]]
            return crypto.combine_shares(sorted(got)[:t]) if len(got) >= t else None

        total = np.zeros(16, dtype=np.int64)
        for z in self.arc:
            b = rebuild(z, "b_shares")
            if b is None:
                return None
            total += srv._masked[z].astype(np.int64) - self_mask(setup, z, b).astype(np.int64)
        for d in sorted(self.gone):
            raw = rebuild(d, "sk_shares")
            if raw is None:
                return None
            for z in self.arc:
                if d in srv._forwarded[z]:  # z masked with d: undo it
                    mask = pair_mask(setup, d, crypto.private_from_bytes(raw), z, srv._pk_mask[z]).astype(np.int64)
                    total -= sign(z, d) * mask
        return (total % (1 << M)).astype(np.uint32)

    def arc_sum(self) -> np.ndarray:
        return (sum(self.inputs[z].astype(np.int64) for z in self.arc) % (1 << M)).astype(np.uint32)


def test_without_the_checks_a_server_unmasks_the_sum_of_an_arc_of_five():
    a = ArcAttack(roster=False)
    recovered = a.recover(a.run())
    assert recovered is not None and np.array_equal(recovered, a.arc_sum())  # five inputs of 14 survivors


def test_with_the_checks_the_arc_reveals_nothing_and_nothing_is_recovered():
    a = ArcAttack(roster=True)
    revealed = a.run()
    assert a.recover(revealed) is None
    assert revealed == {}
    for z in a.arc:  # each names the first client it checks (itself or a neighbour) that fails
        assert "stage 'consistency'" in a.errors[z] and "revealing nothing" in a.errors[z]
        assert "(its shares never reached it)" in a.errors[z] or "only 4 of its neighbours survived" in a.errors[z]
        assert a.clients[z].stage is Stage.ABORTED and not a.clients[z]._held
    said = " ".join(a.errors.values())  # both reasons come up: an edge node has 4 surviving neighbours (< t),
    assert any(f"client {c}: only 4 of its neighbours survived, t=5 needed" in said for c in a.edge)
    assert any(f"client {z}: it did not mask with its surviving neighbour" in said for z in a.arc)  # an arc client


def test_a_consistency_request_without_a_neighbours_declaration_or_with_anothers_or_altered_is_refused():
    for tamper in ("drop", "swap", "masked_with"):
        r = Round(roster=True, ids=[1, 2, 3, 4])
        r.to_collect()
        msg = r.server.consistency_requests()[1]
        decl, bits = dict(msg["declarations"]), dict(msg["masked_with"])
        if tamper == "drop":
            del decl[2]
        elif tamper == "swap":
            decl[2] = decl[3]  # client 3's tag in place of client 2's
        else:
            bits[2] = bytes([bits[2][0] ^ 1])  # "client 2 masked with another set of neighbours"
        assert r.ask(1, "consistency", {**msg, "declarations": decl, "masked_with": bits}) is None
        assert "client 2's declaration of its input is missing, disagrees with the statement or is not " \
               "authenticated by client 2" in r.errors[1]
        assert r.clients[1].stage is Stage.ABORTED
