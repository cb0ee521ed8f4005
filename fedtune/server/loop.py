"""The round loop, read top to bottom: set up, evaluate the base model, then per round
train -> aggregate -> save the global adapter -> evaluate. It is Flower's
``Strategy.start`` spelled out, so that round 0 is a federated evaluation of the base
model and every client's outcome lands in ``metrics.jsonl`` as it happens. A run folder
that already holds completed rounds continues after the last of them (fedtune.server.resume).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune import config as config_mod
from fedtune import exchange, receipts
from fedtune.aggregation import shared
from fedtune.floor import check_floor, known_names
from fedtune.model import resolve_model, save_adapter
from fedtune.privacy import Ledger, Plan
from fedtune.privacy.empirical import PLANT_FILE, plant
from fedtune.runfolder import adapter_dir, append_jsonl, now, read_jsonl, update_run_file, write_json
from fedtune.server import budget, resume
from fedtune.server.aggregation import ServerOptimizer, optimize, server_optimizer
from fedtune.server.secure import secure_round
from fedtune.server.setup import initial_adapter, make_strategy, tolerate_dropouts, wait_for_nodes
from fedtune.server.strategy import AdapterFedAvg


@dataclass
class ServerRun:
    """What the loop carries from round to round."""
    grid: Grid
    cfg: config_mod.Config
    run_dir: Path
    model_path: str
    initial: dict[str, torch.Tensor]  # the full adapter at its seeded init
    strategy: AdapterFedAvg
    opt: ServerOptimizer
    arrays: ArrayRecord  # the global adapter: what the aggregation method sends
    label: str = ""  # the adapter folder of the last completed round
    ledger: Ledger | None = None  # client-level DP: the server's own ledger
    plan: Plan | None = None
    ddg: object = None  # distributed DP's parameters (client-level DP under secure aggregation)

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def full(self, part: ArrayRecord) -> dict[str, torch.Tensor]:
        return {**self.initial, **part.to_torch_state_dict()}

    def progress(self, round_: int, phase: str) -> None:
        write_json(self.run_dir / "progress.json",
                   {"round": round_, "rounds": self.cfg.federation.rounds, "phase": phase, "time": now()})


def run(grid: Grid, cfg: config_mod.Config, run_dir: Path) -> None:
    """Every round of the run (after the last completed one, when resumed)."""
    random.seed(cfg.run.seed)  # which clients are sampled each round (without client-level DP)
    done, label = resume.restart(run_dir)  # (-1, "") for a new run; else continue after round `done`
    r = prepare(grid, cfg, run_dir, label)
    if done >= 0:
        log(INFO, "fedtune: resuming after round %d of %d (global adapter: %s)", done, cfg.federation.rounds,
            label or "initial")
    else:
        base_eval = evaluate(r, 0)
        append_jsonl(r.metrics_file, {"round": 0, "phase": "round", "adapter": "", "time": now(), **base_eval})
        log(INFO, "fedtune: base model held-out perplexity %s", base_eval.get("perplexity", "n/a"))
    for round_ in range(max(done, 0) + 1, cfg.federation.rounds + 1):
        if not train_round(r, round_):
            break
    if r.strategy.local:  # the local-only baseline: each client's own adapter
        for node, own in r.strategy.local_arrays.items():
            save_adapter(adapter_dir(run_dir, f"local-{r.strategy.names[node]}"), r.full(own), cfg, r.model_path)
    else:
        save_adapter(adapter_dir(run_dir, "global"), r.full(r.arrays), cfg, r.model_path)
    r.progress(cfg.federation.rounds, "done")


def prepare(grid: Grid, cfg: config_mod.Config, run_dir: Path, label: str) -> ServerRun:
    """The initial (or resumed) global adapter, the strategy, the server's plan, every client."""
    write_json(run_dir / "progress.json", {"round": 0, "rounds": cfg.federation.rounds, "phase": "setup", "time": now()})
    if (cfg.audit.canaries or cfg.audit.secrets) and not (run_dir / PLANT_FILE).exists():
        write_json(run_dir / PLANT_FILE, plant(cfg))  # the auditor's key; clients read their share
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    initial = initial_adapter(cfg, model_path)
    update_run_file(run_dir, model_path=model_path, adapter_parameters=sum(v.numel() for v in initial.values()))
    # Messages carry only what the aggregation method sends; the server keeps the full adapter.
    sent = shared(cfg.federation.aggregation, initial)
    ledger = plan = ddg = None
    if cfg.client_dp.enabled:
        ledger, plan, ddg = budget.server_plan(cfg, run_dir, sum(v.numel() for v in sent.values()))
    strategy = make_strategy(cfg, {k: tuple(v.shape) for k, v in sent.items()}, plan)
    strategy.names.update(known_names(read_jsonl(run_dir / "metrics.jsonl")))  # resumed: name clients that fail at once
    wait_for_nodes(grid, cfg.num_clients, cfg.federation.round_timeout)
    tolerate_dropouts(strategy)
    opt = server_optimizer(cfg)
    arrays = ArrayRecord(sent)
    if label:  # the global adapter after the last completed round, and the optimizer's moments then
        arrays = ArrayRecord(shared(cfg.federation.aggregation, resume.load_global(run_dir, label, initial)))
        resume.load_optimizer(run_dir, label, opt)
    return ServerRun(grid, cfg, run_dir, model_path, initial, strategy, opt, arrays, label, ledger, plan, ddg)


def evaluate(r: ServerRun, round_: int, skip: frozenset[int] = frozenset()) -> dict:
    """Federated evaluation of the global adapter; one row per client in metrics.jsonl.
    Nodes in ``skip`` (they missed a stage of this round's secure aggregation) are not asked: one
    killed a moment ago still counts as connected until Flower's 60 s heartbeat lapses."""
    r.progress(round_, "evaluate")
    t0 = time.perf_counter()
    asked = [m for m in r.strategy.configure_evaluate(round_, r.arrays, ConfigRecord(), r.grid)
             if m.metadata.dst_node_id not in skip]
    replies = exchange.send_and_receive(r.grid, asked, r.cfg.federation.round_timeout)
    pooled = r.strategy.aggregate_evaluate(round_, replies)
    for o in r.strategy.outcomes:
        append_jsonl(r.metrics_file, receipts.row({"round": round_, "phase": "evaluate", "client": o.client,
                                                   "node": o.node, "status": o.status, "reason": o.reason}, o.metrics))
    return {**(dict(pooled) if pooled is not None else {}), "evaluate-seconds": time.perf_counter() - t0}


def train_round(r: ServerRun, round_: int) -> bool:
    """One round: sample and send, aggregate (securely), record, save, evaluate. False: stop the run."""
    t0 = time.perf_counter()
    if r.ledger is not None and not budget.affords_round(r.ledger, r.plan, round_):  # client-level budget spent
        return False
    r.progress(round_, "train")
    log(INFO, "fedtune: round %d/%d", round_, r.cfg.federation.rounds)
    new_arrays, outcomes, secure_info = aggregate(r, round_)
    train_seconds = time.perf_counter() - t0
    if r.ledger is not None and secure_info.get("secagg-aborted"):  # nothing released this round
        r.ledger.record_abort(round_, secure_info["secagg-aborted"])
    receipts.record(r.run_dir, round_, outcomes)  # what arrived, hash-chained, before it is used
    for o in outcomes:
        append_jsonl(r.metrics_file, receipts.row({"round": round_, "phase": "train", "client": o.client, "node": o.node,
                                                   "status": o.status, "reason": o.reason,
                                                   "ledger_head": o.ledger_head}, o.metrics))
    check_floor(r.cfg.federation.min_clients, round_, outcomes)  # too few trained: the run fails, naming them
    if r.ledger is not None and r.ddg is None:  # recorded before the noisy model is saved or sent
        budget.record_fedavg_spend(r.ledger, r.plan, round_, len(r.strategy.sampled),
                                   sum(o.status == "ok" for o in outcomes))
    if new_arrays is not None:
        r.arrays = optimize(r.opt, r.arrays, new_arrays)
        r.label = f"round-{round_:03d}"
        save_adapter(adapter_dir(r.run_dir, r.label), r.full(r.arrays), r.cfg, r.model_path)
        resume.save_optimizer(r.run_dir, r.label, r.opt)
    dropped = set(secure_info.get("secagg-dropped", ()))
    pooled = evaluate(r, round_, frozenset(o.node for o in outcomes if o.client in dropped))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "refused", "failed", "rejected")}
    # Last: this row marks the round completed (fedtune.server.resume).
    append_jsonl(r.metrics_file, {"round": round_, "phase": "round", "adapter": r.label, "time": now(),
                                  "seconds": time.perf_counter() - t0,
                                  "train-seconds": train_seconds, "trained": counts["ok"], "refused": counts["refused"],
                                  "failed": counts["failed"], "rejected": counts["rejected"], **secure_info, **pooled})
    if counts["ok"] == 0 and counts["refused"] == len(outcomes) and outcomes:
        log(INFO, "fedtune: every client refused (privacy budgets spent); stopping after round %d", round_)
        return False
    return True


def aggregate(r: ServerRun, round_: int):
    """The sampled clients' training and their aggregate: (new arrays or None, outcomes, secure-round info)."""
    messages = r.strategy.configure_train(round_, r.arrays, ConfigRecord(), r.grid)
    timeout = r.cfg.federation.round_timeout
    if r.cfg.secagg.enabled:  # the same clients, but the server only learns their sum
        spend = (budget.distributed_spend(r.ledger, r.plan, r.ddg, round_, len(r.strategy.sampled))
                 if r.ddg is not None else None)
        return secure_round(r.grid, r.cfg, round_, r.arrays, messages, timeout, r.strategy, r.ddg, spend)
    new_arrays, _ = r.strategy.aggregate_train(round_, exchange.send_and_receive(r.grid, messages, timeout))
    return new_arrays, list(r.strategy.outcomes), {}
