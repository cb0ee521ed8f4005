"""Continuing a run after its server stopped, from the run folder alone.

A round is completed when its ``phase: round`` row is in metrics.jsonl. Everything the
ServerApp writes for a round comes before that row (train and evaluate rows, the global
adapter, the server optimizer's state, a client-level spend), and the row names the adapter
folder that holds the global adapter after the round (``adapter``; "" = the seeded initial
adapter). A crash therefore leaves at most one incomplete round, which a resumed run does
again:

- its rows move from metrics.jsonl to metrics-interrupted.jsonl (metrics.jsonl is rewritten
  atomically), so reports and the audit see each round once;
- its adapter folder, if it was written, is overwritten when the round is done again;
- a client-level spend the server recorded for it stays in the server ledger: the noisy
  model may have left (the plan, fixed before round 1, is never made again);
- clients that trained and paid for it send the same update again at no cost
  (fedtune.release).

The config may change only where that cannot change what was computed so far (MAY_CHANGE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune import config as config_mod
from fedtune.errors import FedtuneError
from fedtune.model import check_adapter_state
from fedtune.runfolder import (
    RUN_FILE, adapter_dir, append_jsonl, atomic_write_bytes, is_run_dir, read_json,
)

if TYPE_CHECKING:
    import torch

    from fedtune.server.aggregation import ServerOptimizer

SERVER_LOCK = ".server.lock"  # held by the run's ServerApp while it runs
METRICS = "metrics.jsonl"
INTERRUPTED = "metrics-interrupted.jsonl"
OPTIMIZER_FILE = "server_optimizer.safetensors"  # in the round's adapter folder
ADAPTER_FILE = "adapter_model.safetensors"
# Keys a resumed run may change: how long to wait, where to compute, how many more rounds.
MAY_CHANGE = ("run.name", "run.dir", "run.output", "federation.rounds", "federation.round_timeout",
              "federation.stage_timeout", "train.threads", "model.device", "model.cache_dir", "train.memory_budget_mb")


def _metric_lines(run_dir: Path) -> list[tuple[bytes, dict]]:
    """metrics.jsonl's complete lines, parsed; a torn last line (a crash mid-write) is left out."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    raw = path.read_bytes().split(b"\n")
    out = []
    for line_no, line in enumerate(raw[:-1], start=1):  # raw[-1]: after the last newline
        if line.strip():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                raise FedtuneError(f"{path}:{line_no}: not valid JSON; the file is damaged") from None
    return out


def completed_round(run_dir: str | Path) -> tuple[int, str]:
    """(last completed round, the adapter folder holding the global adapter after it);
    (-1, "") when not even round 0, the base model's evaluation, completed."""
    run_dir = Path(run_dir)
    done, label = -1, ""
    for _, row in _metric_lines(run_dir):
        if row.get("phase") == "round" and row["round"] > done:
            done = row["round"]
            label = row.get("adapter", label)
    if label and not (adapter_dir(run_dir, label) / ADAPTER_FILE).is_file():
        raise FedtuneError(f"{run_dir}: round {done} completed with the global adapter adapters/{label}, which is "
                           "missing; the run folder is damaged and cannot be resumed")
    return done, label


def restart(run_dir: str | Path) -> tuple[int, str]:
    """Set the run folder back to its last completed round; ``completed_round``'s answer."""
    run_dir = Path(run_dir)
    done, label = completed_round(run_dir)
    path = run_dir / METRICS
    data = path.read_bytes() if path.exists() else b""
    lines = _metric_lines(run_dir)
    dropped = [row for _, row in lines if row["round"] > done]
    if dropped or (data and not data.endswith(b"\n")):
        for row in dropped:
            append_jsonl(run_dir / INTERRUPTED, row)
        atomic_write_bytes(path, b"".join(line + b"\n" for line, row in lines if row["round"] <= done))
    return done, label


def stored_config(run_dir: Path) -> config_mod.Config:
    if not is_run_dir(run_dir):
        raise FedtuneError(f"{run_dir} is not a run folder (no {RUN_FILE}); pass the folder `fedtune run` printed")
    return config_mod.load(run_dir / "config.toml")


def check(run_dir: str | Path, cfg: config_mod.Config) -> int:
    """The last completed round of the run in ``run_dir``, which ``cfg`` is to continue;
    FedtuneError (one line) if it cannot: completed, damaged, or a config that changed."""
    run_dir = Path(run_dir)
    old = stored_config(run_dir)
    if read_json(run_dir / RUN_FILE).get("status") == "completed":
        raise FedtuneError(f"the run in {run_dir} already completed; start a new one with `fedtune run` (no --resume)")
    was, now = config_mod.to_flat(old), config_mod.to_flat(cfg)
    changed = [f"{k} = {now[k]!r} (the run has {was[k]!r})" for k in was
               if was[k] != now[k] and k not in MAY_CHANGE and not k.startswith("simulation.")]
    if changed:
        raise FedtuneError(f"cannot resume {run_dir}: the config changed: {'; '.join(changed[:3])}; a resumed run "
                           f"keeps its config (only {', '.join(MAY_CHANGE[3:])} may change)")
    done, _ = completed_round(run_dir)
    if cfg.federation.rounds < done:
        raise FedtuneError(f"cannot resume {run_dir} with federation.rounds = {cfg.federation.rounds}: it already "
                           f"completed round {done}; set federation.rounds to {done} or more")
    if done >= 1 and cfg.federation.mode == "local":
        raise FedtuneError(f"cannot resume {run_dir}: a local-only baseline keeps each client's adapter in the "
                           "server's memory only; start it again")
    return done


def load_global(run_dir: Path, label: str, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global adapter saved in ``adapters/<label>``, checked against the model's LoRA."""
    from safetensors.torch import load_file

    path = adapter_dir(run_dir, label) / ADAPTER_FILE
    state = load_file(str(path))
    try:
        check_adapter_state(state, initial)
    except ValueError as exc:
        raise FedtuneError(f"{path} does not fit the model's LoRA adapter ({exc}); resume with the run's model "
                           "and lora settings") from None
    return state


def save_optimizer(run_dir: Path, label: str, opt: ServerOptimizer) -> None:
    if opt.kind != "none":
        from safetensors.numpy import save

        atomic_write_bytes(adapter_dir(run_dir, label) / OPTIMIZER_FILE, save(opt.state()))


def load_optimizer(run_dir: Path, label: str, opt: ServerOptimizer) -> None:
    """The server optimizer's moments as they were after the round that wrote ``label``."""
    if opt.kind == "none" or not label:
        return
    from safetensors.numpy import load_file

    path = adapter_dir(run_dir, label) / OPTIMIZER_FILE
    if not path.is_file():
        raise FedtuneError(f"{path} is missing: the server optimizer's state was not saved with the adapter; "
                           "the run cannot be resumed with federation.server_optimizer")
    opt.load_state(load_file(str(path)))
