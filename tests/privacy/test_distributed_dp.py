"""Distributed DP (client-level DP under secure aggregation): the discrete Gaussian sampler,
conditional rounding, the per-client noise plan and its accounting, the field encoding,
and the round through real ClientApp handlers with dropouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.privacy import distributed as ddg
from fedtune.privacy.accounting import epsilon
from fedtune.secagg.encoding import DistributedGaussian


def _pmf(sigma: float, ks: np.ndarray) -> np.ndarray:
    support = np.arange(-60, 61)
    norm = np.exp(-support ** 2 / (2 * sigma ** 2)).sum()
    return np.exp(-ks ** 2 / (2 * sigma ** 2)) / norm


@pytest.mark.parametrize("sigma", [0.8, 2.5])
def test_discrete_gaussian_matches_its_probability_mass(sigma):
    n = 300_000
    z = ddg.discrete_gaussian(sigma, n, ddg.Uniform())
    assert z.dtype == np.int64 and z.size == n
    ks = np.arange(-4, 5)
    expected = _pmf(sigma, ks)
    observed = np.array([(z == k).mean() for k in ks])
    sd = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) < 5 * sd + 1e-6), (observed, expected)


def test_discrete_gaussian_at_large_sigma_has_that_spread():
    sigma = 3.0e6
    z = ddg.discrete_gaussian(sigma, 200_000, ddg.Uniform())
    assert abs(z.std() / sigma - 1) < 0.01 and abs(z.mean()) < 5 * sigma / math.sqrt(z.size)


def test_noise_streams_are_fresh_and_seeds_reproduce():
    a, b = ddg.Uniform(b"\1" * 32).draw(1000), ddg.Uniform(b"\1" * 32).draw(1000)
    assert np.array_equal(a, b)
    u = ddg.Uniform()
    assert not np.array_equal(u.draw(1000), u.draw(1000))  # one key per draw
    assert 0 < a.min() and a.max() < 1


def test_conditional_rounding_is_unbiased_and_within_the_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50) * 3
    bound = ddg.rounded_l2_bound(float(np.linalg.norm(x)), x.size)
    u = ddg.Uniform()
    draws = np.stack([ddg.conditional_round(x, bound, u) for _ in range(4000)])
    assert np.all(np.sqrt((draws.astype(float) ** 2).sum(1)) <= bound)
    assert np.all((draws == np.floor(x)) | (draws == np.floor(x) + 1))
    np.testing.assert_allclose(draws.mean(0), x, atol=0.05)


def test_the_plan_reaches_the_target_noise_with_min_clients_and_fewer_fall_short():
    plan = ddg.make_ddg_plan(0.9, clip_norm=1.0, bits=16, dim=10_000, min_clients=5, max_clients=8, denominator=8.0)
    assert plan.noise_multiplier(5) >= 0.9 > plan.noise_multiplier(4)
    assert plan.noise_multiplier(8) > plan.noise_multiplier(5)  # more clients, more noise in the sum
    assert plan.l2_bound >= 2 ** 15  # rounding can only lengthen the vector
    # The field holds n_max updates plus 16σ of their noise, centred.
    assert 2 ** (plan.field_bits - 1) > 8 * plan.l2_bound + 16 * math.sqrt(8) * plan.local_stddev
    with pytest.raises(FedtuneError, match="raise secagg.bits"):
        ddg.make_ddg_plan(0.5, 1.0, bits=2, dim=10_000, min_clients=500, max_clients=500, denominator=500.0)


def test_tau_charges_for_small_noise():
    """Below σ≈1 the sum of discrete Gaussians is not one; DDG's τ term lowers σ_eff."""
    small = ddg.DDGPlan(1.0, 1.0, l2_bound=1.0, local_stddev=0.3, dim=100, min_clients=3, max_clients=3,
                        denominator=3.0, field_bits=16)
    assert small.noise_multiplier(3) < math.sqrt(3) * 0.3 / 1.0 * 0.5
    big = ddg.DDGPlan(**{**small.to_dict(), "local_stddev": 3.0})
    assert big.noise_multiplier(3) == pytest.approx(math.sqrt(3) * 3.0, rel=1e-12)


def test_accounting_agrees_with_dp_accounting_for_the_gaussian_it_reduces_to():
    """At large σ (τ = 0) a round of n clients is a Gaussian release with noise multiplier
    √n·σ/Δ2; Google's dp-accounting, composing those, gives the same ε."""
    import dp_accounting
    from dp_accounting import rdp

    from fedtune.privacy.accounting import rdp_orders

    plan = ddg.make_ddg_plan(1.1, clip_norm=0.5, bits=20, dim=50_000, min_clients=6, max_clients=10, denominator=10.0)
    survivors = [10, 9, 6, 8]
    ours = epsilon([(plan.noise_multiplier(n), 1.0, 1) for n in survivors], 1e-5, "rdp")
    acc = rdp.RdpAccountant(orders=rdp_orders())
    acc.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(math.sqrt(n) * plan.local_stddev / plan.l2_bound) for n in survivors]))
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    # ... and dropouts cost: the same rounds with every client present spend less.
    assert epsilon([(plan.noise_multiplier(10), 1.0, 1)] * 4, 1e-5, "rdp") < ours


def test_the_encoded_sum_decodes_to_the_sum_plus_the_clients_noise():
    rng = np.random.default_rng(1)
    n, dim = 6, 4000
    plan = ddg.make_ddg_plan(1.0, clip_norm=1.0, bits=18, dim=dim, min_clients=n, max_clients=n, denominator=float(n))
    coder = DistributedGaussian(plan)
    updates = [rng.normal(size=dim) * 0.01 for _ in range(n)]  # norm ≈ 0.63 < C
    updates[0] = updates[0] * 1e3  # one too long: clipped to C
    total = np.zeros(dim, dtype=np.uint64)
    for u in updates:
        total = (total + coder.encode(u, weight=123.0).astype(np.uint64)) & np.uint64((1 << plan.field_bits) - 1)
    decoded, denominator = coder.decode(total, n)
    assert denominator == n
    clipped = [updates[0] / np.linalg.norm(updates[0])] + updates[1:]
    residual = (decoded - np.sum(clipped, axis=0)) / plan.gamma
    sd = math.sqrt(n) * plan.local_stddev
    assert abs(residual.std() / sd - 1) < 0.05 and abs(residual.mean()) < 5 * sd / math.sqrt(dim)
    assert (decoded < 0).any()  # negative sums come back negative (centred lift)


# ---- through Flower messages, with real clients --------------------------------------------
def _ddg_cfg(tmp_path, name, **client_dp):
    from tests.conftest import tiny_config
    from tests.secagg.test_secagg_flower import NODES

    return tiny_config(run={"dir": str(tmp_path / name)}, privacy={"seed": 5}, federation={"clients": len(NODES)},
                       secagg={"enabled": True}, client_dp={"enabled": True, "epsilon": 4.0, **client_dp})


def _ddg_round(cfg, run_dir, grid, initial):
    from flwr.app import ArrayRecord

    from fedtune.secagg.flower import Encoding, secure_train
    from fedtune.server.budget import distributed_spend, server_plan
    from tests.secagg.test_secagg_flower import NODES

    dim = sum(v.numel() for v in initial.values())
    ledger, plan, dplan = server_plan(cfg, run_dir, dim)
    enc = Encoding(cfg.secagg.bits, cfg.secagg.clip, cfg.secagg.max_weight, n_max=len(NODES), ddg=dplan)
    sec = secure_train(grid, NODES, 1, ArrayRecord(initial), enc, degree=cfg.secagg.degree, threshold=0, timeout=60,
                       before_unmask=distributed_spend(ledger, plan, dplan, 1, len(NODES)))
    return sec, ledger, dplan


@pytest.mark.parametrize("min_clients", [3, 4])
def test_a_dropout_is_accounted_with_the_noise_actually_in_the_sum(tmp_path, task_identity, min_clients):
    from fedtune.model import resolve_model
    from fedtune.server import initial_adapter
    from tests.secagg.test_secagg_flower import NODES, Grid

    cfg = _ddg_cfg(tmp_path, "ddg", min_clients=min_clients)
    run_dir = tmp_path / "ddg"
    initial = initial_adapter(cfg, resolve_model(cfg.model.name))
    sec, ledger, dplan = _ddg_round(cfg, run_dir, Grid(cfg, drop={NODES[1]: "collect"}), initial)
    if min_clients == 4:  # 3 clients' noise is not enough: nothing unmasked, nothing spent
        assert sec.aborted and "only 3 clients' noise" in sec.aborted and sec.arrays is None
        assert ledger.spends() == []
        return
    assert not sec.aborted and len(sec.included) == 3
    (spend,) = ledger.spends()
    assert spend["clients_in_sum"] == 3 and spend["mechanism"] == "ddg"
    assert spend["noise_multiplier"] == pytest.approx(dplan.noise_multiplier(3))
    assert spend["epsilon"] > epsilon([(dplan.noise_multiplier(4), 1.0, 1)], cfg.client_dp.delta)
    # The new adapter moved by (sum of 3 clipped updates + noise) / 4: finite, and close to the start.
    change = max(float(np.abs(sec.arrays[k].numpy() - initial[k].numpy()).max()) for k in initial)
    assert 0 < change < 10 * cfg.client_dp.clip_norm


def _round_with_a_cheat(tmp_path, cheat, plan_for_cheat):
    """A secure DDG round in which the server sends ``cheat`` the plan ``plan_for_cheat(cfg,
    asked)`` at advertise instead of the one it asks of the others: (round, grid, initial, cfg)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedtune.model import resolve_model
    from fedtune.secagg.flower import ENCODING, Encoding
    from fedtune.server import initial_adapter
    from tests.secagg.test_secagg_flower import Grid

    cfg = _ddg_cfg(tmp_path, "ddg", min_clients=3)

    def tamper(stage, node, msg):
        if stage == "advertise" and node == cheat:
            enc = Encoding.from_json(msg.content["config"][ENCODING])
            items = dict(msg.content["config"].items())
            other = plan_for_cheat(cfg, enc.ddg)
            items[ENCODING] = Encoding(enc.bits, enc.clip, enc.max_weight, enc.n_max, other).to_json()
            msg = Message(RecordDict({"config": ConfigRecord(items)}), dst_node_id=node, message_type=MessageType.TRAIN)
        return msg

    initial = initial_adapter(cfg, resolve_model(cfg.model.name))
    grid = Grid(cfg, tamper=tamper)
    sec, _, _ = _ddg_round(cfg, tmp_path / "ddg", grid, initial)
    return sec, grid, initial, cfg


def test_a_client_refuses_a_server_that_asks_for_less_noise(tmp_path, task_identity):
    from tests.secagg.test_secagg_flower import NODES

    cheat = NODES[2]
    sec, _, _, _ = _round_with_a_cheat(
        tmp_path, cheat, lambda cfg, asked: ddg.DDGPlan(**{**asked.to_dict(), "local_stddev": asked.local_stddev / 10}))
    assert cheat not in sec.included and "differ from this client's config" in sec.lost[cheat]
    assert "local_stddev" in sec.lost[cheat]


def test_a_client_refuses_at_collect_a_plan_for_another_adapter_size(tmp_path, task_identity):
    """Advertise checks the plan for the dimension the server names (no model loaded); collect
    refuses, before training or spending, when the adapter sent has another size."""
    from fedtune.data import client_name
    from fedtune.privacy import Ledger
    from fedtune.runfolder import ledger_path, run_dir_for
    from tests.secagg.test_secagg_flower import NODES

    cheat = NODES[2]  # gets a self-consistent plan, but for a larger adapter
    sec, grid, initial, cfg = _round_with_a_cheat(tmp_path, cheat, lambda cfg, asked: ddg.plan_for(cfg, asked.dim + 8))
    assert {stage for stage, node, reply in grid.seen if node == cheat and not reply.has_error()} == {"identify", "graph", "advertise",
                                                                                                "share"}
    assert cheat not in sec.included and "refusing the round" in sec.lost[cheat], sec.lost
    assert f"adapter it sent has {sum(v.numel() for v in initial.values())}" in sec.lost[cheat]
    ledger = Ledger(ledger_path(run_dir_for(cfg, 7), client_name(cfg, NODES.index(cheat))))  # Grid: run 7
    assert not any(e["type"] == "spend" for e in ledger.entries())


@pytest.mark.slow
def test_a_simulation_with_distributed_dp_passes_the_audit(tmp_path):
    """Flower's simulation engine, tiny model, --secagg with client-level DP: the server ledger
    holds one DDG spend per round with every client's noise, and `fedtune audit --verify`
    recomputes it; a ledger claiming more noise than the plan gives is caught."""
    import json
    import subprocess
    import sys

    from fedtune.privacy import Ledger
    from fedtune.runfolder import server_ledger_path
    from tests.conftest import ROOT

    out = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"),
                          "--output", str(out), "--secagg", "--set", "client_dp.enabled=true",
                          "--set", "client_dp.epsilon=4", "--quiet"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = out.iterdir()
    spends = Ledger(server_ledger_path(run_dir)).spends()
    assert [s["clients_in_sum"] for s in spends] == [3, 3] and spends[-1]["epsilon"] <= 4.0
    summary = (run_dir / "summary.md").read_text()
    assert "distributed" in summary and json.loads((run_dir / "summary.json").read_text())["final_perplexity"] > 0

    def audit():
        return subprocess.run([sys.executable, "-m", "fedtune.cli", "audit", str(run_dir), "--verify"],
                              capture_output=True, text=True, timeout=300)

    ok = audit()
    assert ok.returncode == 0 and "verification passed" in ok.stdout, ok.stdout + ok.stderr
    # Rewrite the ledger consistently (valid hashes) with a larger σ_eff: --verify must object.
    path = server_ledger_path(run_dir)
    entries = Ledger(path).entries()
    path.unlink()
    forged = Ledger(path)
    for e in entries:
        body = {k: v for k, v in e.items() if k not in ("seq", "prev_hash", "hash", "format")}
        if body["type"] == "spend":
            body["noise_multiplier"] *= 2
        forged.append(body)
    bad = audit()
    assert bad.returncode == 1 and "the plan's noise gives" in bad.stdout + bad.stderr


def test_a_test_seed_fixes_a_clients_noise_and_no_seed_draws_fresh():
    plan = ddg.make_ddg_plan(1.0, 1.0, 16, 50, 3, 3, 3.0)
    coder, x = DistributedGaussian(plan), np.full(50, 0.01)
    seed = bytes(range(32))
    assert np.array_equal(coder.encode(x, 1.0, seed=seed), coder.encode(x, 1.0, seed=seed))
    assert not np.array_equal(coder.encode(x, 1.0, seed=seed), coder.encode(x, 1.0, seed=bytes(32)))
    assert not np.array_equal(coder.encode(x, 1.0), coder.encode(x, 1.0))
