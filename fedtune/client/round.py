"""One local round, top to bottom: the operator's policy, a resend of what was paid for,
the plan and the budget (the run's ledger, a deployed data set's lifetime ledger), one
round of DP-SGD, the clip of client-level DP, the spend (fsync'ed before anything leaves)
and the release kept for a resend. A refused round writes a refusal and sends no update.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

from flwr.app import Context, Message

from fedtune import release, revealed
from fedtune.aggregation import set_trainable, shared
from fedtune.client.reply import error_reply
from fedtune.client.secure import check_ddg_dim
from fedtune.client.setup import ClientSetup, generators, reproducible_seed, setup
from fedtune.client.state import full_adapter, resend, save_kept, store_release
from fedtune.deploy.lifetime import Lifetime, open_lifetime
from fedtune.errors import FedtuneError
from fedtune.floor import failure_reason
from fedtune.memory import physical_batch
from fedtune.privacy import Ledger, Plan, check_round, epsilon, make_plan
from fedtune.privacy.client_level import clip_update
from fedtune.privacy.user_level import check_same_unit, dataset_units, unit_of
from fedtune.runfolder import client_dir, file_lock, ledger_path, write_json
from fedtune.secagg.flower import LocalUpdate

COVERS = "the LoRA adapter weights this client sends to the server"
NOT_COVERED = revealed.NOT_COVERED


@dataclass
class Request:
    """One train request as this client sees it."""
    s: ClientSetup
    ledger: Ledger
    server_round: int
    secure: bool
    lifetime: Lifetime | None
    clip: float = 0.0  # client-level DP: the bound the server asks this client's update to keep
    asked: str = ""  # the request's fingerprint (fedtune.release)


class TrainingFailed(RuntimeError):
    """Training raised (out of memory included); named in the server's log, nothing spent."""


def local_round(msg: Message, context: Context, secure: bool) -> LocalUpdate | Message:
    """Budget check, one round of (DP-)training and the ledger spend, or a refusal."""
    try:
        s = setup(context)
    except FedtuneError as exc:
        return error_reply(msg, "client setup", exc)
    if secure:
        try:
            check_ddg_dim(msg, context, s)
        except (FedtuneError, KeyError) as exc:
            return error_reply(msg, s.name, exc)
    server_round = int(msg.content["config"]["server-round"])
    lifetime = None
    if s.node is not None:  # deployed: the data set's lifetime budget, across every run
        try:
            lifetime = open_lifetime(s.node.state_dir, s.node.dataset, s.node.data_file, s.node.budget, s.node.policy)
        except FedtuneError as exc:
            return error_reply(msg, s.name, exc)
    # One request at a time per client: a restarted server's request may arrive while the
    # crashed server's is still training; the second one then finds the first's release.
    with file_lock(client_dir(s.run_dir, s.name) / ".round.lock"), (lifetime.lock() if lifetime else nullcontext()):
        req = Request(s, Ledger(ledger_path(s.run_dir, s.name)), server_round, secure, lifetime)
        return spend_and_train(msg, req)


def plan_of(ledger: Ledger, s: ClientSetup, server_round: int = 0) -> Plan:
    """The ledger's plan, or a new one written before the first round."""
    entry = ledger.plan()
    size = dataset_units(s.cfg, s.train)  # records, or people under the user unit
    if entry is not None:
        plan = Plan.from_entry(entry)
        check_same_unit(plan, s.cfg, ledger, server_round)
        if plan.dataset_size != size:
            raise FedtuneError(
                f"ledger {ledger.path} was planned for {plan.dataset_size} {plan.privacy_unit}s but the client now has "
                f"{size}; keep the data fixed during a run"
            )
        return plan
    plan = make_plan(s.cfg, size)
    ledger.record_plan(plan, client=s.name, unit=unit_of(s.cfg), covers=COVERS, not_covered=NOT_COVERED,
                       train={"batch_size": s.cfg.train.batch_size, "learning_rate": s.cfg.train.learning_rate,
                              "choice": s.train_choice})
    return plan


def refuse(req: Request, reason: str, spent: float, **extra) -> LocalUpdate:
    """A refused round: recorded in the ledger, then a reply that carries the reason and no update."""
    s = req.s
    req.ledger.record_refusal(req.server_round, reason, epsilon_spent=spent, **extra)
    said = revealed.train_metrics({"refused": 1, "epsilon": spent, "num-examples": 0}, dp=s.cfg.privacy.dp,
                                  secure=req.secure, reveal_losses=False)
    return LocalUpdate(None, 0.0, said, {"name": s.name, "reason": reason},
                       reproducible_seed(s, req.server_round, "encoding"))


def spend_and_train(msg: Message, req: Request) -> LocalUpdate | Message:
    """Policy, resend, plan, budget, train, then the spend and the release; or a refusal."""
    s = req.s
    if s.node is not None:  # deployed: the operator's policy first, before anything is planned or spent
        reason = s.node.policy.violation(s.cfg, req.secure, len(s.train))
        if reason:
            try:
                spends = req.ledger.spends()
                return refuse(req, f"policy: {reason}", spends[-1]["epsilon"] if spends else 0.0)
            except FedtuneError as exc:
                return error_reply(msg, s.name, exc)
    req.clip = float(msg.content["config"].get("client-clip-norm", 0.0))
    try:
        req.asked = release.fingerprint(req.server_round, msg.content["arrays"], req.clip, req.secure)
        again = resend(s, req.ledger, req.server_round, req.asked, req.secure)
        if again is not None:
            return again
        if any(e["type"] == "spend" and e.get("request") == req.asked for e in req.ledger.entries()):
            raise FedtuneError(f"round {req.server_round} with this adapter was paid for, but the client stopped "
                               "before keeping its update; it will not pay for it again (the round goes on without it)")
        plan = plan_of(req.ledger, s, req.server_round)
        history = req.ledger.history()
    except FedtuneError as exc:  # damaged ledger: never train without knowing what was spent
        return error_reply(msg, s.name, exc)
    except KeyError as exc:
        return error_reply(msg, s.name, ValueError(f"rejected the global adapter: {exc}"))
    if req.secure and len(s.train) > s.cfg.secagg.max_weight:
        return error_reply(msg, s.name, FedtuneError(
            f"{len(s.train)} training records exceed secagg.max_weight={s.cfg.secagg.max_weight:g}; raise it"))
    refused = over_budget(req, plan, history)
    if refused is not None:
        return refused
    from fedtune.model import set_adapter_state  # lazy: torch, peft (only once the round is paid for)

    try:
        global_state = msg.content["arrays"].to_torch_state_dict()
        set_adapter_state(s.m.model, full_adapter(s, global_state))
    except (KeyError, ValueError) as exc:
        return error_reply(msg, s.name, ValueError(f"rejected the global adapter: {exc}"))
    try:
        stats, physical = train(req, plan)
    except TrainingFailed as exc:
        return error_reply(msg, s.name, exc)
    return spend_and_release(req, plan, history, global_state, stats, physical)


def over_budget(req: Request, plan: Plan, history: list) -> LocalUpdate | None:
    """A refusal if this round does not fit the run's budget or the data set's lifetime budget."""
    decision = check_round(history, plan)
    if not decision.train:
        return refuse(req, decision.reason, decision.epsilon_before,
                      epsilon_if_trained=decision.epsilon_after, budget=plan.budget)
    if req.lifetime is not None and plan.dp:
        before, after, reason = req.lifetime.check(plan.round_history, plan.privacy_unit)
        if reason:
            req.lifetime.refuse(req.s.cfg.run.name, req.server_round, reason)
            return refuse(req, reason, decision.epsilon_before, lifetime_epsilon=before,
                          lifetime_epsilon_if_trained=after, budget=req.lifetime.budget)
    return None


def train(req: Request, plan: Plan):
    """One round of (DP-)SGD on the adapter loaded in the model: (stats, physical batch size)."""
    from fedtune.train import DPParams, train_round  # lazy: torch, opacus (the key stages need neither)

    s, server_round = req.s, req.server_round
    status_file = client_dir(s.run_dir, s.name) / "status.json"

    def on_step(step: int, steps: int) -> None:
        write_json(status_file, {"round": server_round, "phase": "train", "step": step, "steps": steps})

    set_trainable(s.m.model, s.cfg.federation.aggregation)
    sampling, noise = generators(s, server_round)
    dp = None
    if plan.dp:
        dp = DPParams(plan.noise_multiplier, plan.clip_norm, plan.sample_rate, s.cfg.train.batch_size,
                      plan.records_per_user)
    physical = physical_batch(s.m.model, s.cfg, s.m.device)  # bounded memory for any batch size
    try:  # a failure (out of memory included) is named in the server's log and summary; nothing spent
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen inputs: expected
            stats = train_round(
                s.m.model, s.train, steps=plan.steps_per_round, batch_size=s.cfg.train.batch_size,
                learning_rate=s.cfg.train.learning_rate, weight_decay=s.cfg.train.weight_decay, dp=dp,
                device=s.m.device, amp_dtype=s.m.amp_dtype, pad_id=s.pad_id,
                sampling_generator=sampling, noise_generator=noise,
                physical_batch_size=physical, on_step=on_step,
            )
    except Exception as exc:  # noqa: BLE001
        raise TrainingFailed(failure_reason("training", exc)) from None
    return stats, physical


def spend_and_release(req: Request, plan: Plan, history: list, global_state: dict, stats, physical: int) -> LocalUpdate:
    """Keep what stays, clip, write the spend (durable first), then the update that leaves."""
    import torch  # lazy: loaded by training already

    from fedtune.model import get_adapter_state  # lazy: peft

    s, method = req.s, req.s.cfg.federation.aggregation
    state = get_adapter_state(s.m.model)
    save_kept(s.run_dir, s.name, state, method)  # fedsa: lora_B stays here for the next round
    state = shared(method, state)  # only what the method sends leaves the client
    if req.clip > 0:  # client-level DP: the server adds noise calibrated to this bound on our update
        state = clip_update(state, global_state, req.clip)
    spent = epsilon(history + [plan.round_history], plan.delta, plan.accountant) if plan.dp else math.inf
    if req.lifetime is not None:  # first: a crash between the two appends over-reports, never under-reports
        req.lifetime.spend(s.cfg.run.name, req.server_round, plan, spent)
    # Durable before the update leaves: a crash after this line never under-reports.
    entry = req.ledger.record_spend(req.server_round, plan, spent, dp=plan.dp, request=req.asked)
    metrics = {
        "num-examples": len(s.train), "train-loss": stats.loss, "epsilon": spent,
        "steps": stats.steps, "empty-steps": stats.empty_steps, "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate, "train-seconds": stats.seconds, "threads": torch.get_num_threads(),
        "physical-batch": physical,
        "refused": 0,
    }
    metrics = revealed.train_metrics(metrics, dp=plan.dp, secure=req.secure, reveal_losses=s.cfg.privacy.reveal_losses)
    arrays = {k: v.numpy() for k, v in state.items()}
    client = {"name": s.name, "ledger-head": entry["hash"]}
    store_release(s, req.server_round, req.asked, arrays, metrics, client)
    return LocalUpdate(arrays if req.secure else state, float(len(s.train)), metrics, client,
                       reproducible_seed(s, req.server_round, "encoding"))
