"""Start-up cost of a deployed client per message.

A deployed SuperNode (Flower 1.41) starts a fresh ``flwr-clientapp`` process for every
message it receives (``flwr/supernode/runtime/run_clientapp.py`` pulls one message, runs the
ClientApp and exits; ``--isolation process`` changes who starts it, not how many), so each
SecAgg+ stage and each evaluation pays for Python, the imports and the base model load.
This measures, in a fresh process per repetition, what the ClientApp does before it can
touch the message: interpreter start, importing the ClientApp, and fedtune's client setup
(base model from the local safetensors cache, LoRA, tokenized local data).

    python benchmarks/bench_startup.py                    # default model, 5 repetitions
    python benchmarks/bench_startup.py --model tiny-random-llama --reps 2 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import client.client_app  # what flwr-clientapp loads from the FAB
t_import = time.perf_counter()
from flwr.app import Context, RecordDict
from fedtune import config as config_mod
from fedtune.client import setup
cfg = config_mod.load(None, {{"model.name": {model!r}}})
node = {{"fedtune-client": "bench", "data-file": {data!r}, "budget": 8.0, "state-dir": {state!r}, "model-cache": "",
        "allow-seeded": False}}
s = setup(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=config_mod.to_flat(cfg)))
t_setup = time.perf_counter()
print(json.dumps({{"import": t_import - t0, "setup": t_setup - t_import, "train_records": len(s.train)}}))
"""


def one(model: str, data: str, state: str) -> dict:
    code = CHILD.format(root=str(ROOT), model=model, data=data, state=state)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {**out, "wall": wall, "interpreter": wall - out["import"] - out["setup"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from fedtune import config as config_mod
    from fedtune.data import client_data
    from fedtune.model import resolve_model

    path = resolve_model(args.model)  # materialized once, before timing (a client's cache is warm)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "client.jsonl"
        train, heldout = client_data(config_mod.load(None, {"federation.clients": 4}), 0)
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                for r in list(heldout) + list(train)))
        one(args.model, str(data), tmp)  # warm the OS page cache, as on a client between rounds
        runs = [one(args.model, str(data), tmp) for _ in range(args.reps)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "interpreter", "import", "setup")}
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    result = {"model": args.model, "model_path": path, "safetensors_bytes": weights, "reps": runs, "median": med,
              "target_s": 5.0, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "load_average": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {i + 1} | {r['wall']:.2f} | {r['interpreter']:.2f} | {r['import']:.2f} | {r['setup']:.2f} |"
                     for i, r in enumerate(runs))
    (out / "startup.md").write_text(
        f"# Deployed client start-up per message ({args.model})\n\n"
        f"Fresh process per repetition (Flower 1.41 starts one ClientApp process per message); "
        f"base model {weights / 1e6:.0f} MB of safetensors in the local cache, page cache warm. "
        f"Machine: {result['machine']}; load average at the end {result['load_average'][0]:.1f} (shared machine).\n\n"
        f"| rep | total s | interpreter s | import ClientApp s | setup (model + LoRA + data) s |\n|---|---|---|---|---|\n"
        f"{rows}\n| **median** | **{med['wall']:.2f}** | {med['interpreter']:.2f} | {med['import']:.2f} | {med['setup']:.2f} |\n\n"
        f"Target ≤ 5 s. Not included: Flower's own per-message work (starting `flwr-clientapp`, pulling the message "
        f"and the FAB, replying), which the deployment test's rounds include.\n")
    print((out / "startup.md").read_text())


if __name__ == "__main__":
    main()
