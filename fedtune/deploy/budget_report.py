"""`fedtune budget CLIENT_TOML [--verify]`: a data holder's lifetime spend, on its own machine.

Each run that trained on the data set, its ε, the lifetime ε that composes all of them
and what remains of client.budget. ``--verify`` rechecks the hash chain and recomputes every
recorded ε (each run's and the lifetime's) with Google's dp-accounting from the raw σ, q
and steps.
"""

from __future__ import annotations

import math

from fedtune.deploy.lifetime import accountant_of, lifetime_path
from fedtune.deploy.settings import load_client
from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import epsilon, epsilon_independent
from fedtune.privacy.ledger import Ledger

RDP_TOLERANCE = 1e-3  # relative: the same RDP bound by two implementations
PRV_TOLERANCE = 0.02  # absolute: Opacus' PRV against dp-accounting's PLD


def _close(recorded: float, again: float, accountant: str) -> bool:
    if recorded == 0 or math.isinf(recorded):
        return again == recorded
    return abs(again / recorded - 1) <= RDP_TOLERANCE if accountant == "rdp" else abs(again - recorded) <= PRV_TOLERANCE


def _verify(path, entries: list[dict]) -> list[str]:
    """Every recorded ε that dp-accounting does not reproduce, as 'file:line: what'."""
    problems, lifetime, runs = [], [], {}
    for line, e in enumerate(entries, 1):
        if e["type"] != "spend":
            continue
        step = (e["noise_multiplier"], e["sample_rate"], e["steps"])
        lifetime.append(step)
        runs.setdefault(e["run"], []).append(step)
        checks = [("lifetime", lifetime, e["delta"], e["accountant"], e["epsilon"]),
                  (f"run {e['run']}", runs[e["run"]], e["run_delta"], e["run_accountant"], e["run_epsilon"])]
        for what, history, delta, accountant, recorded in checks:
            again = epsilon_independent(history, delta, accountant)
            if not _close(recorded, again, accountant):
                problems.append(f"{path}:{line}: recorded {what} ε {recorded:.6g} after round {e['round']}, but "
                                f"dp-accounting recomputes {again:.6g} from the recorded σ, q and steps")
    return problems


def report(config_path: str, verify: bool = False) -> dict:
    s = load_client(config_path)
    dataset = s.dataset or s.name
    path = lifetime_path(s.state, dataset)
    if not path.is_file():
        raise FedtuneError(f"{path} not found: data set {dataset!r} has spent nothing yet (or client.state/"
                           "client.dataset point elsewhere)")
    entries = Ledger(path).entries()  # FedtuneError naming file:line on a damaged ledger
    spends = [e for e in entries if e["type"] == "spend"]
    delta, accountant = s.policy.max_delta, accountant_of(s.policy.accountants)
    runs: dict[str, dict] = {}
    for e in spends:
        r = runs.setdefault(e["run"], {"run": e["run"], "rounds": 0, "epsilon": 0.0})
        r["rounds"] += 1
        r["epsilon"] = e["run_epsilon"]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in spends]
    total = epsilon(history, delta, accountant)
    return {
        "dataset": dataset, "ledger": str(path), "budget": s.budget, "delta": delta, "accountant": accountant,
        "files": [{"digest": e["digest"], "data_file": e["data_file"], "time": e["time"]}
                  for e in entries if e["type"] == "dataset"],
        "runs": list(runs.values()), "lifetime_epsilon": total, "remaining": s.budget - total,
        "refusals": [{"run": e["run"], "round": e["round"], "reason": e["reason"]}
                     for e in entries if e["type"] == "refusal"],
        "verified": verify, "problems": _verify(path, entries) if verify else [],
    }


def print_report(r: dict) -> None:
    print(f"data set {r['dataset']}: {r['ledger']}")
    for i, f in enumerate(r["files"]):
        print(f"  {'data file' if i == 0 else 'changed to'} sha256 {f['digest'][:16]} ({f['data_file']}, {f['time']})")
    for run in r["runs"]:
        print(f"  run {run['run']}: {run['rounds']} round(s), ε = {run['epsilon']:.4f}")
    for x in r["refusals"]:
        print(f"  refused: run {x['run']} round {x['round']}: {x['reason']}")
    print(f"lifetime ε = {r['lifetime_epsilon']:.4f} at δ = {r['delta']:g} ({r['accountant']}), budget "
          f"{r['budget']:g}, remaining {max(r['remaining'], 0.0):.4f}")
    if r["verified"]:
        for p in r["problems"]:
            print(f"problem: {p}")
        print("verified: the hash chain holds and dp-accounting reproduces every recorded ε" if not r["problems"]
              else f"verify: {len(r['problems'])} problem(s)")


def cmd_budget(args) -> int:
    r = report(args.config, args.verify)
    if args.json:
        import json

        print(json.dumps(r, indent=2, default=str))
    else:
        print_report(r)
    return 1 if r["problems"] else 0
