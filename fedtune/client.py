"""What a data holder's ClientApp does with each message from the server.

train: load the global adapter, check the privacy budget against the local ledger,
train one round (DP-SGD), write the spend to the ledger (fsync'ed), then reply with the
new adapter, or, under secure aggregation, take part in the SecAgg+ stage the message
names (the update then leaves only masked). A request the client already paid for (a
restarted server asking again) gets the same update again at no cost (fedtune.release).
evaluate: held-out loss of the adapter it is sent.

The base model and the client's tokenized data are cached per process, so a simulation
worker (a Ray actor serving many clients) loads the model once, not once per round.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import math
import os
import secrets
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedtune import config as config_mod
from fedtune import release
from fedtune.aggregation import kept, set_trainable, shared
from fedtune.deploy.lifetime import Lifetime, open_lifetime
from fedtune.deploy.node import LocalNode, from_node_config as deployed_node, local_config, local_examples
from fedtune.errors import FedtuneError
from fedtune.floor import failure_reason
from fedtune.memory import physical_batch
from fedtune.privacy import Ledger, Plan, check_round, epsilon, make_plan
from fedtune.privacy.client_level import clip_update
from fedtune.privacy.user_level import check_same_unit, dataset_units, unit_of
from fedtune.runfolder import (
    atomic_write_bytes, client_dir, file_lock, kept_adapter_path, ledger_path, now, read_json, release_path, run_dir_for,
    write_json,
)
from fedtune import revealed
from fedtune.secagg.flower import STAGE, LocalUpdate, handle_stage

# torch, transformers, peft, opacus and datasets are imported where a message needs them:
# a deployed client runs each message in a fresh process, and the SecAgg+ key stages
# (advertise, share, unmask) need none of them.
if TYPE_CHECKING:
    import torch

    from fedtune.data import TokenizedData

ERROR_CODE = 1000  # Flower error code for fedtune client-side failures (reason says why)
COVERS = "the LoRA adapter weights this client sends to the server"
NOT_COVERED = revealed.NOT_COVERED


@dataclass
class _Model:
    model: object  # PeftModel, trainable LoRA only
    device: torch.device
    amp_dtype: torch.dtype | None
    path: str
    initial: dict[str, torch.Tensor]  # the adapter at its seeded init (A from run.seed, B zero)
    _tokenizer: object = None

    @property
    def tokenizer(self):
        """Loaded on first use: a deployed client with its examples cached needs none."""
        if self._tokenizer is None:
            from fedtune.model import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer


@dataclass
class ClientSetup:
    cfg: config_mod.Config
    index: int
    name: str
    m: _Model
    train: TokenizedData
    heldout: TokenizedData
    run_dir: Path
    pad_id: int  # the tokenizer's padding id (masked out, but batches stay identical everywhere)
    node: LocalNode | None = None  # a deployed client's own settings (its policy); None in simulation


_MODELS: dict[tuple, _Model] = {}
_DATA: dict[tuple, tuple[TokenizedData, TokenizedData, int]] = {}

# A process that imported torch and transformers spends most of its exit (~1 s) letting the
# garbage collector walk their ~400k objects; frozen at exit, they are left to the OS.
atexit.register(gc.freeze)


def config_from_context(context: Context) -> config_mod.Config:
    return config_mod.from_flat(dict(context.run_config))


def _model(cfg: config_mod.Config) -> _Model:
    key = (cfg.model, cfg.lora, cfg.run.seed)
    if key not in _MODELS:
        import torch

        from fedtune.model import (
            add_lora, get_adapter_state, load_base_model, resolve_device, resolve_model, resolve_precision,
        )

        _MODELS.clear()  # one base model per process
        # train.threads, else the cores Ray gave this simulated client (it sets OMP_NUM_THREADS),
        # else torch's default (all cores of a deployed client's machine).
        threads = cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = resolve_device(cfg.model.device)
        path = resolve_model(cfg.model.name, cfg.model.cache_dir)
        model = add_lora(load_base_model(path, device), cfg, seed=cfg.run.seed)
        _MODELS[key] = _Model(model, device, resolve_precision(cfg.model.precision, device), path,
                              get_adapter_state(model))
    return _MODELS[key]


def setup(context: Context) -> ClientSetup:
    cfg = config_from_context(context)
    node = deployed_node(context.node_config)  # a deployed client's own settings; None in simulation
    if node is not None:
        return _deployed_setup(local_config(cfg, node), node)
    index = int(context.node_config.get("partition-id", 0))
    partitions = context.node_config.get("num-partitions")
    from fedtune.data import client_examples, client_name

    if partitions is not None and int(partitions) != cfg.num_clients:
        raise FedtuneError(
            f"the federation has {partitions} simulated clients but the config wants {cfg.num_clients}; "
            f"pass --federation-config 'num-supernodes={cfg.num_clients}' or set federation.clients"
        )
    m = _model(cfg)
    run_dir = run_dir_for(cfg, context.run_id)
    key = (cfg.data, cfg.audit, cfg.federation.clients, cfg.federation.mode, cfg.run.seed, cfg.model.max_length,
           m.path, index, run_dir)
    if key not in _DATA:
        _DATA[key] = (*client_examples(cfg, index, m.tokenizer, extra_train=_planted(cfg, run_dir, index)),
                      m.tokenizer.pad_token_id)
    train, heldout, pad_id = _DATA[key]
    return ClientSetup(cfg, index, client_name(cfg, index), m, train, heldout, run_dir, pad_id)


def _deployed_setup(cfg: config_mod.Config, node) -> ClientSetup:
    """Deployment: the operator's data file, budget and state folder (fedtune.deploy.node)."""
    m = _model(cfg)
    key = ("deployed", node.data_file, cfg.data, cfg.run.seed, cfg.model.max_length, m.path)
    if key not in _DATA:
        _DATA.clear()  # one client's data set per worker: memory stays bounded however many runs ask
        _DATA[key] = local_examples(cfg, node, m.path, lambda: m.tokenizer)
    train, heldout, pad_id = _DATA[key]
    return ClientSetup(cfg, 0, node.name, m, train, heldout, node.run_dir(cfg), pad_id, node)


def _planted(cfg: config_mod.Config, run_dir: Path, index: int) -> list[dict]:
    """This client's share of the audit's planted records (simulation only)."""
    if not (cfg.audit.canaries or cfg.audit.secrets):
        return []
    from fedtune.privacy.empirical import PLANT_FILE, planted_records

    path = run_dir / PLANT_FILE
    if not path.is_file():
        raise FedtuneError(f"{path} is missing: the server plants audit records before round 0; rerun the simulation")
    return planted_records(read_json(path), index, centralized=cfg.federation.mode == "centralized")


def load_kept(run_dir: Path, name: str, initial: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """The adapter tensors ``method`` keeps on this client: its saved copy, else the seeded init."""
    from safetensors.torch import load_file

    path = kept_adapter_path(run_dir, name)
    own = kept(method, initial)
    if own and path.is_file():
        saved = load_file(str(path))
        if set(saved) == set(own):
            return saved
    return own


def save_kept(run_dir: Path, name: str, state: dict[str, torch.Tensor], method: str) -> None:
    """Store the part of ``state`` that never leaves the client (fedsa: its lora_B), atomically."""
    from safetensors.torch import save

    own = kept(method, state)
    if own:
        atomic_write_bytes(kept_adapter_path(run_dir, name), save({k: v.contiguous() for k, v in own.items()}))


def full_adapter(s: ClientSetup, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the server sent plus what the aggregation method keeps on this client."""
    return {**load_kept(s.run_dir, s.name, s.m.initial, s.cfg.federation.aggregation), **received}


def _error_reply(msg: Message, who: str, exc: Exception) -> Message:
    return Message(Error(code=ERROR_CODE, reason=f"{who}: {exc}"), reply_to=msg)


def _plan(ledger: Ledger, s: ClientSetup, server_round: int = 0) -> Plan:
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
    ledger.append({**plan.to_entry(), "client": s.name, "unit": unit_of(s.cfg), "covers": COVERS,
                   "not_covered": NOT_COVERED, "time": now()})
    return plan


def reproducible_seed(s: ClientSetup, server_round: int, purpose: str) -> bytes | None:
    """32 bytes for ``purpose`` (tests only: privacy.seed ≥ 0), else None (use the OS's entropy).

    Derived from the client's name, not its partition index or node id, so a deployed client
    and the simulated client of the same name draw the same batches, noise and rounding."""
    if s.cfg.privacy.seed < 0:
        return None
    return hashlib.sha256(f"fedtune-test-seed|{s.cfg.privacy.seed}|{s.name}|{server_round}|{purpose}".encode()).digest()


def _generators(s: ClientSetup, server_round: int) -> tuple[torch.Generator, torch.Generator]:
    """Sampling (CPU) and noise (model device) generators.

    Seeded from the OS's entropy each round; privacy.seed (tests only) makes them
    reproducible, and the ledger's plan records that the guarantee then does not hold.
    """
    import torch

    fixed = [reproducible_seed(s, server_round, purpose) for purpose in ("sampling", "noise")]
    if fixed[0] is not None:
        seeds = tuple(int.from_bytes(f[:8], "big") >> 1 for f in fixed)
    else:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    sampling = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=s.m.device).manual_seed(seeds[1])
    return sampling, noise


def handle_train(msg: Message, context: Context) -> Message:
    if STAGE in msg.content["config"]:  # secure aggregation: one of its stages
        try:
            return handle_stage(msg, context, lambda m: _local_round(m, context, secure=True),
                                check=lambda encoding: _check_encoding(context, encoding),
                                min_inputs=lambda: _min_inputs(context), who=lambda: _name(context))
        except FedtuneError as exc:  # names the peer or the problem; the server drops us this round
            return _error_reply(msg, f"node {context.node_id} (secure aggregation)", exc)
    update = _local_round(msg, context, secure=False)
    if isinstance(update, Message):
        return update
    if update.state is None:  # refused: no update leaves
        return Message(RecordDict({"metrics": MetricRecord(update.metrics), "client": ConfigRecord(update.client)}),
                       reply_to=msg)
    arrays = ArrayRecord(update.state)
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({**update.metrics, "upload-bytes": arrays.count_bytes()}),
        # The ledger's head, recorded by the server: a later rewrite of the ledger shows.
        "client": ConfigRecord(update.client),
    }), reply_to=msg)


_DDG: dict[tuple, object] = {}


def _own_config(context: Context) -> config_mod.Config:
    """This client's config: in deployment its own client.toml over the server's run config."""
    node = deployed_node(context.node_config)
    return config_from_context(context) if node is None else local_config(config_from_context(context), node)


def _name(context: Context) -> str:
    """This client's name, without importing torch (secure aggregation is federated: fedtune.data.client_name)."""
    node = deployed_node(context.node_config)
    return node.name if node is not None else f"client-{int(context.node_config.get('partition-id', 0))}"


def _min_inputs(context: Context) -> int:
    """This client's floor on real inputs per secure sum: client.toml's in deployment (the
    server cannot lower it); the run config's in simulation, which trusts its own setup."""
    node = deployed_node(context.node_config)
    return node.min_inputs if node is not None else config_from_context(context).secagg.min_inputs


def _check_encoding(context: Context, encoding) -> None:
    """Distributed DP: this client adds the noise its own config calls for; a server asking
    for other parameters (less noise, another clip) gets a refusal.

    Checked at advertise without the model: the plan is derived for the dimension the server
    names, and collect refuses (before training or spending) an adapter of another size."""
    from fedtune.privacy.distributed import plan_for

    node = deployed_node(context.node_config)
    cfg = _own_config(context)
    who = node.name if node is not None else f"partition {context.node_config.get('partition-id', 0)}"
    reason = node.policy.violation(cfg, True, 0) if node is not None else ""
    if reason:  # refused at the first message of a secure round, before any key is made
        raise FedtuneError(f"{who} refused the round: policy: {reason}")
    if not cfg.client_dp.enabled:
        return
    if encoding.ddg is None:
        raise FedtuneError(f"{who}: the server asks for secure aggregation without distributed-DP noise, but this "
                           "client's config has client_dp on; refusing to send an un-noised update")
    key = (cfg.client_dp, cfg.secagg, cfg.federation, encoding.ddg.dim)
    if key not in _DDG:
        if len(_DDG) >= 8:  # a long-lived worker serves run after run: keep a few plans, not all
            _DDG.clear()
        _DDG[key] = plan_for(cfg, encoding.ddg.dim)
    mine = _DDG[key].to_dict()
    asked = encoding.ddg.to_dict()
    diff = [f"{k}={asked[k]!r} (mine {mine[k]!r})" for k in mine if asked[k] != mine[k]]
    if diff:
        raise FedtuneError(f"{who}: the server's distributed-DP parameters differ from this client's config: "
                           f"{', '.join(diff)}; refusing the round")


def _check_ddg_dim(msg: Message, context: Context, s: ClientSetup) -> None:
    """Collect under distributed DP: the dimension checked at advertise must be the adapter's
    (the global adapter sent is checked against the model before training)."""
    from fedtune.secagg.flower import ENCODING, Encoding

    if not s.cfg.client_dp.enabled:
        return
    ddg = Encoding.from_json(context.state.config_records[ENCODING]["json"]).ddg  # KeyError: no advertise
    size = sum(int(a.numpy().size) for a in msg.content["arrays"].values())
    if ddg is None or ddg.dim != size:
        raise FedtuneError(f"{s.name}: the server's distributed-DP plan is for {ddg.dim if ddg else 0} values but the "
                           f"adapter it sent has {size}; refusing the round")


# Under secure aggregation only these metrics travel in the clear (fedtune.revealed).
REVEALED_UNDER_SECAGG = revealed.REVEALED_UNDER_SECAGG


def _local_round(msg: Message, context: Context, secure: bool) -> LocalUpdate | Message:
    """Budget check, one round of (DP-)training and the ledger spend, or a refusal."""
    try:
        s = setup(context)
    except FedtuneError as exc:
        return _error_reply(msg, "client setup", exc)
    if secure:
        try:
            _check_ddg_dim(msg, context, s)
        except (FedtuneError, KeyError) as exc:
            return _error_reply(msg, s.name, exc)
    server_round = int(msg.content["config"]["server-round"])
    lifetime = None
    if s.node is not None:  # deployed: the data set's lifetime budget, across every run
        try:
            lifetime = open_lifetime(s.node.state_dir, s.node.dataset, s.node.data_file, s.node.budget, s.node.policy)
        except FedtuneError as exc:
            return _error_reply(msg, s.name, exc)
    # One request at a time per client: a restarted server's request may arrive while the
    # crashed server's is still training; the second one then finds the first's release.
    with file_lock(client_dir(s.run_dir, s.name) / ".round.lock"), (lifetime.lock() if lifetime else nullcontext()):
        return _spend_and_train(msg, s, server_round, secure, lifetime)


def _resend(s: ClientSetup, ledger: Ledger, server_round: int, asked: str,
            secure: bool) -> LocalUpdate | None:
    """The stored release again, if the server asks for exactly what it paid for (fedtune.release)."""
    last = release.load(release_path(s.run_dir, s.name))
    if last is None or (last.server_round, last.fingerprint) != (server_round, asked):
        return None
    head = last.client.get("ledger-head")
    if not any(e["type"] == "spend" and e["round"] == server_round and e["hash"] == head for e in ledger.entries()):
        return None  # not the spend this ledger recorded: train and pay again
    seed = reproducible_seed(s, server_round, "encoding")
    if secure and s.cfg.client_dp.enabled and seed is None:
        # Re-encoding draws fresh distributed-DP noise: two sums of the same update would average it down.
        raise FedtuneError(f"{s.name} already sent round {server_round} in a secure sum with its distributed-DP "
                           "noise; it will not send it again in a second sum (the round goes on without it)")
    ledger.append({"type": "resend", "round": server_round, "spend": head, "time": now()})
    state = last.state
    if not secure:
        import torch

        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return LocalUpdate(state, last.weight, {**last.metrics, "resent": 1}, last.client, seed)


def _refuse(s: ClientSetup, ledger: Ledger, server_round: int, secure: bool, reason: str, spent: float,
            **extra) -> LocalUpdate:
    """A refused round: recorded in the ledger, then a reply that carries the reason and no update."""
    ledger.append({"type": "refusal", "round": server_round, "epsilon_spent": spent, **extra, "reason": reason,
                   "time": now()})
    said = revealed.train_metrics({"refused": 1, "epsilon": spent, "num-examples": 0}, dp=s.cfg.privacy.dp,
                                  secure=secure, reveal_losses=False)
    return LocalUpdate(None, 0.0, said, {"name": s.name, "reason": reason}, reproducible_seed(s, server_round, "encoding"))


def _spend_and_train(msg: Message, s: ClientSetup, server_round: int, secure: bool,
                     lifetime: Lifetime | None = None) -> LocalUpdate | Message:
    ledger = Ledger(ledger_path(s.run_dir, s.name))
    if s.node is not None:  # deployed: the operator's policy first, before anything is planned or spent
        reason = s.node.policy.violation(s.cfg, secure, len(s.train))
        if reason:
            try:
                spends = ledger.spends()
                return _refuse(s, ledger, server_round, secure, f"policy: {reason}", spends[-1]["epsilon"] if spends else 0.0)
            except FedtuneError as exc:
                return _error_reply(msg, s.name, exc)
    clip = float(msg.content["config"].get("client-clip-norm", 0.0))
    try:
        asked = release.fingerprint(server_round, msg.content["arrays"], clip, secure)
        again = _resend(s, ledger, server_round, asked, secure)
        if again is not None:
            return again
        if any(e["type"] == "spend" and e.get("request") == asked for e in ledger.entries()):
            raise FedtuneError(f"round {server_round} with this adapter was paid for, but the client stopped before "
                               "keeping its update; it will not pay for it again (the round goes on without it)")
        plan = _plan(ledger, s, server_round)
        history = ledger.history()
    except FedtuneError as exc:  # damaged ledger: never train without knowing what was spent
        return _error_reply(msg, s.name, exc)
    except KeyError as exc:
        return _error_reply(msg, s.name, ValueError(f"rejected the global adapter: {exc}"))
    if secure and len(s.train) > s.cfg.secagg.max_weight:
        return _error_reply(msg, s.name, FedtuneError(
            f"{len(s.train)} training records exceed secagg.max_weight={s.cfg.secagg.max_weight:g}; raise it"))

    decision = check_round(history, plan)
    if not decision.train:
        return _refuse(s, ledger, server_round, secure, decision.reason, decision.epsilon_before,
                       epsilon_if_trained=decision.epsilon_after, budget=plan.budget)
    if lifetime is not None and plan.dp:
        before, after, reason = lifetime.check(plan.round_history)
        if reason:
            lifetime.refuse(s.cfg.run.name, server_round, reason)
            return _refuse(s, ledger, server_round, secure, reason, decision.epsilon_before, lifetime_epsilon=before,
                           lifetime_epsilon_if_trained=after, budget=lifetime.budget)

    import torch

    from fedtune.model import get_adapter_state, set_adapter_state
    from fedtune.train import DPParams, train_round

    try:
        global_state = msg.content["arrays"].to_torch_state_dict()
        set_adapter_state(s.m.model, full_adapter(s, global_state))
    except (KeyError, ValueError) as exc:
        return _error_reply(msg, s.name, ValueError(f"rejected the global adapter: {exc}"))

    status_file = client_dir(s.run_dir, s.name) / "status.json"

    def on_step(step: int, steps: int) -> None:
        write_json(status_file, {"round": server_round, "phase": "train", "step": step, "steps": steps})

    method = s.cfg.federation.aggregation
    set_trainable(s.m.model, method)
    sampling, noise = _generators(s, server_round)
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
        return _error_reply(msg, s.name, RuntimeError(failure_reason("training", exc)))
    state = get_adapter_state(s.m.model)
    save_kept(s.run_dir, s.name, state, method)  # fedsa: lora_B stays here for the next round
    state = shared(method, state)  # only what the method sends leaves the client
    if clip > 0:  # client-level DP: the server adds noise calibrated to this bound on our update
        state = clip_update(state, global_state, clip)
    spent = epsilon(history + [plan.round_history], plan.delta, plan.accountant) if plan.dp else math.inf
    if lifetime is not None:  # first: a crash between the two appends over-reports, never under-reports
        lifetime.spend(s.cfg.run.name, server_round, plan, spent)
    # Durable before the update leaves: a crash after this line never under-reports.
    entry = ledger.append({"type": "spend", "round": server_round, "steps": plan.steps_per_round,
                           "sample_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
                           "clip_norm": plan.clip_norm, "delta": plan.delta, "accountant": plan.accountant,
                           "epsilon": spent, "dp": plan.dp, "request": asked, "time": now()})
    metrics = {
        "num-examples": len(s.train), "train-loss": stats.loss, "epsilon": spent,
        "steps": stats.steps, "empty-steps": stats.empty_steps, "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate, "train-seconds": stats.seconds, "threads": torch.get_num_threads(),
        "physical-batch": physical,
        "refused": 0,
    }
    metrics = revealed.train_metrics(metrics, dp=plan.dp, secure=secure, reveal_losses=s.cfg.privacy.reveal_losses)
    arrays = {k: v.numpy() for k, v in state.items()}
    client = {"name": s.name, "ledger-head": entry["hash"]}
    # Paid for and about to leave: kept, so that the same request again costs nothing.
    release.store(release_path(s.run_dir, s.name),
                  release.Release(server_round, asked, arrays, float(len(s.train)), metrics, client))
    return LocalUpdate(arrays if secure else state, float(len(s.train)), metrics, client,
                       reproducible_seed(s, server_round, "encoding"))


def handle_evaluate(msg: Message, context: Context) -> Message:
    from fedtune.model import set_adapter_state
    from fedtune.train import evaluate

    try:
        s = setup(context)
        set_adapter_state(s.m.model, full_adapter(s, msg.content["arrays"].to_torch_state_dict()))
    except (FedtuneError, KeyError, ValueError) as exc:
        return _error_reply(msg, "client evaluate", exc)
    if not revealed.evaluation_allowed(s.cfg):  # a per-client loss no DP covers: withheld (privacy.reveal_losses)
        return Message(RecordDict({"metrics": MetricRecord({"eval-withheld": 1}),
                                   "client": ConfigRecord({"name": s.name})}), reply_to=msg)
    t0 = time.perf_counter()
    try:
        loss_sum, tokens = evaluate(
            s.m.model, s.heldout, batch_size=s.cfg.train.eval_batch_size, device=s.m.device,
            amp_dtype=s.m.amp_dtype, pad_id=s.pad_id,
        )
    except Exception as exc:  # noqa: BLE001 - named in the summary; the headline leaves this client out
        return _error_reply(msg, s.name, RuntimeError(failure_reason("evaluation", exc)))
    mean = loss_sum / max(tokens, 1)
    return Message(RecordDict({
        "metrics": MetricRecord({
            "num-examples": len(s.heldout), "eval-loss-sum": loss_sum, "eval-tokens": tokens,
            "eval-loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval-seconds": time.perf_counter() - t0,
        }),
        "client": ConfigRecord({"name": s.name}),
    }), reply_to=msg)
