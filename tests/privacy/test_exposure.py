"""Secret Sharer exposure: the one-pass candidate likelihoods (prefix cache, every digit's
logits from one forward) equal scoring each candidate string whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedtune.model import load_base_model, load_tokenizer
from fedtune.privacy.empirical import candidate_log_likelihoods, secret_exposure


@pytest.mark.parametrize("length", [1, 2, 3])
def test_one_pass_likelihoods_equal_scoring_each_candidate_whole(tiny_path, length):
    tok, device = load_tokenizer(tiny_path), torch.device("cpu")
    model = load_base_model(tiny_path, device).eval()
    prefix = tok("The access code of Anna is ", add_special_tokens=False)["input_ids"]
    digits = [tok(str(k), add_special_tokens=False)["input_ids"][0] for k in range(10)]
    fast = candidate_log_likelihoods(model, prefix, digits, length, device, None, batch_size=7)  # uneven chunks
    whole = []
    with torch.no_grad():
        for code in range(10 ** length):
            ds = [int(c) for c in f"{code:0{length}d}"]
            logp = F.log_softmax(model(torch.tensor([prefix + [digits[d] for d in ds]])).logits[0].float(), -1)
            whole.append(sum(float(logp[len(prefix) - 1 + k, digits[d]]) for k, d in enumerate(ds)))
    assert torch.allclose(fast, torch.tensor(whole, dtype=torch.float64), atol=1e-5)
    secret = "42"[:length].rjust(length, "7")
    rank = 1 + int((fast > fast[int(secret)]).sum())
    assert secret_exposure(model, tok, "The access code of Anna is ", secret, device, None)["rank"] == rank
