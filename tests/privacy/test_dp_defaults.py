"""DP-aware training defaults (fedtune.privacy.defaults): a pure function of public inputs,
used only for what the user left automatic, recorded in the ledger and summary, and a budget
that trains no useful step refused before anything starts."""

from __future__ import annotations

import pytest

from fedtune.errors import FedtuneError
from fedtune.privacy import make_plan
from fedtune.privacy.defaults import DP_LEARNING_RATE, choose, resolve
from tests.conftest import ROOT, tiny_config


def test_same_public_inputs_give_the_same_choice():
    args = (8.0, 1e-5, 196, 2, 1.0, "smollm2-135m-instruct")
    assert choose(*args) == choose(*args)
    assert choose(*args).to_dict() == choose(*args).to_dict()
    # another record count is another choice (the batch follows N, σ follows q)
    assert choose(8.0, 1e-5, 400, 2, 1.0, "smollm2-135m-instruct").batch_size != choose(*args).batch_size


def test_default_config_under_dp_gets_large_batches_and_the_study_learning_rate():
    from fedtune import config

    cfg = config.load(ROOT / "simulations" / "default.toml")
    assert cfg.train.batch_size == 0 and cfg.train.learning_rate == 0  # automatic by default
    resolved, choice = resolve(cfg, 196)
    t = resolved.train
    assert (t.batch_size, t.local_steps, t.learning_rate) == (73, 2, DP_LEARNING_RATE)
    # compute: 2 rounds × 2 steps × 73 = 292 example passes, ~1.5× the non-DP run's 2 × 6 × 16 = 192
    assert 2 * t.local_steps * t.batch_size <= 1.5 * 2 * round(0.5 * 196 / 16) * 16 + 8
    assert "ε=8" in choice.why and "train.batch_size" in choice.why  # why, and how to override
    plan = make_plan(cfg, 196)  # the plan sees the same resolved settings
    assert (plan.sample_rate, plan.steps_per_round) == (73 / 196, 2)
    assert plan.noise_multiplier == pytest.approx(choice.noise_multiplier)


def test_without_dp_the_old_defaults_and_the_users_settings_are_kept():
    from fedtune import config

    nodp = config.load(ROOT / "simulations" / "default.toml", {"privacy.dp": False})
    resolved, choice = resolve(nodp, 196)
    assert (resolved.train.batch_size, resolved.train.learning_rate, choice) == (16, 0.005, None)
    mine = tiny_config()  # batch 8, lr 0.01, 3 steps: set by the user, never replaced
    assert resolve(mine, 50) == (mine, None)
    only_lr = resolve(tiny_config(train={"learning_rate": 0.0}), 50)[0].train
    assert (only_lr.batch_size, only_lr.local_steps, only_lr.learning_rate) == (8, 3, DP_LEARNING_RATE)


@pytest.mark.parametrize("args, message", [
    ((0.01, 1e-5, 196, 2, 1.0), "no step would learn"),  # σ/B far above a clipped gradient
    ((8.0, 1e-5, 196, 2, 0.001), "trains no batch"),  # 0.4 example passes for 4 steps
    ((8.0, 1e-5, 0, 2, 1.0), "no DP step can be planned"),
])
def test_a_budget_that_trains_no_useful_step_is_refused(args, message):
    with pytest.raises(FedtuneError, match=message):
        choose(*args, "smollm2-135m-instruct")


def test_a_client_left_on_auto_trains_with_its_choice_and_the_ledger_says_why(tmp_path, task_identity, tiny_path):
    from fedtune.client import handle_train
    from fedtune.privacy import Ledger, epsilon_independent
    from fedtune.report import train_choice_lines
    from fedtune.runfolder import ledger_path
    from fedtune.server import initial_adapter
    from tests.client.test_client import _context, _message

    cfg = tiny_config(run={"dir": str(tmp_path)}, train={"batch_size": 0, "learning_rate": 0.0, "local_steps": 0})
    reply = handle_train(_message(initial_adapter(cfg, tiny_path), 1), _context(cfg))
    assert not reply.has_error()
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    plan = ledger.plan()
    choice = plan["train"]["choice"]
    n = plan["dataset_size"]
    assert choice == choose(cfg.privacy.epsilon, cfg.privacy.delta, n, cfg.federation.rounds,
                            cfg.train.local_epochs * cfg.train.dp_compute, cfg.model.name).to_dict()
    assert plan["sample_rate"] == pytest.approx(choice["batch_size"] / n)
    assert plan["steps_per_round"] == choice["local_steps"] and plan["train"]["learning_rate"] == DP_LEARNING_RATE
    assert reply.content["metrics"]["steps"] == choice["local_steps"]
    # σ is calibrated for the chosen (q, steps): the ledger's ε is an independent accountant's
    assert ledger.spends()[-1]["epsilon"] == pytest.approx(epsilon_independent(ledger.history(), plan["delta"]), rel=1e-3)
    line = train_choice_lines([{"client": "client-0", "train": plan["train"]}])[-1]
    assert f"expected batch {choice['batch_size']}" in line and "DP-aware defaults" in line
