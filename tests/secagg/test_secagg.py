"""SecAgg+ core (fedtune.secagg): primitives, fixed-point encoding and packing, and whole
rounds driven in memory — sums, dropouts at every stage, masked inputs that reveal
nothing, tampering, malformed messages and aborts."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from fedtune.errors import FedtuneError
from fedtune.secagg import (
    FixedPoint, SecAggAborted, SecAggClient, SecAggError, SecAggParams, SecAggResult, SecAggServer, Stage,
    WeightedFixedPoint, pack, unpack,
)
from fedtune.secagg import crypto
from fedtune.secagg.encoding import packed_size
from fedtune.secagg.graph import neighbour_graph
from tests.conftest import secagg_collect

Hook = Callable[[Stage, int, dict], dict]


class Driver:
    """Runs all stages for in-memory clients. ``silent[stage]``: clients that do not reply
    in that stage. ``on_request`` / ``on_reply`` may alter a message in transit. A client
    that raises SecAggError does not reply (its error is kept in ``errors``)."""

    def __init__(self, params: SecAggParams, ids: list[int]):
        self.server = SecAggServer(params, ids)
        setup = self.server.advertise_request()
        self.clients = {c: SecAggClient(c, setup) for c in setup["client_ids"]}
        self.errors: dict[int, str] = {}

    def run(self, inputs: dict[int, np.ndarray], silent: dict[Stage, set[int]] | None = None,
            on_request: Hook | None = None, on_reply: Hook | None = None) -> SecAggResult:
        silent = silent or {}
        srv, cl = self.server, self.clients

        def exchange(stage: Stage, requests: dict[int, dict], act) -> dict[int, dict]:
            replies = {}
            for c, msg in requests.items():
                if c in silent.get(stage, ()):
                    continue
                if on_request:
                    msg = on_request(stage, c, msg)
                try:
                    reply = act(c, msg)
                except SecAggError as e:
                    self.errors[c] = str(e)
                    continue
                replies[c] = on_reply(stage, c, reply) if on_reply else reply
            return replies

        srv.receive_advertise(exchange(Stage.ADVERTISE, {c: {} for c in cl}, lambda c, _: cl[c].advertise_keys()))
        srv.receive_share(exchange(Stage.SHARE, srv.share_requests(), lambda c, m: cl[c].share_keys(m)))
        srv.receive_collect(exchange(Stage.COLLECT, srv.collect_requests(),
                                     lambda c, m: secagg_collect(cl[c], m, inputs[c])))
        return srv.receive_unmask(exchange(Stage.UNMASK, srv.unmask_requests(), lambda c, m: cl[c].unmask(m)))


def int_inputs(ids, length, bits, seed=0):
    rng = np.random.default_rng(seed)  # test data only; masks come from the protocol's CSPRNG
    return {c: rng.integers(0, 1 << bits, length, dtype=np.uint64).astype(np.uint32) for c in ids}


def plain_sum(inputs, clients, m):
    return (sum(inputs[c].astype(np.uint64) for c in clients) % (1 << m)).astype(np.uint64)


def small_round(n=10, degree=6, length=64, m=20):
    params = SecAggParams(field_bits=m, length=length, degree=degree)
    ids = list(range(1, n + 1))
    return Driver(params, ids), int_inputs(ids, length, m - 4)


def flip(blob: bytes, at: int = -1) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


# -- primitives -----------------------------------------------------------------------
def test_aead_binds_pair_round_and_stage():
    key = os.urandom(32)
    ad = crypto.associated_data("share", 3, 1, 2)
    blob = crypto.encrypt(key, b"secret", ad)
    assert crypto.decrypt(key, blob, ad) == b"secret"
    for other in (crypto.associated_data("share", 3, 2, 1), crypto.associated_data("share", 4, 1, 2),
                  crypto.associated_data("unmask", 3, 1, 2)):
        with pytest.raises(crypto.CryptoError):
            crypto.decrypt(key, blob, other)
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(key, flip(blob, 20), ad)


def test_key_agreement_is_symmetric_and_labelled():
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    ab = crypto.agree(a.private, b.public, crypto.INFO_PAIR_MASK, 0, 1, 2)
    assert ab == crypto.agree(b.private, a.public, crypto.INFO_PAIR_MASK, 0, 2, 1)
    assert ab != crypto.agree(a.private, b.public, crypto.INFO_ENCRYPTION, 0, 1, 2)
    assert ab != crypto.agree(a.private, b.public, crypto.INFO_PAIR_MASK, 1, 1, 2)
    with pytest.raises(crypto.CryptoError):
        crypto.check_public_key(bytes(32))  # low-order point


def test_shamir_needs_threshold_shares():
    secret = os.urandom(32)
    shares = crypto.share_secret(secret, 3, 5)
    assert [i for i, _ in shares] == [1, 2, 3, 4, 5]
    assert crypto.combine_shares([shares[4], shares[0], shares[2]]) == secret
    assert crypto.combine_shares(shares[1:4]) == secret
    assert crypto.combine_shares(shares[:2]) != secret


def test_prg_is_deterministic_and_in_range():
    seed = os.urandom(32)
    a = crypto.expand(seed, 1000, 13)
    assert (a == crypto.expand(seed, 1000, 13)).all() and a.max() < 1 << 13
    assert (crypto.expand(seed, 10, 32)[:5] == crypto.expand(seed, 5, 32)).all()
    assert not (a == crypto.expand(os.urandom(32), 1000, 13)).all()
    assert crypto.expand(seed, 100, 40).dtype == np.uint64


# -- encoding and packing -------------------------------------------------------------
def test_fixed_point_round_trip_is_unbiased_and_clips():
    fp = FixedPoint(clip=2.0, bits=16, n_max=1000)
    assert fp.field_bits == 26
    x = np.linspace(-3, 3, 10001)
    q = fp.encode(x)
    assert q.dtype == np.uint32 and q.max() <= fp.levels
    assert np.abs(fp.decode_sum(q, 1) - np.clip(x, -2, 2)).max() < fp.step
    # stochastic rounding: the mean of many encodings of a value between levels is the value
    v = 0.3 * fp.step - 2.0
    mean = fp.decode_sum(fp.encode(np.full(200_000, v)).astype(np.float64), 1).mean()
    assert abs(mean - v) < 0.01 * fp.step
    with pytest.raises(FedtuneError, match="NaN"):
        fp.encode(np.array([np.nan]))


def test_sum_of_n_max_encodings_does_not_wrap():
    fp = FixedPoint(clip=1.0, bits=8, n_max=3)
    m = fp.field_bits
    top = fp.encode(np.ones(4))
    assert (top == fp.levels).all()
    total = (3 * top.astype(np.uint64)) % (1 << m)
    assert np.allclose(fp.decode_sum(total, 3), 3.0)
    assert np.allclose(fp.decode_sum(np.zeros(4), 3), -3.0)
    with pytest.raises(FedtuneError, match="n_max"):
        fp.decode_sum(total, 4)


def test_weighted_encoding_reveals_only_the_sums():
    enc = WeightedFixedPoint(FixedPoint(clip=1.0, bits=20, n_max=4), max_weight=100.0)
    xs = [np.array([0.5, -0.25, 1.0]), np.array([-1.0, 0.75, 0.0])]
    ws = [30.0, 70.0]
    total = sum(enc.encode(x, w).astype(np.uint64) for x, w in zip(xs, ws))
    weighted, weight = enc.decode(total, 2)
    bound_x, bound_w = enc.error_bound(2)
    assert np.abs(weighted - (30 * xs[0] + 70 * xs[1])).max() < bound_x
    assert abs(weight - 100.0) < bound_w
    with pytest.raises(FedtuneError, match="weight"):
        enc.encode(xs[0], 101.0)


@pytest.mark.parametrize("bits", [1, 7, 8, 13, 16, 26, 32, 33, 48, 56])
def test_pack_round_trip(bits):
    for n in (0, 1, 7, 8, 9, 1001):
        v = crypto.expand(os.urandom(32), n, bits)
        data = pack(v, bits)
        assert len(data) == packed_size(n, bits) == (n * bits + 7) // 8
        assert (unpack(data, bits, n) == v).all()


def test_packed_upload_is_at_most_1_1x_fp32():
    d = 100_000
    for bits, n_max in ((16, 1000), (16, 2), (20, 1000), (24, 1000)):
        fp = FixedPoint(clip=1.0, bits=bits, n_max=n_max)
        data = pack(fp.encode(np.zeros(d)), fp.field_bits)
        assert len(data) <= 1.1 * 4 * d
        if bits == 16:
            assert len(data) <= 4 * d


def test_unpack_rejects_bad_length_and_padding():
    data = pack(np.arange(5, dtype=np.uint32), 13)
    with pytest.raises(FedtuneError, match="bytes"):
        unpack(data + b"\0", 13, 5)
    with pytest.raises(FedtuneError, match="padding"):
        unpack(data[:-1] + bytes([data[-1] | 0x80]), 13, 5)
    with pytest.raises(FedtuneError, match="2\\^13"):
        pack(np.array([1 << 13]), 13)


# -- parameters and graph -------------------------------------------------------------
def test_params_are_validated():
    with pytest.raises(FedtuneError, match="exceed half"):
        SecAggParams(field_bits=16, length=10, degree=8, threshold=4)
    with pytest.raises(FedtuneError, match="between 1 and the 8"):
        SecAggParams(field_bits=16, length=10, degree=8, threshold=9)
    with pytest.raises(FedtuneError, match="between 1 and the 2"):
        SecAggServer(SecAggParams(field_bits=16, length=10, degree=8, threshold=5), [1, 2, 3])
    with pytest.raises(FedtuneError, match="even"):
        SecAggServer(SecAggParams(field_bits=16, length=10, degree=5), range(20))
    with pytest.raises(FedtuneError, match="more than once"):
        SecAggServer(SecAggParams(field_bits=16, length=10), [1, 2, 2])
    with pytest.raises(FedtuneError, match="at least 2"):
        SecAggServer(SecAggParams(field_bits=16, length=10), [1])
    assert SecAggParams(field_bits=16, length=10, degree=8).threshold_for(50) == 5
    assert SecAggParams(field_bits=16, length=10, degree=8).threshold_for(3) == 2


def test_graph_is_regular_symmetric_and_agreed():
    seed = os.urandom(32)
    g = neighbour_graph(list(range(40)), 8, seed)
    assert all(len(g[c]) == 8 and c not in g[c] and all(c in g[j] for j in g[c]) for c in g)
    assert g == neighbour_graph(list(reversed(range(40))), 8, seed)
    assert g != neighbour_graph(list(range(40)), 8, os.urandom(32))
    assert neighbour_graph([5, 6, 7], 8, seed) == {5: {6, 7}, 6: {5, 7}, 7: {5, 6}}


# -- whole rounds ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 10, 50])
def test_secure_weighted_aggregate_equals_plain(n):
    d = 500
    enc = WeightedFixedPoint(FixedPoint(clip=1.0, bits=16, n_max=n), max_weight=1000.0)
    rng = np.random.default_rng(n)
    updates = {c: rng.uniform(-1.2, 1.2, d) for c in range(n)}
    weights = {c: float(rng.integers(1, 1001)) for c in range(n)}
    params = SecAggParams(field_bits=enc.field_bits, length=enc.length(d), degree=min(n - 1, 8))
    driver = Driver(params, list(range(n)))
    result = driver.run({c: enc.encode(updates[c], weights[c]) for c in range(n)})
    assert result.clients == tuple(range(n)) and not result.dropped and not result.rejected
    weighted, total_weight = enc.decode(result.total, n)
    bound_x, bound_w = enc.error_bound(n)
    plain = sum(weights[c] * np.clip(updates[c], -1, 1) for c in range(n))
    assert np.abs(weighted - plain).max() < bound_x
    assert abs(total_weight - sum(weights.values())) < bound_w
    assert np.allclose(weighted / total_weight, plain / sum(weights.values()), atol=2 * bound_x / total_weight)


def test_sum_at_n_max_does_not_overflow_through_the_protocol():
    fp = FixedPoint(clip=1.0, bits=12, n_max=3)
    driver = Driver(SecAggParams(field_bits=fp.field_bits, length=50), [1, 2, 3])
    result = driver.run({c: fp.encode(np.full(50, 5.0)) for c in (1, 2, 3)})
    assert (result.total == 3 * fp.levels).all()
    assert np.allclose(fp.decode_sum(result.total, 3), 3.0)


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.COLLECT, Stage.UNMASK])
@pytest.mark.parametrize("drops", [1, 2])
def test_dropouts_at_each_stage(stage, drops):
    driver, inputs = small_round(n=10, degree=6)
    gone = set(range(3, 3 + drops))
    result = driver.run(inputs, silent={stage: gone})
    included = set(range(1, 11)) - gone if stage is not Stage.UNMASK else set(range(1, 11))
    assert set(result.clients) == included
    assert result.dropped == {c: stage for c in gone}
    assert (result.total == plain_sum(inputs, result.clients, 20)).all()


def test_one_dropout_in_every_stage():
    params = SecAggParams(field_bits=20, length=64, degree=9)
    driver, inputs = Driver(params, list(range(10))), int_inputs(range(10), 64, 16)
    silent = {Stage.ADVERTISE: {0}, Stage.SHARE: {1}, Stage.COLLECT: {2}, Stage.UNMASK: {3}}
    result = driver.run(inputs, silent=silent)
    assert result.clients == (3, 4, 5, 6, 7, 8, 9)
    assert (result.total == plain_sum(inputs, result.clients, 20)).all()


def test_masked_inputs_are_independent_of_the_inputs():
    m, length = 16, 4096
    driver = Driver(SecAggParams(field_bits=m, length=length, degree=4), list(range(6)))
    rng = np.random.default_rng(1)
    inputs = {c: np.zeros(length, dtype=np.uint32) for c in range(6)}
    inputs[1][:] = (1 << 12) - 1  # two very different inputs: all zeros, all maximum
    inputs[2] = np.where(rng.random(length) < 0.5, 0, (1 << 12) - 1).astype(np.uint32)  # half and half
    seen: dict[int, np.ndarray] = {}

    def record(stage, c, reply):
        if stage is Stage.COLLECT:
            seen[c] = unpack(reply["masked"], m, length)
        return reply

    result = driver.run(inputs, on_reply=record)
    assert (result.total == plain_sum(inputs, range(6), m)).all()

    def uniform_p(values):
        counts = np.bincount(values.astype(np.int64) >> (m - 6), minlength=64)  # 64 equal bins
        return stats.chisquare(counts).pvalue

    def independence_p(x, y):  # contingency of input (2 values) vs masked value (16 bins)
        table = np.array([np.bincount(y[x == v].astype(np.int64) >> (m - 4), minlength=16) for v in np.unique(x)])
        table = table[:, table.sum(axis=0) > 0]
        return stats.chi2_contingency(table).pvalue

    for c in range(6):
        assert uniform_p(seen[c]) > 1e-6, c
    assert stats.ks_2samp(seen[0], seen[1]).pvalue > 1e-6
    assert independence_p(inputs[2], seen[2]) > 1e-6
    # the same tests do see through an input that is not masked uniformly
    weak = ((inputs[2] + rng.integers(0, 1 << 14, length)) % (1 << m)).astype(np.uint32)
    assert uniform_p(inputs[0]) < 1e-6 and stats.ks_2samp(inputs[0], inputs[1]).pvalue < 1e-6
    assert independence_p(inputs[2], weak) < 1e-6


# -- tampering and malformed messages -------------------------------------------------
def test_tampered_ciphertext_is_rejected_naming_the_sender():
    driver, inputs = small_round()

    def tamper(stage, c, msg):
        if stage is Stage.COLLECT and c == 5:
            owner = min(msg["ciphertexts"])
            msg["ciphertexts"][owner] = flip(msg["ciphertexts"][owner])
            tamper.owner = owner
        return msg

    result = driver.run(inputs, on_request=tamper)
    assert f"the share ciphertext from client {tamper.owner} failed authentication" in driver.errors[5]
    assert driver.clients[5].stage is Stage.ABORTED
    assert 5 not in result.clients and (result.total == plain_sum(inputs, result.clients, 20)).all()


def test_ciphertext_replayed_to_another_client_fails():
    driver, inputs = small_round(n=5, degree=4)

    def replay(stage, c, msg):
        if stage is Stage.COLLECT and c == 1:  # client 1 gets what 3 sent to 2 as if 3 sent it to 1
            msg["ciphertexts"][3] = driver.server._ciphertexts[3][2]
            msg["commitments"][3] = driver.server._commitments[3][2]
        return msg

    driver.run(inputs, on_request=replay)
    assert "share ciphertext from client 3 failed authentication" in driver.errors[1]


def test_tampered_share_commitment_is_rejected_naming_the_sender():
    driver, inputs = small_round()
    owner = max(driver.server.setup.neighbours[2])  # the graph is random: pick one of 2's neighbours

    def tamper(stage, c, msg):
        if stage is Stage.COLLECT and c == 2:
            msg["commitments"][owner] = flip(msg["commitments"][owner], 3)
        return msg

    driver.run(inputs, on_request=tamper)
    assert f"shares from client {owner} do not match its commitments" in driver.errors[2]


def test_tampered_revealed_share_is_rejected_and_the_round_goes_on():
    driver, inputs = small_round()

    def tamper(stage, c, reply):
        if stage is Stage.UNMASK and c == 4:
            owner = min(reply["b_shares"])
            reply["b_shares"][owner] = flip(reply["b_shares"][owner], 0)
            tamper.owner = owner
        return reply

    result = driver.run(inputs, on_reply=tamper)
    assert result.rejected[4] == (f"client 4 revealed a share of client {tamper.owner}'s self-mask seed that "
                                  "does not match the commitment")
    assert result.clients == tuple(range(1, 11))
    assert (result.total == plain_sum(inputs, result.clients, 20)).all()


@pytest.mark.parametrize("bad, why", [
    (lambda r: {"masked": r["masked"][:-1]}, "malformed masked input"),
    (lambda r: {"masked": np.zeros(63, dtype=np.uint32)}, "not 64 integers"),
    (lambda r: {"masked": np.full(64, 1 << 20, dtype=np.uint32)}, "outside \\[0, 2\\^20\\)"),
    (lambda r: {"masked": np.zeros(64, dtype=np.float32)}, "not 64 integers"),
    (lambda r: {"masked": "junk"}, "not 64 integers"),
])
def test_malformed_masked_input_rejects_its_sender(bad, why):
    driver, inputs = small_round()
    result = driver.run(inputs, on_reply=lambda s, c, r: bad(r) if s is Stage.COLLECT and c == 6 else r)
    assert result.rejected[6].startswith("client 6 ") and re.search(why, result.rejected[6])
    assert 6 not in result.clients and result.dropped[6] is Stage.COLLECT
    assert (result.total == plain_sum(inputs, result.clients, 20)).all()


def test_malformed_shares_reject_their_sender():
    driver, inputs = small_round()

    def bad(stage, c, reply):
        if stage is Stage.SHARE and c == 8:
            reply["ciphertexts"].popitem()
        if stage is Stage.SHARE and c == 9:
            j = min(reply["ciphertexts"])
            reply["ciphertexts"][j] = reply["ciphertexts"][j][:-1]
        return reply

    result = driver.run(inputs, on_reply=bad)
    assert "client 8 sent shares to" in result.rejected[8]
    assert result.rejected[9].startswith("client 9 sent a malformed share ciphertext")
    assert (result.total == plain_sum(inputs, result.clients, 20)).all() and 8 not in result.clients


def test_duplicate_and_unknown_ids_are_rejected():
    driver, inputs = small_round()
    srv, cl = driver.server, driver.clients
    replies = [(c, cl[c].advertise_keys()) for c in cl] + [(3, {"pk_enc": os.urandom(32), "pk_mask": os.urandom(32)}),
                                                          (999, {"pk_enc": os.urandom(32), "pk_mask": os.urandom(32)})]
    srv.receive_advertise(replies)
    assert srv.rejected[3] == "client 3 replied 2 times in stage 'advertise'"
    assert srv.rejected[999] == "unknown client 999 replied in stage 'advertise'"
    assert 3 not in srv.active and srv.dropped[3] is Stage.ADVERTISE
    srv.receive_share({c: cl[c].share_keys(m) for c, m in srv.share_requests().items()})
    srv.receive_collect({c: secagg_collect(cl[c], m, inputs[c]) for c, m in srv.collect_requests().items()})
    result = srv.receive_unmask({c: cl[c].unmask(m) for c, m in srv.unmask_requests().items()})
    assert 3 not in result.clients and (result.total == plain_sum(inputs, result.clients, 20)).all()


def test_repeated_public_keys_are_rejected():
    driver, _ = small_round()
    srv, cl = driver.server, driver.clients
    replies = {c: cl[c].advertise_keys() for c in cl}
    replies[2] = dict(replies[1])
    srv.receive_advertise(replies)
    assert "not unique" in srv.rejected[1] and "not unique" in srv.rejected[2]


def test_client_refuses_keys_from_non_neighbours():
    driver, _ = small_round(n=10, degree=4)
    c = driver.clients[1]
    stranger = next(j for j in range(2, 11) if j not in c.neighbours)
    c.advertise_keys()
    keys = {j: crypto.KeyPair.generate().public for j in [*c.neighbours, stranger]}
    with pytest.raises(SecAggError, match=f"client 1: the server sent keys of client {stranger}, which is not"):
        c.share_keys({"pk_enc": keys, "pk_mask": {j: crypto.KeyPair.generate().public for j in keys}})


# -- unmasking rules and aborts -------------------------------------------------------
def test_client_refuses_to_reveal_both_shares_of_a_peer():
    driver, inputs = small_round(n=5, degree=4)
    srv, cl = driver.server, driver.clients
    srv.receive_advertise({c: cl[c].advertise_keys() for c in cl})
    srv.receive_share({c: cl[c].share_keys(m) for c, m in srv.share_requests().items()})
    for c, m in srv.collect_requests().items():
        secagg_collect(cl[c], m, inputs[c])
    with pytest.raises(SecAggError, match="client 1: asked to reveal both the self-mask share and the mask-key "
                                          "share of client 2; refusing"):
        cl[1].unmask({"survivors": [2, 3], "dropped": [2]})
    reply = cl[2].unmask({"survivors": [1], "dropped": [3]})
    assert set(reply["b_shares"]) == {1} and set(reply["sk_shares"]) == {3}
    with pytest.raises(SecAggError, match="stage"):  # no second chance to ask for the other share
        cl[2].unmask({"survivors": [3], "dropped": [1]})
    with pytest.raises(SecAggError, match="does not hold"):
        cl[3].unmask({"survivors": [3]})


def test_abort_when_too_few_inputs_remain():
    driver, inputs = small_round(n=5, degree=4)  # t = 3
    outcome = None
    with pytest.raises(SecAggAborted, match="stage 'collect'"):
        outcome = driver.run(inputs, silent={Stage.COLLECT: {1, 2, 3}})
    assert outcome is None and driver.server.stage is Stage.ABORTED and not driver.server._masked
    with pytest.raises(SecAggAborted):
        driver.server.unmask_requests()


def test_abort_early_when_a_survivor_keeps_too_few_share_holders():
    driver, inputs = small_round(n=10, degree=4)  # t = 3
    gone = set(sorted(driver.server.setup.neighbours[1])[:2])
    with pytest.raises(SecAggAborted, match="stage 'collect': only 2 holders of client 1's self-mask seed shares"):
        driver.run(inputs, silent={Stage.COLLECT: gone})
    assert driver.server.stage is Stage.ABORTED and not driver.server._masked


def test_abort_when_a_secret_cannot_be_rebuilt():
    driver, inputs = small_round(n=5, degree=4)  # t = 3: each survivor needs 3 of 4 neighbours to answer
    with pytest.raises(SecAggAborted, match="stage 'unmask'"):
        driver.run(inputs, silent={Stage.UNMASK: {1, 2, 3}})
    assert driver.server.stage is Stage.ABORTED and not driver.server._masked


def test_abort_when_a_dropped_clients_key_cannot_be_rebuilt():
    driver, inputs = small_round(n=10, degree=4)  # t = 3

    def withhold(stage, c, reply):  # every holder keeps client 5's mask-key share to itself
        if stage is Stage.UNMASK:
            reply["sk_shares"].pop(5, None)
        return reply

    with pytest.raises(SecAggAborted, match="only 0 valid shares of client 5's mask key arrived, 3 needed"):
        driver.run(inputs, silent={Stage.COLLECT: {5}}, on_reply=withhold)


def test_a_test_seed_fixes_the_rounding_and_no_seed_draws_fresh():
    """privacy.seed (tests only) makes a client's encoding reproducible across processes, so a
    simulated and a deployed client send the same field elements; normal runs draw fresh."""
    enc = WeightedFixedPoint(FixedPoint(clip=1.0, bits=20, n_max=4), max_weight=100.0)
    x = np.linspace(-0.9, 0.9, 4001)
    seed = bytes(range(32))
    same = enc.encode(x, 30.0, seed=seed)
    assert np.array_equal(same, enc.encode(x, 30.0, seed=seed))
    assert not np.array_equal(same, enc.encode(x, 30.0, seed=bytes(32)))
    assert not np.array_equal(enc.encode(x, 30.0), enc.encode(x, 30.0))  # OS entropy
