"""A deployed server killed mid-run and restarted: `fedtune server start` (SuperLink with TLS
and SuperNode authentication) and three `fedtune client start` SuperNodes on loopback, 3
rounds on the tiny model. The server is killed (SuperLink, SuperExec and ServerApp) once a
client paid for round 2, started again, and `fedtune run --resume` finishes the run with the
SuperNodes that never stopped. Every client then spent exactly what an uninterrupted run
spends, and the tight client's budget refusal of round 3 is in the server's log and the
audit."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fedtune import config
from fedtune.data import export_clients
from fedtune.privacy import Ledger, epsilon, make_plan
from fedtune.server.resume import completed_round
from fedtune.runfolder import read_json, read_jsonl
from tests.conftest import tiny_config
from tests.deployment import Federation, cli, wait_for

pytestmark = pytest.mark.slow

NAMES = ["clinic-a", "clinic-b", "clinic-c"]
TIGHT = "clinic-c"  # its budget pays for rounds 1 and 2, not 3
RUN = {"run": {"name": "restart"}, "model": {"name": "tiny-random-llama", "max_length": 256, "precision": "fp32"},
       "train": {"local_steps": 1, "batch_size": 8, "learning_rate": 0.01, "threads": 1},
       "privacy": {"noise_multiplier": 1.0}, "data": {"max_eval_examples": 2},
       "federation": {"clients": 3, "rounds": 3, "round_timeout": 120.0}, "secagg": {"enabled": False}}


def _ledger(fed: Federation, run_dir, name: str) -> Ledger:
    return Ledger(fed.root / "state" / name / "runs" / run_dir.name / "clients" / name / "ledger.jsonl")


def _tight_budget(cfg, data_file, tiny_path) -> float:
    """Halfway between what 2 and 3 rounds of the client's plan cost."""
    from fedtune.deploy.node import LocalNode, local_examples
    from fedtune.model import load_tokenizer

    node = LocalNode(TIGHT, str(data_file), 8.0, str(data_file.parent / "probe-state"), "", True)  # never the cwd
    plan = make_plan(cfg, len(local_examples(cfg, node, tiny_path, lambda: load_tokenizer(tiny_path))[0]))
    return sum(epsilon([plan.round_history] * r, plan.delta) for r in (2, 3)) / 2


@pytest.fixture
def federation(tmp_path, tiny_path):
    export_clients(tiny_config(federation={"clients": len(NAMES)}), tmp_path / "data", NAMES)
    fed = Federation(tmp_path, NAMES, RUN)
    run_cfg = config.load(None, {f"{s}.{k}": v for s, body in RUN.items() for k, v in body.items()})
    fed.client_config(TIGHT, budget=_tight_budget(run_cfg, tmp_path / "data" / f"{TIGHT}.jsonl", tiny_path))
    yield fed
    fed.stop_all()


def test_a_killed_server_resumes_and_no_client_pays_twice(federation):
    fed = federation
    fed.start_server()
    for name in NAMES:
        fed.start_client(name)
    fed.start("run", "run", str(fed.root / "server.toml"))
    wait_for(lambda: (fed.root / "runs").exists() and any((fed.root / "runs").iterdir()), 120, "the run folder")
    run_dir = fed.run_dir()

    def spent_round_2() -> list[str]:
        return [n for n in NAMES if any(e["round"] == 2 for e in _ledger(fed, run_dir, n).spends())]

    wait_for(lambda: spent_round_2() or completed_round(run_dir)[0] >= 2, 600, "a client to pay for round 2")
    fed.kill("server")  # SuperLink, SuperExec and ServerApp, without warning
    fed.kill("run")  # the operator's `fedtune run` goes with the server's terminal
    paid_before, done_before = spent_round_2(), completed_round(run_dir)[0]
    assert done_before >= 1

    fed.start_server()
    resumed = fed.start("resume", "run", str(fed.root / "server.toml"), "--resume", str(run_dir))
    wait_for(lambda: resumed.poll() is not None, 900, "the resumed run to end")
    assert resumed.returncode == 0, fed.log("resume") + fed.log("server")[-3000:]
    assert f"resuming after round {done_before}" in fed.log("resume")

    run = read_json(run_dir / "run.json")
    assert run["status"] == "completed" and len(run["flwr_run_ids"]) == 2
    assert run["resumed_from_round"] == done_before
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows if r["phase"] == "round"] == [0, 1, 2, 3]
    train = {(r["round"], r["client"]): r for r in rows if r["phase"] == "train"}
    assert len(train) == 9 and train[(3, TIGHT)]["status"] == "refused"

    # Each client's ε is what an uninterrupted run spends: its plan's rounds it trained, once.
    for name in NAMES:
        ledger = _ledger(fed, run_dir, name)
        plan = ledger.plan()
        trained = [1, 2] if name == TIGHT else [1, 2, 3]
        assert [e["round"] for e in ledger.spends()] == trained
        expected = epsilon([(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])] * len(trained),
                           plan["delta"])
        assert ledger.spends()[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)
        if name in paid_before and done_before == 1:  # paid for round 2 before the kill: sent again, free
            assert any(e["type"] == "resend" and e["round"] == 2 for e in ledger.entries())

    # The refusal is in the server's log and, with the ledgers handed over, in the audit.
    log = (run_dir / "flower.log").read_text(errors="replace")
    assert f"client {TIGHT} refused round 3: privacy budget" in log
    for name in NAMES:
        (run_dir / "clients" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(_ledger(fed, run_dir, name).path, run_dir / "clients" / name / "ledger.jsonl")
    audit = subprocess.run(cli("audit", str(run_dir), "--verify"), capture_output=True, text=True, env=fed.env,
                           timeout=300)
    assert audit.returncode == 0 and "verification passed" in audit.stdout, audit.stdout + audit.stderr
    assert f"refused: {TIGHT} declined round 3 (privacy budget" in audit.stdout
    assert "recorded by server and ledger" in audit.stdout
