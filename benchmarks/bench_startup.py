"""Start-up cost of a deployed client per message.

A deployed SuperNode (Flower 1.41) starts a fresh ``flwr-clientapp`` process for every
message it receives (``flwr/supernode/runtime/run_clientapp.py`` pulls one message, runs the
ClientApp and exits; ``--isolation process`` changes who starts it, not how many), so each
SecAgg+ stage and each evaluation pays for Python, the imports and the base model load.
This measures, in a fresh process per repetition, what the ClientApp does before it can
touch the message: interpreter start, importing the ClientApp, and fedtune's client setup
(base model from the local safetensors cache, LoRA, the tokenized local examples the
client's first message cached), for two kinds of message: a SecAgg+ key stage (no torch, no
model) and an evaluation (the model). The process's exit after its reply is timed apart.

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
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedtune import config as config_mod
from fedtune.client import handle_evaluate, handle_train, setup
from fedtune.secagg.flower import ENCODING, STAGE, Encoding, to_record
from fedtune.secagg.protocol import SecAggParams
from fedtune.secagg.server import SecAggServer

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
cfg = config_mod.load(None, {{"model.name": {model!r}, "secagg.enabled": True, "data.max_eval_examples": 8}})
node = {{"fedtune-client": "bench", "data-file": {data!r}, "budget": 8.0, "state-dir": {state!r}, "model-cache": "",
        "allow-seeded": False}}
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=config_mod.to_flat(cfg))
if {kind!r} == "key":  # SecAgg+ advertise: what every key stage (advertise, share, unmask) loads
    enc = Encoding(bits=24, clip=1.0, max_weight=1e6, n_max=3)
    server = SecAggServer(SecAggParams(field_bits=enc.coder().field_bits, length=1000, degree=2, threshold=2, round=1),
                          [1, 2, 3])
    conf = to_record(server.advertise_request(), **{{STAGE: "advertise", "server-round": 1, ENCODING: enc.to_json()}})
    t_heavy = t_setup = time.perf_counter()  # no model to set up
    reply = handle_train(Message(RecordDict({{"config": conf}}), dst_node_id=1, message_type=MessageType.TRAIN), ctx)
    records = 0
else:  # evaluate: the base model, LoRA and local data, then the held-out loss of the adapter sent
    import peft, transformers, fedtune.data, fedtune.model, fedtune.train  # what setup imports on first use
    t_heavy = time.perf_counter()
    s = setup(ctx)
    t_setup = time.perf_counter()
    arrays = ArrayRecord({{k: Array(np.load({adapter!r})[k]) for k in np.load({adapter!r}).files}})
    reply = handle_evaluate(Message(RecordDict({{"arrays": arrays, "config": ConfigRecord({{"server-round": 1}})}}),
                                    dst_node_id=1, message_type=MessageType.EVALUATE), ctx)
    records = len(s.train)
assert not reply.has_error(), reply.error.reason
t_work = time.perf_counter()
heavy = [m for m in ("torch", "transformers", "peft", "opacus", "datasets", "flwr_datasets", "pandas") if m in sys.modules]
print(json.dumps({{"import": t_import - t0, "lazy": t_heavy - t_import, "setup": t_setup - t_heavy, "work": t_work - t_setup,
                  "train_records": records, "heavy_modules": heavy, "end": time.time()}}), flush=True)
"""  # "end": wall-clock time when the script is done; the rest until the parent sees it exit is the exit

PARTS = ("wall", "interpreter", "import", "lazy", "setup", "work", "exit")


def one(kind: str, model: str, data: str, state: str, adapter: str) -> dict:
    code = CHILD.format(root=str(ROOT), kind=kind, model=model, data=data, state=state, adapter=adapter)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall, done = time.perf_counter() - t0, time.time()
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    exit_s = done - out["end"]
    startup = wall - out["work"] - exit_s  # process start until the handler can do the message's own work
    return {**out, "wall": wall, "startup": startup, "exit": exit_s,
            "interpreter": startup - out["import"] - out["lazy"] - out["setup"]}


def _adapter(model: str, path: Path) -> None:
    """The initial global adapter, as the server would send it."""
    import numpy as np

    from fedtune import config as config_mod
    from fedtune.model import add_lora, get_adapter_state, load_base_model, resolve_model

    cfg = config_mod.load(None, {"model.name": model})
    m = add_lora(load_base_model(resolve_model(model), "cpu"), cfg, seed=cfg.run.seed)
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in get_adapter_state(m).items()})


def _table(runs: list[dict]) -> str:
    med = {k: statistics.median(r[k] for r in runs) for k in ("startup", *PARTS)}
    rows = "\n".join(f"| {i + 1} | {r['startup']:.2f} | {r['interpreter']:.2f} | {r['import']:.2f} | {r['lazy']:.2f} "
                     f"| {r['setup']:.2f} | {r['work']:.2f} | {r['exit']:.2f} |" for i, r in enumerate(runs))
    return (f"| rep | start-up s | interpreter start s | import ClientApp s | torch etc. on first use s "
            f"| setup (model + LoRA + data) s | handler work s | exit after the reply s |\n"
            f"|---|---|---|---|---|---|---|---|\n{rows}\n"
            f"| **median** | **{med['startup']:.2f}** | {med['interpreter']:.2f} | {med['import']:.2f} | {med['lazy']:.2f} "
            f"| {med['setup']:.2f} | {med['work']:.2f} | {med['exit']:.2f} |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from fedtune import config as config_mod
    from fedtune.data import client_data
    from fedtune.model import resolve_model

    load_start = os.getloadavg()[0]
    path = resolve_model(args.model)  # materialized once, before timing (a client's cache is warm)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "client.jsonl"
        train, heldout = client_data(config_mod.load(None, {"federation.clients": 4}), 0)
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                for r in list(heldout) + list(train)))
        adapter = str(Path(tmp) / "adapter.npz")
        _adapter(args.model, Path(adapter))
        for kind in ("key", "evaluate"):
            one(kind, args.model, str(data), tmp, adapter)  # warm the OS page cache, as on a client between rounds
            results[kind] = [one(kind, args.model, str(data), tmp, adapter) for _ in range(args.reps)]
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    med = {kind: {k: statistics.median(r[k] for r in runs) for k in ("startup", *PARTS)} for kind, runs in results.items()}
    result = {"model": args.model, "model_path": path, "safetensors_bytes": weights, "reps": results, "median": med,
              "target_s": 5.0, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "load_average_start": load_start, "load_average": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "startup.md").write_text(
        f"# Deployed client start-up per message ({args.model})\n\n"
        f"Fresh process per repetition (Flower 1.41 starts one ClientApp process per message); "
        f"base model {weights / 1e6:.0f} MB of safetensors in the local cache, page cache warm. "
        f"Machine: {result['machine']}; load average {load_start:.1f} at the start, {result['load_average'][0]:.1f} at the end "
        f"(shared machine). "
        f"Start-up = process start to the moment the handler can do the message's own work "
        f"(interpreter start + importing the ClientApp + imports on first use + setup); handler work is that "
        f"work, not start-up; exit = the end of the work to the process's end (after the reply; it delays no reply "
        f"but uses the CPU).\n\n"
        f"## SecAgg+ key stage (advertise; share and unmask load the same)\n\n"
        f"No torch, transformers, peft, opacus or datasets is imported "
        f"(imported: {results['key'][0]['heavy_modules'] or 'none'}); handler work = key generation and reply.\n\n"
        f"{_table(results['key'])}\n"
        f"## Evaluate (training loads the same plus opacus, then trains)\n\n"
        f"Imported: {', '.join(results['evaluate'][0]['heavy_modules'])}. "
        f"Handler work = held-out loss on at most 8 examples (data.max_eval_examples = 8).\n\n"
        f"{_table(results['evaluate'])}\n"
        f"Target ≤ 5 s. Not included: Flower's own per-message work (starting `flwr-clientapp`, pulling the message "
        f"and the FAB, replying), which the deployment test's rounds include.\n")
    print((out / "startup.md").read_text())


if __name__ == "__main__":
    main()
