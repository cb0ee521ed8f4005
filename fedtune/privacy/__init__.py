"""Privacy: accounting (what ε a history of DP-SGD steps costs), the per-client ledger
(what was spent, durably, tamper-evident) and the budget rule (train only if it fits)."""

from fedtune.privacy.accounting import calibrate_noise, epsilon, epsilon_independent
from fedtune.privacy.budget import Plan, RoundDecision, check_affordable, check_round, make_plan
from fedtune.privacy.ledger import Ledger

__all__ = [
    "Ledger", "Plan", "RoundDecision", "calibrate_noise", "check_affordable", "check_round", "epsilon",
    "epsilon_independent", "make_plan",
]
