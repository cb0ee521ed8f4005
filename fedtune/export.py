"""Use what was trained: `fedtune export` and `fedtune generate`.

``export RUN_DIR --out DIR`` merges the run's global adapter (or, with ``--client``, that
client's personalized or local-only adapter) into the base model and writes a plain
Hugging Face model folder: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it, no
fedtune or PEFT needed. ``generate RUN_DIR "prompt"`` prints the merged model's
completion, so what DP costs can be read as text, not only as perplexity.

A personalized adapter trained without DP (``personalize.dp = false``) must never leave
its client: exporting it is fine on that client's machine, but the folder is not covered
by any guarantee.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.runfolder import adapter_dir, client_dir, is_run_dir, read_json

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_folder(run_dir: Path, client: str | None) -> Path:
    """The PEFT adapter folder to merge: the global adapter, or ``client``'s own."""
    if not is_run_dir(run_dir):
        raise FedtuneError(f"{run_dir} is not a run folder (no run.json); pass the folder `fedtune simulate` printed")
    if client is None:
        folder = adapter_dir(run_dir, "global")
        if not (folder / ADAPTER_FILE).is_file():
            raise FedtuneError(f"{run_dir} has no global adapter (adapters/global): the run did not complete or "
                               "trained local-only; pass --client NAME for a client's own adapter")
        return folder
    for folder in (client_dir(run_dir, client) / "personalized", adapter_dir(run_dir, f"local-{client}")):
        if (folder / ADAPTER_FILE).is_file():
            return folder
    known = sorted(p.parent.parent.name for p in (run_dir / "clients").glob(f"*/personalized/{ADAPTER_FILE}"))
    raise FedtuneError(f"{run_dir} has no personalized adapter for client {client!r} (clients with one: "
                       f"{', '.join(known) or 'none'}); run `fedtune personalize {run_dir}` first, or drop --client")


def merged_model(run_dir: str | Path, client: str | None = None):
    """(merged model in fp32 on the CPU, tokenizer, base model path) for the run's adapter."""
    import torch
    from peft import PeftModel

    from fedtune.model import load_base_model, load_tokenizer  # lazy: torch (`fedtune` start-up)

    run_dir = Path(run_dir)
    folder = adapter_folder(run_dir, client)
    path = read_json(run_dir / "run.json").get("model_path")
    if not path:
        raise FedtuneError(f"{run_dir}/run.json names no base model (model_path); the run never started")
    base = load_base_model(path, torch.device("cpu"))
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged.config.use_cache = True  # generation; training had turned it off
    return merged.eval(), load_tokenizer(path), path


def export(run_dir: str | Path, out: str | Path, client: str | None = None) -> Path:
    """Write the merged model and its tokenizer to ``out`` (a new folder), atomically."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out} exists and is not empty; pass a new folder to --out")
    model, tokenizer, _ = merged_model(run_dir, client)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def generate(run_dir: str | Path, prompt: str, client: str | None = None, max_new_tokens: int = 64) -> str:
    """The merged model's greedy completion of ``prompt`` (the new text only)."""
    import torch

    if max_new_tokens < 1:
        raise FedtuneError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    model, tokenizer, _ = merged_model(run_dir, client)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ---- the commands ----------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write the trained model (adapter merged into the base) as a Hugging Face folder",
                       description="The run's global adapter (or --client NAME's personalized one) merged into the "
                                   "base model; AutoModelForCausalLM.from_pretrained(OUT) loads it.")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--out", required=True, help="new folder for the model")
    p.add_argument("--client", help="a client's personalized (or local-only) adapter instead of the global one")
    p = sub.add_parser("generate", help="print the trained model's completion of a prompt")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("prompt", help="the text to complete")
    p.add_argument("--client", help="a client's personalized (or local-only) adapter instead of the global one")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")


def cmd_export(args) -> int:
    print(export(args.run_dir, args.out, args.client))
    return 0


def cmd_generate(args) -> int:
    print(generate(args.run_dir, args.prompt, args.client, args.max_new_tokens))
    sys.stdout.flush()
    return 0


COMMANDS = {"export": cmd_export, "generate": cmd_generate}
