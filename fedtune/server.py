"""What the coordinator's ServerApp does: run the rounds and keep the run folder.

Read top to bottom: set up (run folder, initial adapter, strategy), evaluate the base
model, then per round train -> aggregate -> save the global adapter -> evaluate, and
finally write the summary. The loop is Flower's ``Strategy.start`` spelled out, so that
round 0 is a federated evaluation of the base model and every client's outcome lands in
``metrics.jsonl`` as it happens. A run folder that already holds completed rounds (a
server restarted with ``fedtune run --resume``) continues after the last of them
(fedtune.resume).
"""

from __future__ import annotations

import random
import time
import traceback
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune import config as config_mod
from fedtune import names, receipts, resume
from fedtune.aggregation import ServerOptimizer, server_optimizer, shared
from fedtune.errors import FedtuneError
from fedtune.floor import check_floor, known_names
from fedtune.model import add_lora, get_adapter_state, load_base_model, resolve_model, save_adapter
from fedtune.report import write_summary
from fedtune.runfolder import (
    RUN_FILE, adapter_dir, append_jsonl, atomic_write_text, file_lock, is_run_dir, now, read_json, read_jsonl, run_dir_for,
    server_ledger_path, update_run_file, versions, write_json,
)
from fedtune.strategy import AdapterFedAvg, ClientDPFedAvg, Outcome, log_refusal


def initial_adapter(cfg: config_mod.Config, model_path: str) -> dict[str, torch.Tensor]:
    """Fresh LoRA weights (A random from run.seed, B zero): the base model's behaviour."""
    base = load_base_model(model_path, torch.device("cpu"))
    state = get_adapter_state(add_lora(base, cfg, seed=cfg.run.seed))
    del base
    return state


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (have := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise FedtuneError(
                f"only {have} of {wanted} clients connected within {timeout:.0f} s; start more clients, "
                f"or for `flwr run` pass --federation-config 'num-supernodes={wanted}'"
            )
        time.sleep(1.0)


def tolerate_dropouts(strategy) -> None:
    """Every client joined; from now on a round goes ahead with the clients still connected
    (Flower's strategies otherwise wait for all of them, so one dead client stalls the run)."""
    strategy.min_available_nodes = strategy.min_train_nodes = strategy.min_evaluate_nodes = 1


def main(grid: Grid, context: Context) -> None:
    """The ServerApp's main: one federated run, recorded in its run folder."""
    cfg = config_mod.from_flat(dict(context.run_config))
    run_dir = run_dir_for(cfg, context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One ServerApp per run folder; the OS drops the lock when it dies, so a killed server's
    # run can be resumed at once and a running one is never run twice.
    with file_lock(run_dir / resume.SERVER_LOCK, busy=f"another ServerApp is running the run in {run_dir}"):
        before = read_json(run_dir / RUN_FILE) if is_run_dir(run_dir) else {}
        done = resume.check(run_dir, cfg) if before else -1  # FedtuneError: leaves the folder as it was
        atomic_write_text(run_dir / "config.toml", config_mod.dump_toml(cfg))
        starts = before.get("starts", []) + [{"flwr_run_id": str(context.run_id), "after_round": done, "time": now()}]
        restarted = {"resumed_from_round": done} if len(starts) > 1 else {}
        update_run_file(run_dir, status="running", flwr_run_id=str(context.run_id),
                        flwr_run_ids=[st["flwr_run_id"] for st in starts], starts=starts,
                        started=before.get("started", now()), mode=cfg.federation.mode, dp=cfg.privacy.dp,
                        versions=versions(), **restarted,
                        **{k: None for k in ("finished", "error", "traceback") if k in before})
        if cfg.privacy.seed >= 0:  # said where anyone looks: run.json, the server's log, the summary
            warning = (f"privacy.seed={cfg.privacy.seed}: DP noise, sampling and secure-aggregation rounding are "
                       "reproducible (tests only); the run's DP guarantee does NOT hold")
            update_run_file(run_dir, seeded=True, warning=warning)
            log(WARNING, "fedtune: %s", warning)
        try:
            run(grid, cfg, run_dir)
        except BaseException as exc:
            update_run_file(run_dir, status="failed", finished=now(), error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc())
            try:  # who failed and why, in summary.md too (run.json has the error in any case)
                write_summary(run_dir)
            except Exception:  # noqa: BLE001 - a run that failed before its first row has no summary
                pass
            raise
        update_run_file(run_dir, status="completed", finished=now())
        write_summary(run_dir)


def client_level(cfg: config_mod.Config, run_dir: Path, dim: int):
    """The server's client-level DP plan, fixed in its ledger before the first round; with
    secure aggregation also the distributed-DP parameters every client derives too."""
    from fedtune.privacy import Ledger, Plan
    from fedtune.privacy import client_level as central
    from fedtune.privacy import distributed

    ledger = Ledger(server_ledger_path(run_dir))
    entry = ledger.plan()
    if entry is not None:
        ddg = distributed.DDGPlan.from_dict(entry["ddg"]) if entry.get("ddg") else None
        return ledger, Plan.from_entry(entry), ddg
    plan = central.make_server_plan(cfg)
    if cfg.secagg.enabled:
        ddg = distributed.plan_for(cfg, dim, plan.noise_multiplier)
        about = {"mechanism": distributed.MECHANISM, "unit": distributed.UNIT, "covers": distributed.COVERS,
                 "not_covered": distributed.NOT_COVERED, "ddg": ddg.to_dict()}
    else:
        ddg = None
        about = {"mechanism": "DP-FedAvg (Gaussian, Poisson client sampling)", "unit": central.UNIT,
                 "covers": central.COVERS, "not_covered": central.NOT_COVERED}
    ledger.append({**plan.to_entry(), "client": "server", **about, "time": now()})
    return ledger, plan, ddg


def distributed_spend(ledger, plan, ddg, round_: int, sampled: int):
    """``before_unmask`` for distributed DP: abort with too few clients' noise in the sum or
    over budget; otherwise write this round's spend (for the clients actually in the sum)
    to the server ledger, durably, before anything is unmasked."""
    from fedtune.privacy import epsilon
    from fedtune.privacy.distributed import tau

    def check(included: list[int]) -> str:
        n = len(included)
        if n < ddg.min_clients:
            return (f"distributed DP: only {n} clients' noise is in the sum, {ddg.min_clients} needed "
                    "(client_dp.min_clients); nothing was unmasked")
        sigma = ddg.noise_multiplier(n)
        spent = epsilon(ledger.history() + [(sigma, 1.0, 1)], plan.delta, plan.accountant)
        if spent > plan.budget:
            return f"distributed DP: this round would raise ε to {spent:.3f}, above the budget {plan.budget:g}"
        ledger.append({"type": "spend", "round": round_, "steps": 1, "sampled": sampled, "accepted": n,
                       "clients_in_sum": n, "sample_rate": 1.0, "noise_multiplier": sigma, "clip_norm": plan.clip_norm,
                       "delta": plan.delta, "accountant": plan.accountant, "epsilon": spent, "mechanism": "ddg",
                       "local_stddev": ddg.local_stddev, "tau": tau(n, ddg.local_stddev), "time": now()})
        return ""

    return check


def secure_round(grid: Grid, cfg: config_mod.Config, round_: int, arrays: ArrayRecord, messages, timeout: float,
                 strategy: AdapterFedAvg, ddg=None, before_unmask=None) -> tuple[ArrayRecord | None, list[Outcome], dict]:
    """A training round under SecAgg+ with the clients the strategy sampled."""
    from fedtune.secagg.flower import Encoding, secure_train
    from fedtune.secagg.roster import registered_check

    nodes = sorted(m.metadata.dst_node_id for m in messages)
    g = cfg.secagg
    sec = secure_train(grid, nodes, round_, arrays, Encoding(g.bits, g.clip, g.max_weight, n_max=len(nodes), ddg=ddg),
                       g.degree, g.threshold, timeout, before_unmask, min_inputs=g.min_inputs, admit=registered_check())
    outcomes = []
    for node in nodes:
        reply = sec.replies.get(node)
        metrics = dict(reply.content["metrics"]) if reply is not None and "metrics" in reply.content.metric_records else {}
        info = dict(reply.content["client"]) if reply is not None and "client" in reply.content.config_records else {}
        name = sec.names.get(node) or names.reported(info.get("name", strategy.names.get(node)), node)  # key-bound first
        strategy.names[node] = name
        if metrics.get("refused"):
            outcome = Outcome(node, name, "refused", metrics, str(info.get("reason", "refused")))
            log_refusal(name, round_, outcome.reason)
        elif sec.aborted:
            outcome = Outcome(node, name, "failed", metrics, sec.aborted)
        elif node in sec.included:
            outcome = Outcome(node, name, "ok", metrics, ledger_head=str(info.get("ledger-head", "")))
        else:
            outcome = Outcome(node, name, "failed", metrics, sec.lost.get(node, "not in the secure sum"))
        outcome.metrics["secagg-upload-bytes"] = sec.upload_bytes.get(node, 0)
        outcomes.append(outcome)
    info = {"secagg-included": len(sec.included), "secagg-aborted": sec.aborted,
            **{f"secagg-{k}-seconds": v for k, v in sec.seconds.items()}}
    return sec.arrays, outcomes, info


def optimize(opt: ServerOptimizer, old: ArrayRecord, average: ArrayRecord) -> ArrayRecord:
    """The server optimizer's step from the global ``old`` towards the clients' ``average``."""
    if opt.kind == "none":
        return average
    new = opt.step({k: v.numpy() for k, v in old.items()}, {k: v.numpy() for k, v in average.items()})
    return ArrayRecord({k: Array(v) for k, v in new.items()})


def run(grid: Grid, cfg: config_mod.Config, run_dir: Path) -> None:
    from fedtune.privacy import check_round, epsilon
    from fedtune.privacy.client_level import Sampler
    from fedtune.privacy.empirical import PLANT_FILE, plant

    random.seed(cfg.run.seed)  # which clients are sampled each round (without client-level DP)
    rounds = cfg.federation.rounds
    metrics_file = run_dir / "metrics.jsonl"
    done, label = resume.restart(run_dir)  # (-1, "") for a new run; else continue after round `done`

    def progress(round_: int, phase: str) -> None:
        write_json(run_dir / "progress.json", {"round": round_, "rounds": rounds, "phase": phase, "time": now()})

    progress(0, "setup")
    if (cfg.audit.canaries or cfg.audit.secrets) and not (run_dir / PLANT_FILE).exists():
        write_json(run_dir / PLANT_FILE, plant(cfg))  # the auditor's key; clients read their share
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    initial = initial_adapter(cfg, model_path)
    update_run_file(run_dir, model_path=model_path, adapter_parameters=sum(v.numel() for v in initial.values()))
    # Messages carry only what the aggregation method sends; the server keeps the full adapter.
    method = cfg.federation.aggregation
    template = {k: tuple(v.shape) for k, v in shared(method, initial).items()}
    opt = server_optimizer(cfg)
    server_ledger = ddg = None
    if cfg.client_dp.enabled:
        server_ledger, server_plan, ddg = client_level(cfg, run_dir, sum(v.numel() for v in shared(method, initial).values()))
        strategy = ClientDPFedAvg(num_clients=cfg.num_clients, template=template, plan=server_plan,
                                  sampler=Sampler(cfg.privacy.seed if cfg.privacy.seed >= 0 else None))
    else:
        strategy = AdapterFedAvg(num_clients=cfg.num_clients, clients_per_round=cfg.clients_per_round,
                                 template=template, local=cfg.federation.mode == "local")
    strategy.names.update(known_names(read_jsonl(metrics_file)))  # resumed: name clients that fail at once
    wait_for_nodes(grid, cfg.num_clients, cfg.federation.round_timeout)
    tolerate_dropouts(strategy)
    timeout = cfg.federation.round_timeout
    arrays = ArrayRecord(shared(method, initial))
    if label:  # the global adapter after the last completed round, and the optimizer's moments then
        arrays = ArrayRecord(shared(method, resume.load_global(run_dir, label, initial)))
        resume.load_optimizer(run_dir, label, opt)
    if done >= 0:
        log(INFO, "fedtune: resuming after round %d of %d (global adapter: %s)", done, rounds, label or "initial")

    def full(part: ArrayRecord) -> dict[str, torch.Tensor]:
        return {**initial, **part.to_torch_state_dict()}

    def evaluate(round_: int) -> dict:
        progress(round_, "evaluate")
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_evaluate(round_, arrays, ConfigRecord(), grid), timeout=timeout)
        pooled = strategy.aggregate_evaluate(round_, replies)
        for o in strategy.outcomes:
            append_jsonl(metrics_file, receipts.row({"round": round_, "phase": "evaluate", "client": o.client,
                                                     "node": o.node, "status": o.status, "reason": o.reason}, o.metrics))
        return {**(dict(pooled) if pooled is not None else {}), "evaluate-seconds": time.perf_counter() - t0}

    if done < 0:
        base_eval = evaluate(0)
        append_jsonl(metrics_file, {"round": 0, "phase": "round", "adapter": "", "time": now(), **base_eval})
        log(INFO, "fedtune: base model held-out perplexity %s", base_eval.get("perplexity", "n/a"))

    for round_ in range(max(done, 0) + 1, rounds + 1):
        t0 = time.perf_counter()
        if server_ledger is not None:  # client-level budget: the server releases nothing past it
            decision = check_round(server_ledger.history(), server_plan)
            if not decision.train:
                server_ledger.append({"type": "refusal", "round": round_, "epsilon_spent": decision.epsilon_before,
                                      "epsilon_if_trained": decision.epsilon_after, "budget": server_plan.budget,
                                      "reason": decision.reason, "time": now()})
                log(INFO, "fedtune: stopping before round %d: client-level %s", round_, decision.reason)
                break
        progress(round_, "train")
        log(INFO, "fedtune: round %d/%d", round_, rounds)
        messages = strategy.configure_train(round_, arrays, ConfigRecord(), grid)
        secure_info = {}
        if cfg.secagg.enabled:  # the same clients, but the server only learns their sum
            spend = (distributed_spend(server_ledger, server_plan, ddg, round_, len(strategy.sampled))
                     if ddg is not None else None)
            new_arrays, outcomes, secure_info = secure_round(grid, cfg, round_, arrays, messages, timeout, strategy,
                                                             ddg, spend)
        else:
            new_arrays, _ = strategy.aggregate_train(round_, grid.send_and_receive(messages, timeout=timeout))
            outcomes = list(strategy.outcomes)
        train_seconds = time.perf_counter() - t0
        if server_ledger is not None and secure_info.get("secagg-aborted"):  # nothing released this round
            server_ledger.append({"type": "abort", "round": round_, "reason": secure_info["secagg-aborted"], "time": now()})
        receipts.record(run_dir, round_, outcomes)  # what arrived, hash-chained, before it is used
        for o in outcomes:
            append_jsonl(metrics_file, receipts.row({"round": round_, "phase": "train", "client": o.client, "node": o.node,
                                                     "status": o.status, "reason": o.reason,
                                                     "ledger_head": o.ledger_head}, o.metrics))
        check_floor(cfg.federation.min_clients, round_, outcomes)  # too few trained: the run fails, naming them
        if server_ledger is not None and ddg is None:  # recorded before the noisy model is saved or sent
            history = server_ledger.history() + [server_plan.round_history]
            server_ledger.append({"type": "spend", "round": round_, "steps": 1, "sampled": len(strategy.sampled),
                                  "accepted": sum(o.status == "ok" for o in outcomes),
                                  "sample_rate": server_plan.sample_rate, "noise_multiplier": server_plan.noise_multiplier,
                                  "clip_norm": server_plan.clip_norm, "delta": server_plan.delta,
                                  "accountant": server_plan.accountant,
                                  "epsilon": epsilon(history, server_plan.delta, server_plan.accountant), "time": now()})
        if new_arrays is not None:
            arrays = optimize(opt, arrays, new_arrays)
            label = f"round-{round_:03d}"
            save_adapter(adapter_dir(run_dir, label), full(arrays), cfg, model_path)
            resume.save_optimizer(run_dir, label, opt)
        pooled = evaluate(round_)
        counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "refused", "failed", "rejected")}
        # Last: this row marks the round completed (fedtune.resume).
        append_jsonl(metrics_file, {"round": round_, "phase": "round", "adapter": label, "time": now(),
                                    "seconds": time.perf_counter() - t0,
                                    "train-seconds": train_seconds, "trained": counts["ok"], "refused": counts["refused"],
                                    "failed": counts["failed"], "rejected": counts["rejected"], **secure_info, **pooled})
        if counts["ok"] == 0 and counts["refused"] == len(outcomes) and outcomes:
            log(INFO, "fedtune: every client refused (privacy budgets spent); stopping after round %d", round_)
            break

    if strategy.local:  # the local-only baseline: each client's own adapter
        for node, own in strategy.local_arrays.items():
            save_adapter(adapter_dir(run_dir, f"local-{strategy.names[node]}"), full(own), cfg, model_path)
    else:
        save_adapter(adapter_dir(run_dir, "global"), full(arrays), cfg, model_path)
    progress(rounds, "done")
