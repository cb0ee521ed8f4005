"""Models: built-ins materialized once and atomically, LoRA wiring, adapter folders."""

from __future__ import annotations

import threading

import pytest
import torch

from fedtune import model as M
from fedtune.errors import FedtuneError
from fedtune.simulate import simulation_resources
from tests.conftest import tiny_config


def test_builtin_model_is_built_once_even_when_raced(tmp_path):
    built = []

    def build(out):
        built.append(out)
        (out / "config.json").write_text("{}")

    dest = tmp_path / "models" / "x"
    threads = [threading.Thread(target=M._materialize, args=(dest, build)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(built) == 1 and (dest / "config.json").exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".x-")] == []  # no temp folders left


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def broken(out):
        (out / "half.bin").write_text("x")
        raise FedtuneError("no gguf")

    with pytest.raises(FedtuneError):
        M._materialize(tmp_path / "models" / "y", broken)
    assert not (tmp_path / "models" / "y").exists()
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_adapter_folder_round_trips_through_peft(tiny_path, tmp_path):
    from peft import PeftModel

    cfg = tiny_config()
    model = M.add_lora(M.load_base_model(tiny_path, torch.device("cpu")), cfg, seed=0)
    state = {k: torch.randn_like(v) for k, v in M.get_adapter_state(model).items()}
    M.save_adapter(tmp_path / "adapter", state, cfg, tiny_path)
    M.save_adapter(tmp_path / "adapter", state, cfg, tiny_path)  # overwriting is atomic too
    loaded = PeftModel.from_pretrained(M.load_base_model(tiny_path, torch.device("cpu")), str(tmp_path / "adapter"))
    restored = M.get_adapter_state(loaded)
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    assert restored.keys() == state.keys()  # every LoRA tensor came back, under the same name
    for key, value in restored.items():
        torch.testing.assert_close(value, state[key])


def test_lora_targets_that_do_not_exist_are_a_clear_error(tiny_path):
    cfg = tiny_config(lora={"target_modules": "c_attn"})
    with pytest.raises(FedtuneError, match="lora.target_modules"):
        M.add_lora(M.load_base_model(tiny_path, torch.device("cpu")), cfg, seed=0)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, None), (True, False, torch.bfloat16), (False, True, torch.bfloat16)])
def test_precision_auto_follows_the_cpu(monkeypatch, amx, avx512_bf16, expected):
    """auto: bf16 only on CPUs that multiply bf16 in hardware; fp32 elsewhere."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert M.resolve_precision("auto", torch.device("cpu")) is expected


def test_precision_auto_and_device_choice():
    cpu = torch.device("cpu")
    assert M.resolve_precision("fp32", cpu) is None
    assert M.resolve_precision("bf16", cpu) is torch.bfloat16
    assert M.resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert M.resolve_device("auto") == cpu
        with pytest.raises(FedtuneError, match="no CUDA GPU"):
            M.resolve_device("cuda:0")


def test_gpus_are_shared_among_simulated_clients(monkeypatch):
    cfg = tiny_config(federation={"clients": 4}, simulation={"total_cpus": 8})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert simulation_resources(cfg)["client-resources-num-gpus"] == 0.25
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert simulation_resources(cfg)["client-resources-num-gpus"] == 0.0
    assert simulation_resources(cfg.replace(simulation={"client_gpus": 0.5}))["client-resources-num-gpus"] == 0.5
