"""Personalization after federation on a hand-made run folder (no simulation engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtune import config
from fedtune.cli import main
from fedtune.model import save_adapter
from fedtune.personalize import JSON, personalize, personalized_dir
from fedtune.privacy import Ledger, epsilon_independent, make_plan
from fedtune.runfolder import adapter_dir, atomic_write_text, ledger_path, update_run_file
from fedtune.server import initial_adapter
from tests.conftest import tiny_config


def _run_folder(path, tiny_path, **sections):
    """A completed two-client run: config, run.json and a global adapter with B off zero."""
    sections["personalize"] = {"method": "finetune", "steps": 2, **sections.get("personalize", {})}
    cfg = tiny_config(run={"dir": str(path)}, federation={"clients": 2}, **sections)
    atomic_write_text(path / "config.toml", config.dump_toml(cfg))
    update_run_file(path, status="completed", model_path=tiny_path)
    state = initial_adapter(cfg, tiny_path)
    gen = torch.Generator().manual_seed(3)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.05 if "lora_B" in k else v) for k, v in state.items()}
    save_adapter(adapter_dir(path, "global"), state, cfg, tiny_path)
    return cfg


def test_personalized_adapters_load_in_plain_peft(tmp_path, tiny_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _run_folder(tmp_path, tiny_path, personalize={"method": "ditto", "steps": 2, "dp": False})
    result = personalize(tmp_path)
    assert [c["client"] for c in result["clients"]] == ["client-0", "client-1"]
    for c in result["clients"]:
        assert c["status"] == "ok" and c["train_records"] > 0 and c["heldout_records"] > 0
        assert all(math.isfinite(v) and v > 1 for v in c["perplexity"].values())
        assert set(c["accuracy"]) == set(c["perplexity"]) and all(0 <= v <= 1 for v in c["accuracy"].values())
        assert 0 < c["labelled_records"] <= c["heldout_records"] and 0 <= c["majority_accuracy"] <= 1
    assert result["accuracy"]["worst"]["global"] == min(c["accuracy"]["global"] for c in result["clients"])
    assert "Rating accuracy by label likelihood" in (tmp_path / "personalization.md").read_text()
    assert result["worst"]["global"] == max(c["perplexity"]["global"] for c in result["clients"])
    folder = personalized_dir(tmp_path, "client-0")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(folder))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    glob = load_file(str(adapter_dir(tmp_path, "global") / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], glob[k]) for k in saved)  # it moved away from the global adapter
    for name in ("personalization.md", "personalization.png", "summary.md"):
        assert (tmp_path / name).is_file()
    assert "[personalization.md](personalization.md)" in (tmp_path / "summary.md").read_text()


def test_dp_personalization_is_charged_to_the_ledger_or_refused(tmp_path, tiny_path):
    cfg = _run_folder(tmp_path, tiny_path)
    from fedtune.personalize import _setup

    sizes = [len(_setup(cfg, i).train) for i in range(2)]
    for i, n in enumerate(sizes):  # client-1's budget cannot pay for personalization
        plan = make_plan(cfg.replace(privacy={"budget": 8.0 if i == 0 else 1e-3}), n)
        Ledger(ledger_path(tmp_path, f"client-{i}")).append({**plan.to_entry(), "client": f"client-{i}"})
    result = personalize(tmp_path)
    ok, refused = result["clients"]
    assert ok["status"] == "ok" and 0 < ok["epsilon_after"] <= 8.0
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    (spend,) = ledger.spends()
    assert spend["round"] == "personalize" and spend["steps"] == 2
    assert spend["epsilon"] == pytest.approx(epsilon_independent(ledger.history(), spend["delta"]), rel=1e-3)
    assert refused["status"] == "refused" and "privacy budget" in refused["reason"]
    assert refused["perplexity"]["personalized"] == pytest.approx(refused["perplexity"]["global"])
    assert [e["type"] for e in Ledger(ledger_path(tmp_path, "client-1")).entries()] == ["plan", "refusal"]
    assert json.loads((tmp_path / JSON).read_text())["dp"] is True


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedtune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_personalize_on_bad_input_is_one_line_exit_2(tmp_path, tiny_path, capsys):
    assert main(["personalize", str(tmp_path / "nope")]) == 2
    assert "is not a fedtune run folder" in _one_error_line(capsys)
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i} about the patient"}) + "\n" for i in range(40)))
    run = tmp_path / "run"
    run.mkdir()
    _run_folder(run, tiny_path, data={"source": str(data), "partition": "iid"}, personalize={"method": "finetune", "dp": False})
    data.unlink()  # the client's data is gone
    assert main(["personalize", str(run)]) == 2
    assert "not found" in _one_error_line(capsys)
    assert main(["personalize", str(run), "--set", "personalize.method=none"]) == 2
    assert "personalize.method is none" in _one_error_line(capsys)


def test_adapter_state_is_a_copy_not_the_live_parameters(tiny_lora):
    """The seeded init (base model, local-only start, fedsa's first B) must survive training."""
    from fedtune.model import get_adapter_state

    _, _, model = tiny_lora
    before = get_adapter_state(model)
    saved = {k: v.clone() for k, v in before.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(before[k], saved[k]) for k in saved)


def test_rating_choices_share_the_completion_and_accuracy_picks_the_likeliest_label(tiny_lora, monkeypatch):
    from fedtune import train
    from fedtune.data import RATINGS, TokenizedData, client_data, label_choices

    cfg, tokenizer, model = tiny_lora
    heldout = client_data(cfg, 0)[1].select(range(5))
    choices, truth, labels = label_choices(cfg, heldout, tokenizer)
    assert labels == RATINGS and truth == [RATINGS.index(r) for r in heldout["rating"]]
    assert len(choices) == 3 * len(truth)
    for i in range(len(truth)):
        rows = range(3 * i, 3 * i + 3)
        completions = {tuple(choices.ids[j][choices.starts[j]:].tolist()) for j in rows}
        assert len(completions) == 1  # the same review tokens under every label
        prompts = [tokenizer.decode(choices.ids[j][:choices.starts[j]]) for j in rows]
        assert [f"Rating: {label}" in p for p, label in zip(prompts, RATINGS)] == [True] * 3
    assert label_choices(cfg.replace(data={"source": "x.jsonl"}), heldout, tokenizer) is None  # unlabelled data

    # The real scorer agrees with scoring each variant on its own (order is restored after length sorting).
    kw = dict(batch_size=4, device=torch.device("cpu"), amp_dtype=None, pad_id=tokenizer.pad_token_id)
    alone = [train.evaluate(model, TokenizedData([choices.ids[j]], [choices.starts[j]]), **kw)[0] for j in range(len(choices))]
    expected = sum(min(range(3), key=lambda k: alone[3 * i + k]) == t for i, t in enumerate(truth)) / len(truth)
    assert train.label_accuracy(model, choices, truth, **kw) == pytest.approx(expected)
    # And it scores the label with the lowest loss: one forced NLL table, known answer.
    nll = [1.0, 0.5, 2.0, 0.1, 3.0, 3.0]  # record 0 -> label 1, record 1 -> label 0
    monkeypatch.setattr(train, "completion_nll", lambda *a, **k: (nll, [1] * 6))
    assert train.label_accuracy(model, choices, [1, 2], **kw) == 0.5
