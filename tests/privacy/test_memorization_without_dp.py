"""The claim's first half, on the real model: without DP, fine-tuning memorizes planted
canaries and secrets, and `fedtune audit --empirical` can tell (ε̂ > 1, secrets recited)."""

from __future__ import annotations

import pytest

from tests.memorization import assert_found_without_dp, smollm2_arm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    return smollm2_arm(tmp_path_factory, "no-dp")


def test_without_dp_the_canaries_and_secrets_are_memorized(audits):
    assert_found_without_dp(audits)
    emp = audits["no-dp"]["empirical"]
    assert min(s["exposure_bits"] for s in emp["secrets"]) > 10  # of 13.3: (nearly) recited
