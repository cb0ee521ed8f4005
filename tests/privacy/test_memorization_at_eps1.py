"""The claim's second half, on the real model: the same training at ε = 1 (DP-SGD) leaves the
empirical lower bound at or below ε and the secrets unrecited."""

from __future__ import annotations

import pytest

from tests.memorization import assert_below_epsilon_1, smollm2_arm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    return smollm2_arm(tmp_path_factory, "dp-eps1")


def test_at_epsilon_1_the_empirical_bound_stays_below_1(audits):
    assert_below_epsilon_1(audits)
    emp = audits["dp-eps1"]["empirical"]
    assert max(s["exposure_bits"] for s in emp["secrets"]) < 5
