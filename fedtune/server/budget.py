"""The server's own privacy ledger under client-level DP: its plan (fixed before round 0),
the budget rule before each round, and each round's spend (DP-FedAvg, or the distributed
discrete Gaussian under secure aggregation), written before anything is released."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common.logger import log

from fedtune import config as config_mod
from fedtune.privacy import Ledger, Plan, check_round, client_level as dp_fedavg, distributed, epsilon
from fedtune.runfolder import server_ledger_path


def server_plan(cfg: config_mod.Config, run_dir: Path, dim: int):
    """The server's client-level DP plan, fixed in its ledger before the first round; with
    secure aggregation also the distributed-DP parameters every client derives too."""
    ledger = Ledger(server_ledger_path(run_dir))
    entry = ledger.plan()
    if entry is not None:
        ddg = distributed.DDGPlan.from_dict(entry["ddg"]) if entry.get("ddg") else None
        return ledger, Plan.from_entry(entry), ddg
    plan = dp_fedavg.make_server_plan(cfg)
    if cfg.secagg.enabled:
        ddg = distributed.plan_for(cfg, dim, plan.noise_multiplier)
        about = {"mechanism": distributed.MECHANISM, "unit": distributed.UNIT, "covers": distributed.COVERS,
                 "not_covered": distributed.NOT_COVERED, "ddg": ddg.to_dict()}
    else:
        ddg = None
        about = {"mechanism": "DP-FedAvg (Gaussian, Poisson client sampling)", "unit": dp_fedavg.UNIT,
                 "covers": dp_fedavg.COVERS, "not_covered": dp_fedavg.NOT_COVERED}
    ledger.record_plan(plan, client="server", **about)
    return ledger, plan, ddg


def affords_round(ledger: Ledger, plan: Plan, round_: int) -> bool:
    """The budget rule before a round; a refusal is recorded and logged (the run stops)."""
    decision = check_round(ledger.history(), plan)
    if decision.train:
        return True
    ledger.record_refusal(round_, decision.reason, epsilon_spent=decision.epsilon_before,
                          epsilon_if_trained=decision.epsilon_after, budget=plan.budget)
    log(INFO, "fedtune: stopping before round %d: client-level %s", round_, decision.reason)
    return False


def record_fedavg_spend(ledger: Ledger, plan: Plan, round_: int, sampled: int, accepted: int) -> None:
    """DP-FedAvg: this round's release, recorded before the noisy model is saved or sent."""
    spent = epsilon(ledger.history() + [plan.round_history], plan.delta, plan.accountant)
    ledger.record_spend(round_, plan, spent, steps=1, sampled=sampled, accepted=accepted)


def distributed_spend(ledger: Ledger, plan: Plan, ddg, round_: int, sampled: int):
    """``before_unmask`` for distributed DP: abort with too few clients' noise in the sum or
    over budget; otherwise write this round's spend (for the clients actually in the sum)
    to the server ledger, durably, before anything is unmasked."""

    def check(included: list[int]) -> str:
        n = len(included)
        if n < ddg.min_clients:
            return (f"distributed DP: only {n} clients' noise is in the sum, {ddg.min_clients} needed "
                    "(client_dp.min_clients); nothing was unmasked")
        sigma = ddg.noise_multiplier(n)
        decision = check_round(ledger.history(), plan, (sigma, 1.0, 1))
        if not decision.train:
            return (f"distributed DP: this round would raise ε to {decision.epsilon_after:.3f}, "
                    f"above the budget {plan.budget:g}")
        ledger.record_spend(round_, plan, decision.epsilon_after, steps=1, sampled=sampled, accepted=n,
                            clients_in_sum=n, sample_rate=1.0, noise_multiplier=sigma, mechanism="ddg",
                            local_stddev=ddg.local_stddev, tau=distributed.tau(n, ddg.local_stddev))
        return ""

    return check
