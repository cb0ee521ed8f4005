"""SecAgg+ against a malicious server, tested as the attacker: a server built from fedtune's
own SecAggServer that lies about survivors, substitutes keys, or passes one client's reply
off as another's. With an identity roster every such lie makes the honest clients abort
with nothing revealed; without one (the old honest-but-curious mode) the same lying server
recovers a client's exact input, so the tests can fail."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer, Stage, crypto, identity
from fedtune.secagg.protocol import pair_mask, self_mask, sign
from tests.conftest import secagg_collect

IDS = [1, 2, 3, 4]
TARGET = 1


class Round:
    """Advertise, share and collect for in-memory clients, with a roster or without."""

    def __init__(self, roster: bool, min_inputs: int = 2, ids=IDS, real=None):
        keys = {c: identity.generate() for c in ids}
        self.keys = keys
        self.roster = {c: identity.public_bytes(k) for c, k in keys.items()} if roster else {}
        params = SecAggParams(field_bits=20, length=16, min_inputs=min_inputs)  # t = 2 of 3 neighbours
        self.server = SecAggServer(params, ids, roster=self.roster)
        setup = self.server.advertise_request()
        self.clients = {c: SecAggClient(c, setup, keys[c] if roster else None) for c in ids}
        rng = np.random.default_rng(0)
        self.inputs = {c: rng.integers(0, 1 << 16, 16).astype(np.uint32) for c in ids}
        self.real = real or {c: True for c in ids}
        self.errors: dict[int, str] = {}

    def ask(self, c: int, method: str, msg) -> dict | None:
        try:
            return getattr(self.clients[c], method)(msg)
        except SecAggError as e:
            self.errors[c] = str(e)
            return None

    def to_collect(self, tamper_share=None):
        srv, cl = self.server, self.clients
        srv.receive_advertise({c: cl[c].advertise_keys() for c in cl})
        requests = srv.share_requests()
        if tamper_share:
            requests = tamper_share(requests)
        srv.receive_share({c: r for c, m in requests.items() if (r := self.ask(c, "share_keys", m)) is not None})
        srv.receive_collect({c: secagg_collect(cl[c], m, self.inputs[c], self.real[c])
                             for c, m in srv.collect_requests().items()})

    def honest_finish(self):
        srv = self.server
        if srv.stage is Stage.CONSISTENCY:
            srv.receive_consistency({c: self.ask(c, "consistency", m) for c, m in srv.consistency_requests().items()})
        return srv.receive_unmask({c: self.ask(c, "unmask", m) for c, m in srv.unmask_requests().items()})


def _lying_unmask(r: Round) -> dict[int, dict]:
    """The issue's attack: tell each neighbour c of the target 'the target and you survived,
    the others dropped'; with a roster, first get c to sign that set. Returns what each
    neighbour revealed (nothing for one that refused)."""
    srv, revealed = r.server, {}
    for c in IDS:
        if c == TARGET:
            continue
        told = sorted({TARGET, c})
        others = sorted(set(IDS) - {TARGET, c})
        msg = {"survivors": [TARGET], "dropped": others}
        if r.roster:
            def shown(to):  # each neighbour's declaration with its tag for ``to``, all the server holds
                return {"survivors": told, "real": told, "masked_with": {j: srv._masked_with[j] for j in told},
                        "declarations": {j: srv._tags["decl"][j][to] for j in told if j != to}}
            sig = r.ask(c, "consistency", shown(c))
            if sig is None:
                continue
            sigs, tags = {c: sig["sig"]}, {}
            own = r.ask(TARGET, "consistency", shown(TARGET))  # the target signs one set at most
            if own is not None:
                sigs[TARGET], tags[TARGET] = own["sig"], own["tags"].get(c)
            msg["signatures"], msg["tags"] = sigs, tags
        out = r.ask(c, "unmask", msg)
        if out is not None:
            revealed[c] = out
    return revealed


def _recover(r: Round, revealed: dict[int, dict]) -> np.ndarray | None:
    """The target's input from the shares the lying server collected, if it got enough."""
    srv, setup, t = r.server, r.server.setup, r.server.setup.threshold

    def rebuild(owner, kind):
        got = [(srv._holders[owner].index(h) + 1, rep[kind][owner]) for h, rep in revealed.items() if owner in rep[kind]]
        return crypto.combine_shares(sorted(got)[:t]) if len(got) >= t else None

    b = rebuild(TARGET, "b_shares")
    sks = {j: rebuild(j, "sk_shares") for j in IDS if j != TARGET}
    if b is None or any(v is None for v in sks.values()):
        return None
    m = setup.params.field_bits
    y = srv._masked[TARGET].astype(np.int64) - self_mask(setup, TARGET, b).astype(np.int64)
    for j, raw in sks.items():
        mask = pair_mask(setup, j, crypto.private_from_bytes(raw), TARGET, srv._pk_mask[TARGET]).astype(np.int64)
        y -= sign(TARGET, j) * mask
    return (y % (1 << m)).astype(np.uint32)


def test_without_a_roster_the_inconsistent_lists_attack_recovers_the_targets_input():
    r = Round(roster=False)
    r.to_collect()
    recovered = _recover(r, _lying_unmask(r))
    assert recovered is not None and np.array_equal(recovered, r.inputs[TARGET])  # why the roster exists


def test_with_a_roster_the_inconsistent_lists_attack_recovers_nothing():
    r = Round(roster=True)
    r.to_collect()
    revealed = _lying_unmask(r)
    assert revealed == {} and _recover(r, revealed) is None
    for c in IDS:  # each refuses at consistency already: in the set it is told, its neighbours have < t survivors
        if c != TARGET:
            assert "stage 'consistency'" in r.errors[c] and "revealing nothing" in r.errors[c]
            assert r.clients[c].stage is Stage.ABORTED and not r.clients[c]._held  # its shares are gone


def test_an_honest_round_with_a_roster_sums_exactly_with_a_dropout():
    r = Round(roster=True, ids=[1, 2, 3, 4, 5])
    r.to_collect()
    srv = r.server
    requests = srv.consistency_requests()
    srv.receive_consistency({c: r.ask(c, "consistency", m) for c, m in requests.items() if c != 5})  # 5 signs nothing
    result = srv.receive_unmask({c: r.ask(c, "unmask", m) for c, m in srv.unmask_requests().items()})
    assert result.clients == (1, 2, 3, 4, 5) and not r.errors
    total = sum(r.inputs[c].astype(np.uint64) for c in result.clients) % (1 << 20)
    assert np.array_equal(result.total, total)


def test_a_key_substituted_at_the_share_stage_is_detected():
    r = Round(roster=True)
    victim, fake = 2, crypto.KeyPair.generate()

    def substitute(requests):
        requests[victim]["pk_mask"][TARGET] = fake.public  # the server's own key in the target's place
        return requests

    r.to_collect(tamper_share=substitute)
    assert f"the keys the server gave for client {TARGET} are not signed" in r.errors[victim]
    assert "stage 'share'" in r.errors[victim] and victim not in r.server.active


def test_a_reply_naming_another_client_is_rejected():
    r = Round(roster=True)
    srv, cl = r.server, r.clients
    replies = {c: cl[c].advertise_keys() for c in IDS}
    pk_enc, pk_mask = crypto.KeyPair.generate().public, crypto.KeyPair.generate().public
    replies[3] = {"pk_enc": pk_enc, "pk_mask": pk_mask,  # client 2 speaks for client 3, signing with its own key
                  "sig": identity.sign(r.keys[2], identity.ADVERTISE, srv.setup.digest, 3, pk_enc, pk_mask)}
    srv.receive_advertise(replies)
    assert 3 not in srv.active and "not signed by client 3's identity key" in srv.rejected[3]


def test_a_server_claiming_refusers_are_real_is_refused_at_consistency():
    r = Round(roster=True, min_inputs=3, real={1: True, 2: False, 3: False, 4: True})
    with pytest.raises(Exception, match="only 2 real inputs"):
        r.to_collect()  # the honest server state machine stops itself
    r = Round(roster=True, min_inputs=3, real={1: True, 2: False, 3: False, 4: True})
    assert r.server.setup.digest  # the setup the clients signed stays as sent...
    r.server.setup.params.__dict__["min_inputs"] = 2  # ...but the lying server lowers its own floor
    r.to_collect()
    for c, msg in r.server.consistency_requests().items():
        r.ask(c, "consistency", {**msg, "real": [1, 2, 3, 4]})  # and claims the refusers trained
    assert all("client 2's declaration of its input is missing, disagrees with the statement" in r.errors[c] for c in IDS)
    r = Round(roster=True, min_inputs=3, real={1: True, 2: False, 3: False, 4: True})
    assert r.server.setup.digest
    r.server.setup.params.__dict__["min_inputs"] = 2
    r.to_collect()
    for c, msg in r.server.consistency_requests().items():  # the truth about who trained: too few
        assert r.ask(c, "consistency", msg) is None and "only 2 real inputs in the sum, min_inputs=3" in r.errors[c]


def test_a_client_whose_roster_key_is_not_its_own_refuses_the_round():
    r = Round(roster=True)
    with pytest.raises(SecAggError, match="roster does not hold this client's identity key"):
        SecAggClient(1, r.server.advertise_request(), identity.generate())


def test_a_clients_own_tags_or_declaration_tags_passed_off_as_its_neighbours_endorsements_are_refused():
    """Neighbours endorse the survivor set with tags under their pairwise key, which the server
    cannot make. A lying server that holds no endorsement from 2..5 shows client 1 the tags
    client 1 itself made for them (reflected), or their tags on their declarations (another
    statement): no quorum, nothing revealed. The genuine tags are enough (so the test can fail)."""
    for forged in ("reflected", "declarations", None):
        r = Round(roster=True, ids=[1, 2, 3, 4, 5])  # the full graph: t = 3, quorum 3
        r.to_collect()
        srv = r.server
        srv.receive_consistency({c: r.ask(c, "consistency", m) for c, m in srv.consistency_requests().items()})
        msg = srv.unmask_requests()[1]
        assert set(msg["tags"]) == {2, 3} and msg["signatures"] == {}  # with its own, a quorum: no signature to check
        if forged == "reflected":
            msg["tags"] = {j: srv._tags["survivors"][1][j] for j in msg["tags"]}
        elif forged == "declarations":
            msg["tags"] = {j: srv._tags["decl"][j][1] for j in msg["tags"]}
        out = r.ask(1, "unmask", msg)
        if forged is None:
            assert out is not None and set(out["b_shares"]) == {2, 3, 4, 5} and 1 not in r.errors
        else:
            assert out is None and "stage 'unmask': only 1 survivors signed the survivor set" in r.errors[1]
            assert r.clients[1].stage is Stage.ABORTED and not r.clients[1]._held


def test_identity_signatures_verify_as_ed25519_and_a_neutral_key_signs_nothing():
    """Identity signatures are checked by libsodium: a cryptography (OpenSSL) signature verifies,
    an altered one or another statement does not, and the neutral-point key with the signature
    (R = neutral, S = 0), which OpenSSL accepts for every message, verifies none."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = identity.generate()
    public, sig = identity.public_bytes(key), identity.sign(key, identity.SURVIVORS, b"d" * 32, [1, 2, 3])
    assert identity.verify(public, sig, identity.SURVIVORS, b"d" * 32, [1, 2, 3])
    assert not identity.verify(public, sig, identity.SURVIVORS, b"d" * 32, [1, 2])
    assert not identity.verify(public, sig[:-1] + bytes([sig[-1] ^ 1]), identity.SURVIVORS, b"d" * 32, [1, 2, 3])
    neutral = ed25519.Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    forged = bytes([1]) + bytes(63)
    neutral.verify(forged, b"any statement")  # OpenSSL: valid (so the check below can fail)
    der = neutral.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert not identity.verify(der, forged, identity.SURVIVORS, b"d" * 32, [1, 2, 3])
