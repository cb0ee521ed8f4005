"""The memorization check shared by the audit tests: train with planted records, no DP and
at ε = 1, and audit each run with `fedtune audit --verify --empirical`.

Each arm of the SmolLM2 check lives in its own test file (test_memorization_*.py) so that
pytest-xdist's ``--dist loadfile`` can run the two on different workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ARMS = {"no-dp": False, "dp-eps1": True}

MEMORIZE = """\
[run]
name = "{name}"
[model]
max_length = 64
[data]
source = "{data}"
partition = "iid"
[train]
local_steps = 50
batch_size = 8
learning_rate = 0.003
[privacy]
dp = {dp}
epsilon = 1.0
seed = 0
[federation]
mode = "centralized"
rounds = 2
[audit]
canaries = 100
canary_words = 6
secrets = 2
secret_repeats = 8
"""


def fedtune(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def simulate(out, *args):
    res = fedtune("simulate", *args, "--output", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def audit_arm(base, train, name: str) -> dict:
    """One arm: ``train(folder, dp)`` makes a run folder with planted records; its audit."""
    folder = train(base / name, ARMS[name])
    res = fedtune("audit", str(folder), "--verify", "--empirical")
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((folder / "audit.json").read_text())


def audit_both_arms(base, train) -> dict:
    """Both arms, no DP and ε = 1, in one process (for checks cheap enough to run together)."""
    return {name: audit_arm(base, train, name) for name in ARMS}


def smollm2_arm(tmp_path_factory, name: str) -> dict:
    """SmolLM2 on 10 short records plus 100 canaries and 2 secrets (×8), 100 steps: the audit
    of the arm ``name`` ("no-dp" memorizes them; "dp-eps1" must not)."""
    base = tmp_path_factory.mktemp("memorize")
    data = base / "visits.jsonl"
    data.write_text("".join(json.dumps({"text": f"visit {i}: patient is stable"}) + "\n" for i in range(10)))

    def train(out, dp):
        cfg = base / f"{out.name}.toml"
        cfg.write_text(textwrap.dedent(MEMORIZE.format(name=out.name, data=data, dp=str(dp).lower())))
        return simulate(out, str(cfg))

    return {name: audit_arm(base, train, name)}


def assert_found_without_dp(audits) -> None:
    emp = audits["no-dp"]["empirical"]
    assert emp["one_run"]["epsilon_lower_bound"] > 1.0  # clearly above 0: the attack proves leakage


def assert_below_epsilon_1(audits) -> None:
    emp = audits["dp-eps1"]["empirical"]
    assert emp["accountant_epsilon"] <= 1.0
    assert emp["one_run"]["epsilon_lower_bound"] <= emp["accountant_epsilon"] and not emp["one_run"]["violation"]
