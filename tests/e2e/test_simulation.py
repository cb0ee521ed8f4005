"""End to end through Flower's simulation engine: `fedtune simulate` starts a SuperLink,
runs 3 tiny-model clients for 2 rounds and leaves a complete run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from fedtune.privacy import Ledger, epsilon_independent
from fedtune.runfolder import read_jsonl
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"), "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert f"run folder: {folder}" in res.stdout
    return folder


def test_run_folder_is_complete(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    assert cfg["federation"]["clients"] == 3 and cfg["run"]["dir"] == str(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    trains = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "evaluate"]
    assert sorted((r["round"], r["client"]) for r in trains) == [(r, f"client-{c}") for r in (1, 2) for c in range(3)]
    assert all(r["status"] == "ok" and r["epsilon"] <= 8.0 for r in trains)
    assert len(evals) == 3 * 3  # rounds 0 (base), 1, 2
    for label in ("round-001", "round-002", "global"):
        assert {p.name for p in (run_dir / "adapters" / label).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert (run_dir / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run_dir / "summary.md").read_text()
    assert "Held-out perplexity" in summary and "Unit protected" in summary
    assert not (run_dir / ".flower").exists()  # the private SuperLink's state is gone


def test_every_ledger_recomputes_with_an_independent_accountant(run_dir):
    for c in range(3):
        ledger = Ledger(run_dir / "clients" / f"client-{c}" / "ledger.jsonl")
        spends = ledger.spends()
        assert [s["round"] for s in spends] == [1, 2]
        plan = ledger.plan()
        assert plan["unit"].startswith("one training record") and plan["seeded"] is False
        assert spends[-1]["epsilon"] == pytest.approx(epsilon_independent(ledger.history(), plan["delta"]), rel=1e-3)


def test_global_adapter_loads_in_plain_peft_and_generates(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = json.loads((run_dir / "run.json").read_text())["model_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "global"))
    ids = tok("Condition: Acne\nDrug:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # B starts at zero: it was trained


def test_no_process_of_the_run_is_left_running(run_dir):
    """The SuperLink ran in the run folder; it and everything it started must be gone."""
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.cwd() == str(run_dir) or str(run_dir) in " ".join(p.info["cmdline"] or []):
                left.append(p.info)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert left == []


def test_baselines_run_in_the_same_command_and_are_compared(tmp_path):
    """--baselines: the configured run, then no-DP, centralized and local-only, compared."""
    res = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"), "--rounds", "1",
         "--baselines", "--output", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {row["label"]: row for row in summary["comparison"]}
    assert set(rows) == {"this run", "no-dp", "centralized", "local-only"}
    assert rows["no-dp"]["epsilon"] == float("inf") and rows["this run"]["epsilon"] <= 8.0
    base = run_dir / "baselines"
    central = read_jsonl(base / "centralized" / "metrics.jsonl")
    assert {r["client"] for r in central if r["phase"] == "train"} == {"central"}
    # Centralized evaluates on the union of the clients' held-out records.
    fed_tokens = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "round")["eval-tokens"]
    assert next(r for r in central if r["phase"] == "round")["eval-tokens"] == fed_tokens
    local = base / "local-only"
    assert sorted(p.name for p in (local / "adapters").iterdir()) == ["local-client-0", "local-client-1", "local-client-2"]
    assert "## Baselines" in (run_dir / "summary.md").read_text()
