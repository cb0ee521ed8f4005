"""The config: one schema for TOML files, Flower's run config and CLI overrides."""

from __future__ import annotations

import tomllib

import pytest

from fedtune import config
from fedtune.errors import FedtuneError
from tests.conftest import ROOT


def test_defaults_are_the_same_everywhere():
    """dataclass defaults == simulations/default.toml == pyproject's Flower run config."""
    assert config.load(ROOT / "simulations" / "default.toml") == config.Config()
    flower = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config.flatten_toml(flower, "pyproject.toml") == config.to_flat(config.Config())


def test_round_trip_through_flowers_flat_run_config():
    cfg = config.load(None, {"privacy.epsilon": 3, "lora.target_modules": ["q_proj", "k_proj"]})
    assert config.from_flat(config.to_flat(cfg)) == cfg
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert tomllib.loads(config.dump_toml(cfg))["privacy"]["epsilon"] == 3.0


@pytest.mark.parametrize("overrides, message", [
    ({"privacy.epsion": 3}, "did you mean 'privacy.epsilon'"),
    ({"privacy.epsilon": "abc"}, "privacy.epsilon must be a number"),
    ({"privacy.epsilon": -1}, "privacy.epsilon must be a finite number > 0"),
    ({"privacy.delta": 1.5}, "privacy.delta must be in"),
    ({"federation.clients": 0}, "federation.clients must be >= 1"),
    ({"federation.stage_timeout": 0}, "federation.stage_timeout must be > 0 seconds"),
    ({"federation.rounds": True}, "must be a whole number"),
    ({"data.partition": "random"}, "data.partition must be one of"),
    ({"model.device": "tpu"}, "model.device must be"),
    ({"model.name": ""}, "model.name is empty"),
    ({"train.local_epochs": 0}, "train.local_epochs must be > 0"),
    ({"client_dp.enabled": True, "federation.clients_per_round": 2}, "set federation.clients_per_round = 0"),
    ({"secagg.enabled": True, "secagg.bits": 40}, "secagg.bits must be in 8..32"),
    ({"secagg.enabled": True, "secagg.degree": 5}, "secagg.degree must be even"),
    ({"secagg.enabled": True, "federation.mode": "local"}, "secure aggregation needs federation.mode = federated"),
    ({"secagg.enabled": True, "client_dp.enabled": True, "client_dp.sample_rate": 0.5},
     "does not credit client sampling; set client_dp.sample_rate = 1"),
    ({"secagg.enabled": True, "client_dp.enabled": True, "client_dp.accountant": "prv"}, "set client_dp.accountant"),
    ({"secagg.enabled": True, "client_dp.enabled": True, "client_dp.min_clients": 2}, "client_dp.min_clients must be"),
    ({"client_dp.enabled": True, "client_dp.min_clients": 3}, "applies to distributed DP only"),
    ({"federation.aggregation": "fedprox"}, "federation.aggregation must be one of fedavg, ffa, fedsa"),
    ({"federation.server_optimizer": "adam", "federation.mode": "local"}, "needs an aggregate"),
    ({"personalize.method": "fedsa"}, "only federation.aggregation=fedsa trains"),
    ({"personalize.method": "finetune", "federation.mode": "centralized"}, "starts from the global adapter"),
    ({"personalize.method": "ditto", "privacy.dp": False}, "set personalize.dp = false"),
    ({"personalize.method": "finetune", "personalize.steps": 0}, "personalize.steps must be >= 1"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(FedtuneError, match=message):
        config.load(None, overrides)


def test_secure_aggregation_needs_a_linear_method(monkeypatch):
    """The method table decides: a method that is not a linear sum is refused with secagg."""
    from fedtune import aggregation

    nonlinear = aggregation.Method(sends="", trains_a=True, exact=True, secagg=False, client_dp=False)
    monkeypatch.setitem(aggregation.METHODS, "ffa", nonlinear)
    with pytest.raises(FedtuneError, match="secure aggregation cannot compute it"):
        config.load(None, {"federation.aggregation": "ffa", "secagg.enabled": True})
    with pytest.raises(FedtuneError, match="does not work with client-level DP"):
        config.load(None, {"federation.aggregation": "ffa", "client_dp.enabled": True})
    monkeypatch.undo()
    for name in aggregation.METHODS:  # every implemented method is linear
        config.load(None, {"federation.aggregation": name, "secagg.enabled": True})


def test_bad_files(tmp_path):
    (tmp_path / "a.toml").write_text("[privacy\nepsilon = 3")
    with pytest.raises(FedtuneError, match="not valid TOML"):
        config.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("[privcy]\nepsilon = 3")
    with pytest.raises(FedtuneError, match=r"unknown section \[privcy\] \(did you mean \[privacy\]"):
        config.load(tmp_path / "b.toml")
    with pytest.raises(FedtuneError, match="not found"):
        config.load(tmp_path / "missing.toml")


def test_set_values_parse_as_toml():
    assert config.parse_assignment("privacy.epsilon=3") == ("privacy.epsilon", 3)
    assert config.parse_assignment("model.name=tiny-random-llama") == ("model.name", "tiny-random-llama")
    assert config.parse_assignment("privacy.dp=false") == ("privacy.dp", False)
    with pytest.raises(FedtuneError):
        config.parse_assignment("nothing")
