"""Personalization after federation (`fedtune personalize RUN_DIR`) and the per-client
evaluation report (personalization.json, .md, .png in the run folder).

Each client starts from the global adapter (under fedsa: the global A with its own B)
and adapts it to its own training records:

- ``finetune``: ``personalize.steps`` more optimizer steps on its data;
- ``fedsa``: no further training, the client's own B (kept during federation) *is* the
  personalization;
- ``ditto``: like finetune, plus a proximal step toward the global adapter after every
  optimizer step, w <- w - lr·λ·(w - w_global), i.e. the gradient of λ/2·||w - w_global||².
  That step does not look at data, so under DP-SGD it is post-processing.

With ``personalize.dp`` the steps are DP-SGD with the run's noise σ and sample rate q and
are charged to the client's ledger (refused, keeping the global adapter, if the budget
cannot pay); without it the personalized adapter is a model that must never be released.

For comparison every client is also evaluated with the base model, a local-only adapter
(the same recipe from the seeded init, never federated, never saved or charged: only its
held-out perplexity is reported) and the global adapter. Where the data has labels (the
built-in drug reviews' rating class) each model is also scored by label likelihood: a
held-out review counts as right when the true rating in its prompt makes the review more
likely than every other rating does (fedtune.data.label_choices); the client's majority
training label is the baseline to beat.
"""

from __future__ import annotations

import io
import math
import statistics
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedtune import config as config_mod
from fedtune.aggregation import set_trainable
from fedtune.client.setup import generators, simulated_setup
from fedtune.client.state import load_kept
from fedtune.data import client_data, label_choices
from fedtune.errors import FedtuneError
from fedtune.memory import physical_batch
from fedtune.model import get_adapter_state, save_adapter, set_adapter_state
from fedtune.privacy import Ledger, Plan, check_round
from fedtune.report import write_summary
from fedtune.runfolder import (
    adapter_dir, atomic_write_bytes, atomic_write_text, client_dir, is_run_dir, ledger_path, now, write_json,
)
from fedtune.train import DPParams, evaluate, label_accuracy, train_round

MODELS = ("base", "local", "global", "personalized")
LABELS = {"base": "base model", "local": "local-only", "global": "global", "personalized": "personalized"}
JSON, MD, PNG = "personalization.json", "personalization.md", "personalization.png"


def personalized_dir(run_dir: Path, client: str) -> Path:
    return client_dir(run_dir, client) / "personalized"


def load_run_config(run_dir: str | Path, overrides: dict | None = None) -> config_mod.Config:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir) or not (run_dir / "config.toml").is_file():
        raise FedtuneError(f"{run_dir} is not a fedtune run folder (no run.json and config.toml); "
                           "pass the folder `fedtune simulate` printed")
    cfg = config_mod.load(run_dir / "config.toml", overrides)
    return cfg.replace(run={"dir": str(run_dir.resolve())})


def _setup(cfg: config_mod.Config, index: int):
    """The client's model and data, exactly as its ClientApp builds them."""
    try:
        return simulated_setup(cfg, index, cfg.num_clients)
    except FedtuneError as exc:
        raise FedtuneError(f"client {index}: {exc}") from None


def _perplexity(s) -> float:

    loss, tokens = evaluate(s.m.model, s.heldout, batch_size=s.cfg.train.eval_batch_size, device=s.m.device,
                            amp_dtype=s.m.amp_dtype, pad_id=s.pad_id)
    return math.exp(min(loss / max(tokens, 1), 50.0))


def _labels(s):
    """(choices, truth, majority-label accuracy) for labelled data, else None."""
    train, heldout = client_data(s.cfg, s.index)
    scored = label_choices(s.cfg, heldout, s.m.tokenizer)
    if scored is None or not scored[1]:
        return None
    choices, truth, labels = scored
    majority = labels.index(Counter(train["rating"]).most_common(1)[0][0])
    return choices, truth, sum(t == majority for t in truth) / len(truth)


def _score(s, row: dict, label: str, labelled) -> None:
    """Held-out perplexity (and label accuracy) of the model's current adapter into ``row``."""
    row["perplexity"][label] = _perplexity(s)
    if labelled is not None:
        row["accuracy"][label] = label_accuracy(
            s.m.model, labelled[0], labelled[1], batch_size=s.cfg.train.eval_batch_size, device=s.m.device,
            amp_dtype=s.m.amp_dtype, pad_id=s.m.tokenizer.pad_token_id)


def _train(s, start: dict, steps: int, dp, prox: dict | None) -> dict:
    """``steps`` steps from the adapter ``start``; returns the trained adapter."""

    p = s.cfg.personalize
    set_adapter_state(s.m.model, start)
    set_trainable(s.m.model, s.cfg.federation.aggregation)
    on_step = None
    if prox is not None and p.ditto_lambda > 0:
        pairs = [(w, prox[n.replace(".default", "")].to(w.device))
                 for n, w in s.m.model.named_parameters() if w.requires_grad]

        def ditto_pull(step: int, total: int) -> None:
            with torch.no_grad():
                for w, g in pairs:
                    w.sub_(p.lr * p.ditto_lambda * (w - g))

        on_step = ditto_pull

    sampling, noise = generators(s, s.cfg.federation.rounds + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        train_round(s.m.model, s.train, steps=steps, batch_size=s.cfg.train.batch_size, learning_rate=p.lr,
                    weight_decay=s.cfg.train.weight_decay, dp=dp, device=s.m.device, amp_dtype=s.m.amp_dtype,
                    pad_id=s.pad_id, sampling_generator=sampling, noise_generator=noise,
                    physical_batch_size=physical_batch(s.m.model, s.cfg, s.m.device), on_step=on_step)
    return get_adapter_state(s.m.model)


def _dp_plan(s):
    """(ledger, plan, DP parameters) for charged personalization; FedtuneError without a ledger."""

    ledger = Ledger(ledger_path(s.run_dir, s.name))
    entry = ledger.plan() if ledger.path.exists() else None
    if entry is None:
        raise FedtuneError(f"{s.name} has no privacy ledger at {ledger.path}; DP personalization must charge it "
                           "(set personalize.dp = false for a model that is never released)")
    plan = Plan.from_entry(entry)
    return ledger, plan, DPParams(plan.noise_multiplier, plan.clip_norm, plan.sample_rate, s.cfg.train.batch_size,
                                  plan.records_per_user)  # the run's unit: a person too, under the user unit


def personalize_client(cfg: config_mod.Config, index: int, global_state: dict) -> dict:
    """Evaluate base, local-only, global and personalized adapters of one client."""

    s = _setup(cfg, index)
    p, steps = cfg.personalize, cfg.personalize.steps
    ledger = plan = dp = None
    if p.dp:
        ledger, plan, dp = _dp_plan(s)
    ours = {**global_state, **load_kept(s.run_dir, s.name, s.m.initial, cfg.federation.aggregation)}
    row = {"client": s.name, "train_records": len(s.train), "heldout_records": len(s.heldout), "perplexity": {}}
    labelled = _labels(s)
    if labelled is not None:
        row.update(accuracy={}, labelled_records=len(labelled[1]), majority_accuracy=labelled[2])
    for label, state in (("base", s.m.initial), ("global", ours)):
        set_adapter_state(s.m.model, state)
        _score(s, row, label, labelled)
    _train(s, s.m.initial, steps, dp, None)  # local-only comparison: never saved, never sent
    _score(s, row, "local", labelled)

    personal, row["status"] = ours, "ok"
    if p.method != "fedsa":
        if ledger is not None:  # the same budget rule as a round (fedtune.privacy.budget)
            decision = check_round(ledger.history(), plan, (plan.noise_multiplier, plan.sample_rate, steps),
                                   what="personalization", fix="; raise privacy.budget")
            row["epsilon_before"], after = decision.epsilon_before, decision.epsilon_after
            if not decision.train:
                ledger.record_refusal("personalize", decision.reason, epsilon_spent=row["epsilon_before"],
                                      epsilon_if_trained=after, budget=plan.budget)
                row.update(status="refused", reason=decision.reason, epsilon_after=row["epsilon_before"])
        if row["status"] == "ok":
            personal = _train(s, ours, steps, dp, ours if p.method == "ditto" else None)
            if ledger is not None:  # durable before the personalized adapter is written
                ledger.record_spend("personalize", plan, after, steps=steps, dp=True)
                row["epsilon_after"] = after
    set_adapter_state(s.m.model, personal)
    _score(s, row, "personalized", labelled)
    folder = personalized_dir(s.run_dir, s.name)
    save_adapter(folder, personal, cfg, s.m.path)
    row["adapter"] = str(folder.relative_to(s.run_dir))
    return row


def personalize(run_dir: str | Path, overrides: dict | None = None, progress=None) -> dict:
    """Personalize every client of a finished federated run; writes the per-client report."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if cfg.personalize.method == "none":
        raise FedtuneError("personalize.method is none; pass --method finetune, fedsa or ditto (or set it in the config)")
    weights = adapter_dir(run_dir, "global") / "adapter_model.safetensors"
    if not weights.is_file():
        raise FedtuneError(f"{run_dir} has no global adapter ({weights}); personalize a run that completed")
    global_state = load_file(str(weights))
    rows = []
    for index in range(cfg.num_clients):
        if progress is not None:
            progress(index, cfg.num_clients)
        rows.append(personalize_client(cfg, index, global_state))
    p = cfg.personalize
    result = {"method": p.method, "steps": p.steps, "lr": p.lr, "dp": p.dp, "ditto_lambda": p.ditto_lambda,
              "aggregation": cfg.federation.aggregation, "time": now(), "clients": rows,
              "average": {m: statistics.fmean(r["perplexity"][m] for r in rows) for m in MODELS},
              "worst": {m: max(r["perplexity"][m] for r in rows) for m in MODELS}}
    if all("accuracy" in r for r in rows):  # labelled data
        acc = {m: [r["accuracy"][m] for r in rows] for m in MODELS}
        result["accuracy"] = {"average": {m: statistics.fmean(v) for m, v in acc.items()},
                              "worst": {m: min(v) for m, v in acc.items()},
                              "majority": statistics.fmean(r["majority_accuracy"] for r in rows)}
    write_json(run_dir / JSON, result)
    _plot(result, run_dir / PNG)
    atomic_write_text(run_dir / MD, render(result))
    write_summary(run_dir)
    return result


def render(r: dict) -> str:
    dp = ("DP-SGD at the run's σ and q, charged to each client's ledger" if r["dp"] and r["method"] != "fedsa" else
          "no extra training (the client's own lora_B)" if r["method"] == "fedsa" else
          "**without DP**: the personalized adapters must never leave their clients")
    lines = ["# Personalization", "",
             f"- method: **{r['method']}** (aggregation {r['aggregation']}), {r['steps']} step(s) at lr {r['lr']:g}"
             + (f", Ditto λ = {r['ditto_lambda']:g}" if r["method"] == "ditto" else "") + f"; {dp}.",
             "- held-out perplexity per client (lower is better) of: the base model; a local-only adapter (the same "
             "steps from the seeded init on the client's data alone, for comparison only); the global adapter (under "
             "fedsa with the client's own lora_B); the personalized adapter (in `clients/<client>/personalized/`).",
             "- rating accuracy (where the data has labels): share of held-out records whose true label makes the "
             "completion most likely (label likelihood); `majority` always answers the client's most common training "
             "label." if "accuracy" in r else "- accuracy is not measured (the data has no labels): perplexity only.", "",
             f"![per-client perplexity]({PNG})", "",
             "| client | train records | held-out records | base | local-only | global | personalized | ε after | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r["clients"]:
        ppl = c["perplexity"]
        eps = c.get("epsilon_after")
        lines.append(f"| {c['client']} | {c['train_records']} | {c['heldout_records']} | "
                     + " | ".join(f"{ppl[m]:.2f}" for m in MODELS)
                     + f" | {'–' if eps is None else f'{eps:.2f}'} | {c['status']} |")
    for label in ("average", "worst"):
        lines.append(f"| **{label}** | | | " + " | ".join(f"{r[label][m]:.2f}" for m in MODELS) + " | | |")
    if "accuracy" in r:
        lines += ["", "Rating accuracy by label likelihood (higher is better):", "",
                  "| client | scored records | majority label | base | local-only | global | personalized |",
                  "|---|---|---|---|---|---|---|"]
        for c in r["clients"]:
            lines.append(f"| {c['client']} | {c['labelled_records']} | {c['majority_accuracy']:.1%} | "
                         + " | ".join(f"{c['accuracy'][m]:.1%}" for m in MODELS) + " |")
        a = r["accuracy"]
        lines.append(f"| **average** | | {a['majority']:.1%} | " + " | ".join(f"{a['average'][m]:.1%}" for m in MODELS) + " |")
        lines.append("| **worst** | | | " + " | ".join(f"{a['worst'][m]:.1%}" for m in MODELS) + " |")
    refused = [c for c in r["clients"] if c["status"] == "refused"]
    if refused:
        lines += ["", f"Refused (kept the global adapter): {', '.join(c['client'] for c in refused)}: {refused[0]['reason']}."]
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["client"] for c in r["clients"]] + ["average", "worst"]
    values = {m: [c["perplexity"][m] for c in r["clients"]] + [r["average"][m], r["worst"][m]] for m in MODELS}
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=110)
    width = 0.8 / len(MODELS)
    for i, m in enumerate(MODELS):
        ax.bar([x + i * width for x in range(len(names))], values[m], width, label=LABELS[m])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"personalization: {r['method']} (aggregation {r['aggregation']})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
