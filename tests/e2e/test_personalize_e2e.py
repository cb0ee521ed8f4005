"""End to end: a tiny FFA-LoRA simulation with personalization on, through `fedtune simulate`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fedtune.runfolder import read_jsonl
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_ffa_simulation_with_personalization_writes_a_sane_per_client_report(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"), "--output",
         str(tmp_path), "--quiet", "--rounds", "1", "--no-dp", "--set", "federation.aggregation=ffa",
         "--set", "personalize.method=finetune", "--set", "personalize.steps=3", "--set", "personalize.dp=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "personalization (finetune)" in res.stdout
    # FFA: only lora_B travelled, and the saved global adapter keeps the seeded A.
    trains = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train"]
    assert trains and all(r["status"] == "ok" for r in trains)
    rounds = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "round"]
    glob = load_file(str(run_dir / "adapters" / "global" / "adapter_model.safetensors"))
    b_bytes = sum(v.numel() * 4 for k, v in glob.items() if "lora_B" in k)
    a_bytes = sum(v.numel() * 4 for k, v in glob.items() if "lora_A" in k)
    assert all(b_bytes <= r["upload-bytes"] < b_bytes + a_bytes for r in trains)
    assert rounds[-1]["perplexity"] < rounds[0]["perplexity"]
    report = json.loads((run_dir / "personalization.json").read_text())
    assert report["aggregation"] == "ffa" and len(report["clients"]) == 3
    for c in report["clients"]:
        ppl = c["perplexity"]
        assert set(ppl) == {"base", "local", "global", "personalized"}
        assert all(math.isfinite(v) and 1 < v < 1000 for v in ppl.values())
        assert (run_dir / c["adapter"] / "adapter_model.safetensors").is_file()
        assert set(c["accuracy"]) == set(ppl) and all(0 <= v <= 1 for v in c["accuracy"].values())
    # Fine-tuning on each client's own records helps on average (a random tiny model: small gains).
    assert report["average"]["personalized"] < report["average"]["base"]
    assert report["worst"]["personalized"] == max(c["perplexity"]["personalized"] for c in report["clients"])
    assert (run_dir / "personalization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "personalization.md" in (run_dir / "summary.md").read_text()
