"""Accounting, the ledger (durable, tamper-evident) and the budget rule."""

from __future__ import annotations

import json
import math

import pytest

from fedtune.errors import FedtuneError
from fedtune.privacy import Ledger, calibrate_noise, check_round, epsilon, epsilon_independent, make_plan
from tests.conftest import tiny_config


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("history", [
    [(1.0, 0.008, 375)],
    [(0.6, 0.04, 12), (0.6, 0.04, 12)],
    [(1.0, 0.008, 375), (1.0, 0.004, 750), (1.5, 0.008, 375)],  # mixed σ and q compose too
])
def test_epsilon_agrees_with_google_dp_accounting(history, accountant):
    ours, theirs = epsilon(history, 1e-5, accountant), epsilon_independent(history, 1e-5, accountant)
    assert ours > 0
    if accountant == "rdp":  # the same bound, computed twice
        assert abs(ours / theirs - 1) < 1e-3
    else:  # PRV (Opacus, ε error bound 0.01) against PLD (dp-accounting)
        assert abs(ours - theirs) < 0.02


def test_calibrated_noise_reaches_the_target_for_the_whole_run():
    sigma = calibrate_noise(3.0, 1e-5, 0.02, 500)
    assert 2.95 < epsilon([(sigma, 0.02, 500)], 1e-5) <= 3.0


def test_ledger_chains_and_survives_reopening(tmp_path):
    ledger = Ledger(tmp_path / "c" / "ledger.jsonl")
    ledger.append({"type": "plan", "noise_multiplier": 1.0})
    ledger.append({"type": "spend", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5, "epsilon": 1.5})
    entries = Ledger(ledger.path).entries()
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    assert Ledger(ledger.path).history() == [(1.0, 0.1, 5)]


def _ledger_with_three(tmp_path) -> Ledger:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append({"type": "plan", "noise_multiplier": 1.0})
    for r in (1, 2):
        ledger.append({"type": "spend", "round": r, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5, "epsilon": 1.0 * r})
    return ledger


def test_editing_one_number_is_detected_and_the_line_named(tmp_path):
    ledger = _ledger_with_three(tmp_path)
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["epsilon"] = 0.5  # under-report the first spend
    lines[1] = json.dumps(entry, sort_keys=True)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FedtuneError, match=r"ledger\.jsonl:2: .*edited"):
        ledger.entries()


@pytest.mark.parametrize("damage, where", [
    (lambda lines: lines[:1] + lines[2:], ":2:"),  # a spend removed
    (lambda lines: [lines[0], lines[2], lines[1]], ":2:"),  # reordered
    (lambda lines: lines[:2] + [lines[2][:40]], ":3:"),  # truncated last line
])
def test_removed_reordered_or_truncated_lines_are_detected(tmp_path, damage, where):
    ledger = _ledger_with_three(tmp_path)
    text = "\n".join(damage(ledger.path.read_text().splitlines()))
    ledger.path.write_text(text + ("" if where == ":3:" else "\n"))
    with pytest.raises(FedtuneError, match=where):
        ledger.entries()


def test_a_round_over_budget_is_refused():
    cfg = tiny_config()
    plan = make_plan(cfg, dataset_size=200)
    history = []
    for _ in range(cfg.federation.rounds):  # σ was calibrated so the planned rounds fit
        decision = check_round(history, plan)
        assert decision.train
        history.append(plan.round_history)
    decision = check_round(history, plan)
    assert not decision.train and decision.epsilon_after > plan.budget
    assert "budget" in decision.reason


def test_plan_without_dp_never_refuses():
    plan = make_plan(tiny_config(privacy={"dp": False}), dataset_size=50)
    assert plan.noise_multiplier == 0 and math.isinf(plan.target_epsilon)
    assert check_round([plan.round_history] * 50, plan).train
