"""The empirical privacy check: records planted before training, scored after it.

- **One-run audit** (Steinke, Nasr, Jagielski, NeurIPS 2023). m canaries (random words)
  are assigned to clients; each goes into its client's training data with probability
  1/2, decided by a coin the auditor keeps. After training, each canary is scored by how
  much the fine-tuned model lowered its loss against the base model; the auditor guesses
  "planted" for high scores. How many guesses are right bounds ε from below: ε̂ at 95%
  confidence (jax-privacy's ``CanaryScoreAuditor.epsilon_one_run``, Bonferroni-corrected
  over thresholds). A correct DP implementation gives ε̂ ≤ ε; ε̂ > ε means a bug.
- **Secret Sharer exposure** (Carlini et al., USENIX Security 2019). Secrets "The access
  code of <name> is <d digits>." are planted ``secret_repeats`` times. Exposure =
  log2(10^d) − log2(rank of the true digits among all 10^d candidates by model
  likelihood): about 1 bit for a model that learned nothing, log2(10^d) for one that
  can recite the secret.
"""

from __future__ import annotations

import importlib.util
import math
import random
import secrets
import string
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedtune import config
from fedtune.data import TokenizedData, collate
from fedtune.errors import FedtuneError
from fedtune.model import autocast, load_base_model, load_tokenizer, resolve_device, resolve_precision
from fedtune.runfolder import read_json
from fedtune.train import forward_logits, per_sequence_loss

PLANT_FILE = Path("audit") / "planted.json"
SIGNIFICANCE = 0.05  # ε̂ holds with 95% confidence


# ---- planting (before training) --------------------------------------------------------
def _word(rng) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7)))


def plant(cfg) -> dict:
    """The canaries and secrets for this run, with the coin flips (the auditor's key).

    Drawn from OS entropy; under privacy.seed (tests only) from run.seed.
    """
    rng = random.Random(cfg.run.seed) if cfg.privacy.seed >= 0 else secrets.SystemRandom()
    n = cfg.num_clients
    canaries = [
        {"id": i, "client": i % n, "included": rng.random() < 0.5, "records": cfg.audit.canary_records,
         "text": " ".join(_word(rng) for _ in range(cfg.audit.canary_words))}
        for i in range(cfg.audit.canaries)
    ]
    planted_secrets = [
        {"id": j, "client": j % n, "repeats": cfg.audit.secret_repeats,
         "prefix": f"The access code of {_word(rng).capitalize()} {_word(rng).capitalize()} is ",
         "digits": "".join(rng.choice(string.digits) for _ in range(cfg.audit.secret_digits))}
        for j in range(cfg.audit.secrets)
    ]
    return {"canaries": canaries, "secrets": planted_secrets}


def planted_records(planted: dict, client_index: int, centralized: bool) -> list[dict]:
    """Training records this client gets: its included canaries and its secrets' copies."""
    mine = (lambda item: True) if centralized else (lambda item: item["client"] == client_index)
    # Each canary and each secret is one person (``user``): under privacy.unit = "user" its copies are one unit.
    rows = [{"prompt": "", "completion": c["text"], "user": f"canary-{c['id']}"}
            for c in planted["canaries"] if c["included"] and mine(c) for _ in range(c.get("records", 1))]
    for s in planted["secrets"]:
        if mine(s):
            rows += [{"prompt": "", "completion": s["prefix"] + s["digits"] + ".", "user": f"secret-{s['id']}"}] * s["repeats"]
    return rows


# ---- scoring (after training) ----------------------------------------------------------
def _auditor_module():
    """jax-privacy's auditing module, loaded alone: the package's __init__ imports JAX,
    which this module does not need (it uses numpy, scipy and dp-accounting)."""
    spec = importlib.util.find_spec("jax_privacy")
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError("the empirical audit needs jax-privacy's auditing module: run "
                           "`pip install --no-deps jax-privacy==2.0.0` (or `make install`)")
    name = "fedtune._jax_privacy_auditing"
    if name not in sys.modules:
        path = Path(spec.submodule_search_locations[0]) / "auditing.py"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before running it: its dataclasses look themselves up there
        module_spec.loader.exec_module(module)
    return sys.modules[name]


def epsilon_lower_bound(in_scores, out_scores, delta: float) -> dict:
    """ε̂ (95% confidence) and the attack's AUROC from canary scores (higher = planted)."""
    auditor = _auditor_module().CanaryScoreAuditor(np.asarray(in_scores, float), np.asarray(out_scores, float))
    return {"epsilon_lower_bound": float(auditor.epsilon_one_run(significance=SIGNIFICANCE, delta=delta)),
            "auroc": float(auditor.attack_auroc())}


@torch.no_grad()
def sequence_losses(model, tokenizer, texts: list[str], device, amp_dtype, batch_size: int = 16) -> np.ndarray:
    """Mean next-token loss of each text (as trained: no special tokens, eos appended)."""
    eos = tokenizer.eos_token_id
    data = TokenizedData([torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in texts],
                         [0] * len(texts))
    out = []
    for start in range(0, len(texts), batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, len(texts)))), tokenizer.pad_token_id)
        logits = forward_logits(model, batch, device, amp_dtype)
        out.append(per_sequence_loss(logits, batch["labels"].to(device)).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def secret_exposure(model, tokenizer, prefix: str, digits: str, device, amp_dtype, batch_size: int = 250) -> dict:
    """Rank of ``digits`` among all same-length digit strings after ``prefix``, and exposure."""
    digit_ids = [tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(10)]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + digits, add_special_tokens=False)["input_ids"]
    if any(len(d) != 1 for d in digit_ids) or full != prefix_ids + [digit_ids[int(c)][0] for c in digits]:
        raise FedtuneError("secret exposure needs a tokenizer that writes each digit as one token")
    logp = candidate_log_likelihoods(model, prefix_ids, [d[0] for d in digit_ids], len(digits), device, amp_dtype,
                                     batch_size)
    true_index = int(digits)  # candidates are enumerated in numeric order
    rank = 1 + int((logp > logp[true_index]).sum())
    space = 10 ** len(digits)
    return {"rank": rank, "candidates": space, "exposure_bits": math.log2(space) - math.log2(rank),
            "max_exposure_bits": math.log2(space)}


@torch.no_grad()
def candidate_log_likelihoods(model, prefix_ids: list[int], digit_ids: list[int], length: int, device, amp_dtype,
                              batch_size: int) -> torch.Tensor:
    """log p(candidate | prefix) for every digit string of ``length``, in numeric order.

    Only the 10^(length-1) strings of the first ``length - 1`` digits are run, on top of the
    prefix's key/value cache (computed once per chunk, repeated over its rows): the logits at
    each position give the next digit's probability, the last position all 10 final digits.
    That is length-1 tokens per 10 candidates instead of a forward per digit position."""
    digits = torch.tensor(digit_ids)
    heads = torch.arange(10 ** (length - 1))
    places = (torch.stack([(heads // 10 ** (length - 2 - k)) % 10 for k in range(length - 1)], dim=1)
              if length > 1 else torch.zeros((1, 0), dtype=torch.long))  # (M, L-1)
    prefix = torch.tensor([prefix_ids], device=device)
    out = []
    for chunk in places.split(batch_size):
        n = len(chunk)
        with autocast(device, amp_dtype):
            first = model(prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
            steps = [first.logits[:, -1].float().expand(n, -1)]
            if length > 1:
                cache = first.past_key_values
                cache.batch_repeat_interleave(n)
                pos = torch.arange(prefix.shape[1], prefix.shape[1] + length - 1, device=device).expand(n, -1)
                mask = torch.ones((n, prefix.shape[1] + length - 1), dtype=torch.long, device=device)
                later = model(digits[chunk].to(device), attention_mask=mask, position_ids=pos, past_key_values=cache)
                steps += list(later.logits.float().unbind(1))
        logp = torch.stack([F.log_softmax(s_, dim=-1)[:, digits.to(device)] for s_ in steps], dim=1)  # (n, L, 10)
        path = logp[:, :-1].gather(2, chunk.to(device).unsqueeze(2)).squeeze(2).double().sum(1)  # first L-1 digits
        out.append((path[:, None] + logp[:, -1].double()).reshape(-1).cpu())  # x 10 last digits, numeric order
    return torch.cat(out)


# ---- the check, from a run folder --------------------------------------------------------
def _adapters(run_dir: Path, mode: str, clients: int) -> dict[int, Path]:
    """Which trained adapter scores each client's canaries."""
    if mode == "local":
        return {i: run_dir / "adapters" / f"local-client-{i}" for i in range(clients)}
    return {i: run_dir / "adapters" / "global" for i in range(max(clients, 1))}


def _load_adapters(model_path: str, adapters: dict[int, Path], device) -> tuple[Any, dict[Path, str]]:
    """The base model with each distinct adapter loaded under its own name (eval mode), and those names."""
    from peft import PeftModel

    model = None
    loaded: dict[Path, str] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations peft triggers
        for index, adapter in sorted(adapters.items()):
            if adapter in loaded:
                continue
            name = f"a{len(loaded)}"
            if model is None:
                model = PeftModel.from_pretrained(load_base_model(model_path, device), str(adapter), adapter_name=name)
            else:
                model.load_adapter(str(adapter), adapter_name=name)
            loaded[adapter] = name
    model.eval()
    return model, loaded


def _one_run(canaries: list[dict], scores: list[float], delta: float, accountant_epsilon: float) -> dict:
    """The one-run audit from the canaries' scores: ε̂ and whether it exceeds the accountant's ε."""
    inside = [s for s, c in zip(scores, canaries) if c["included"]]
    outside = [s for s, c in zip(scores, canaries) if not c["included"]]
    if not inside or not outside:
        raise FedtuneError("every canary landed on one side of the coin; plant more canaries (audit.canaries)")
    out = {"canaries": len(canaries), "included": len(inside), **epsilon_lower_bound(inside, outside, delta)}
    out["violation"] = out["epsilon_lower_bound"] > accountant_epsilon
    return out


def run_empirical(run_dir: Path, accountant_epsilon: float, delta: float) -> dict:
    """Score the planted canaries and secrets with the run's final adapter(s)."""
    path = run_dir / PLANT_FILE
    if not path.is_file():
        raise FedtuneError(f"{run_dir} has no planted records ({PLANT_FILE}); rerun the simulation with "
                           "--canaries N (and --secrets N) to make an empirical audit possible")
    planted = read_json(path)
    cfg = config.load(run_dir / "config.toml")
    mode = cfg.federation.mode
    adapters = _adapters(run_dir, mode, cfg.num_clients)
    missing = sorted({str(p) for p in adapters.values() if not (p / "adapter_config.json").is_file()})
    if missing:
        raise FedtuneError(f"trained adapter {missing[0]} is missing; the run did not finish")
    model_path = read_json(run_dir / "run.json")["model_path"]
    device = resolve_device("auto")
    amp = resolve_precision(cfg.model.precision, device)
    tokenizer = load_tokenizer(model_path)
    model, loaded = _load_adapters(model_path, adapters, device)

    def scored(items: list[dict], fn):
        """Apply ``fn`` to the items of each adapter, with that adapter active."""
        out = {}
        for adapter, name in loaded.items():
            model.set_adapter(name)
            mine = [it for it in items if adapters[it["client"]] == adapter]
            if mine:
                out.update(zip([it["id"] for it in mine], fn(mine)))
        return [out[it["id"]] for it in items]

    result: dict = {"accountant_epsilon": accountant_epsilon, "delta": delta, "significance": SIGNIFICANCE}
    canaries = planted["canaries"]
    if canaries:
        def loss_drop(items):
            texts = [c["text"] for c in items]
            tuned = sequence_losses(model, tokenizer, texts, device, amp)
            with model.disable_adapter():
                base = sequence_losses(model, tokenizer, texts, device, amp)
            return list(base - tuned)  # how much training lowered each canary's loss

        result["one_run"] = _one_run(canaries, scored(canaries, loss_drop), delta, accountant_epsilon)
    if planted["secrets"]:
        def exposures(items):
            return [secret_exposure(model, tokenizer, s["prefix"], s["digits"], device, amp) for s in items]

        result["secrets"] = [{"id": s["id"], "client": s["client"], "repeats": s["repeats"], **e}
                             for s, e in zip(planted["secrets"], scored(planted["secrets"], exposures))]
    return result
