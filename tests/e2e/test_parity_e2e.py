"""Simulation and deployment give the same run: one tiny config (3 clients named client-0..2,
2 rounds, DP-SGD with a test seed, SecAgg+) run by `fedtune simulate` and deployed on
loopback (TLS, client authentication, one SuperNode process per client, each holding the
simulated client's records from `fedtune data export`). The global adapters after every
round are bit-exact equal, and so are the audits (each client's ε per round and in total,
δ, σ, q, steps) and the held-out evaluations; both runs say loudly that the noise was seeded.

Bit-exact although SecAgg+ quantizes: the test seed also fixes each client's stochastic
rounding, the masks cancel exactly in the integer sum, and the server decodes that sum the
same way, so equal client updates give equal field elements and an equal average.
The simulation runs while the deployment does; about 4 min on a loaded 2-core machine."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fedtune import config
from fedtune.data import export_clients
from fedtune.runfolder import read_json, read_jsonl
from tests.deployment import Federation, _toml, cli, wait_for

pytestmark = pytest.mark.slow

NAMES = ["client-0", "client-1", "client-2"]
RUN = {"run": {"name": "parity"}, "model": {"name": "tiny-random-llama", "max_length": 128, "precision": "fp32"},
       "train": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.01, "threads": 1},
       "data": {"max_eval_examples": 4}, "privacy": {"seed": 11},
       "federation": {"clients": len(NAMES), "rounds": 2, "round_timeout": 300.0}, "secagg": {"enabled": True}}


def _audit(fed: Federation, run_dir) -> dict[str, dict]:
    """`fedtune audit --verify`'s numbers per ledger (without file paths)."""
    res = subprocess.run(cli("audit", str(run_dir), "--verify"), capture_output=True, text=True, env=fed.env, timeout=300)
    assert res.returncode == 0 and "verification passed" in res.stdout, res.stdout + res.stderr
    assert "privacy.seed was set" in (run_dir / "audit.md").read_text()
    return {r["client"]: {k: v for k, v in r.items() if k != "ledger"} for r in read_json(run_dir / "audit.json")["rows"]}


def _evaluations(run_dir) -> dict:
    return {(r["round"], r["client"]): r["eval-loss-sum"] for r in read_jsonl(run_dir / "metrics.jsonl")
            if r["phase"] == "evaluate"}


def _adapters(run_dir) -> dict[str, bytes]:
    return {d.name: (d / "adapter_model.safetensors").read_bytes() for d in sorted((run_dir / "adapters").iterdir())}


def test_simulation_and_deployment_give_the_same_adapters_and_audit(tmp_path, tiny_path):
    (tmp_path / "sim.toml").write_text(_toml(RUN))
    export_clients(config.load(tmp_path / "sim.toml"), tmp_path / "fed" / "data")
    fed = Federation(tmp_path / "fed", NAMES, RUN, budget=config.load(tmp_path / "sim.toml").budget)
    try:
        fed.start_server()
        for name in NAMES:
            fed.start_client(name)
        runner = fed.start("run", "run", str(fed.root / "server.toml"))
        # The simulation runs while the deployed clients connect and train.
        sim = subprocess.run(cli("simulate", str(tmp_path / "sim.toml"), "--output", str(tmp_path / "sim"), "--quiet"),
                             capture_output=True, text=True, env=fed.env, timeout=600)
        assert sim.returncode == 0, sim.stdout + sim.stderr
        wait_for(lambda: runner.poll() is not None, 600, "the deployed run to end")
        assert runner.returncode == 0, fed.log("run") + fed.log("server")[-3000:]
    finally:
        fed.stop_all()
    (simulated,) = (tmp_path / "sim").iterdir()
    deployed = fed.run_dir()
    for name in NAMES:  # each operator hands over its ledger for the audit
        (deployed / "clients" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(fed.root / "state" / name / "runs" / deployed.name / "clients" / name / "ledger.jsonl",
                    deployed / "clients" / name / "ledger.jsonl")

    assert [r["secagg-included"] for r in read_jsonl(deployed / "metrics.jsonl") if r["phase"] == "round" and r["round"]] == [3, 3]
    adapters = _adapters(simulated)
    assert list(adapters) == ["global", "round-001", "round-002"]
    assert adapters == _adapters(deployed)  # bit-exact, every round
    assert adapters["round-001"] != adapters["round-002"]
    audits = [_audit(fed, d) for d in (simulated, deployed)]
    assert sorted(audits[0]) == NAMES and audits[0] == audits[1]
    assert all(r["seeded"] and r["rounds_joined"] == 2 and len(r["epsilon_per_round"]) == 2 for r in audits[0].values())
    assert _evaluations(simulated) == _evaluations(deployed) and len(_evaluations(deployed)) == 3 * len(NAMES)
    for run_dir in (simulated, deployed):  # loud: in run.json and at the top of the report
        assert read_json(run_dir / "run.json")["seeded"] is True
        assert "Warning: privacy.seed was set" in (run_dir / "summary.md").read_text()
