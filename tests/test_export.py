"""`fedtune export` and `fedtune generate`: the merged Hugging Face folder computes what the
base model + adapter computes, and a folder that is not a run gets one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from fedtune.model import get_adapter_state, save_adapter
from fedtune.runfolder import update_run_file


@pytest.fixture
def run_dir(tmp_path, tiny_lora, tiny_path):
    """A run folder as a run leaves it: run.json naming the base model, adapters/global, and
    a client's personalized adapter (other weights)."""
    cfg, _, model = tiny_lora
    folder = tmp_path / "run"
    update_run_file(folder, status="completed", model_path=tiny_path)
    state = get_adapter_state(model)
    save_adapter(folder / "adapters" / "global", state, cfg, tiny_path)
    personal = {k: v * 3.0 for k, v in state.items()}
    save_adapter(folder / "clients" / "client-1" / "personalized", personal, cfg, tiny_path)
    return folder, model, state, personal


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("client", [None, "client-1"])
def test_the_exported_folder_computes_base_plus_adapter(run_dir, tmp_path, client):
    from transformers import AutoModelForCausalLM

    from fedtune.cli import main
    from fedtune.model import set_adapter_state

    folder, model, state, personal = run_dir
    out = tmp_path / "merged"
    assert main(["export", str(folder), "--out", str(out)] + (["--client", client] if client else [])) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # plain transformers
    assert not any("lora" in n for n, _ in merged.named_parameters())
    set_adapter_state(model, personal if client else state)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, got = _logits(model.eval(), ids), _logits(merged, ids)
    assert (got - expected).abs().max().item() < 1e-4
    with model.disable_adapter():  # the adapter matters: the merged model is not the base model
        assert (got - _logits(model, ids)).abs().max().item() > 1e-3


def test_generate_prints_a_completion(run_dir, capsys):
    from fedtune.cli import main

    folder = run_dir[0]
    assert main(["generate", str(folder), "The review says", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize("argv, match", [
    (["export", "{nothing}", "--out", "{out}"], "is not a run folder"),
    (["generate", "{nothing}", "hello"], "is not a run folder"),
    (["export", "{run}", "--out", "{out}", "--client", "client-9"], "no personalized adapter for client 'client-9'"),
    (["generate", "{run}", "hello", "--client", "client-9"], "clients with one: client-1"),
    (["generate", "{run}", "hello", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["export", "{run}", "--out", "{run}"], "exists and is not empty"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, match):
    from fedtune.cli import main

    (tmp_path / "nothing").mkdir()
    paths = {"nothing": tmp_path / "nothing", "out": tmp_path / "out", "run": run_dir[0]}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (tmp_path / "out").exists()
