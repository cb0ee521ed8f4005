"""Deployment end to end on loopback: `fedtune server start` (a SuperLink with TLS and
SuperNode authentication), four `fedtune client start` SuperNodes as separate processes,
`fedtune run` with secure aggregation on the tiny model; one client is killed in round 2
and the run still completes and passes `fedtune audit --verify`. A client whose key is
not registered, and a client without TLS, are turned away."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fedtune.data import export_clients
from fedtune.runfolder import read_json, read_jsonl
from tests.conftest import tiny_config
from tests.deployment import Federation, cli, wait_for

pytestmark = pytest.mark.slow

# SecAgg+ with 3 clients has 2 neighbours each and needs threshold 2 (> half), so one
# dropout leaves too few shares and the round aborts safely; with 4 it survives (a floor of 3
# clients a round: by default a round needs every selected client, see fedtune/floor.py).
# stage_timeout: an honest SecAgg+ key stage takes 1-2 s here at load 4-5 (docs/deployment.md,
# "Timing"); 8 s leaves a 4x margin and bounds what the killed client costs round 2.
NAMES = ["clinic-a", "clinic-b", "clinic-c", "clinic-d"]
VICTIM = "clinic-d"
RUN = {"run": {"name": "e2e"}, "model": {"name": "tiny-random-llama", "max_length": 256, "precision": "fp32"},
       "train": {"local_steps": 3, "batch_size": 8, "learning_rate": 0.01, "threads": 1},
       "data": {"max_eval_examples": 8}, "federation": {"clients": 4, "rounds": 2, "round_timeout": 600.0, "min_clients": 3,
                                                     "stage_timeout": 8.0},
       "secagg": {"enabled": True}}


@pytest.fixture
def federation(tmp_path, tiny_path):
    export_clients(tiny_config(federation={"clients": len(NAMES)}), tmp_path / "data", NAMES)
    shutil.copy(tmp_path / "data" / f"{NAMES[0]}.jsonl", tmp_path / "data" / "rogue.jsonl")
    fed = Federation(tmp_path, NAMES + ["rogue"], RUN)
    (tmp_path / "keys" / "rogue.pub").rename(tmp_path / "rogue.pub")  # never registered with the server
    yield fed
    fed.stop_all()


def test_deployment_survives_a_killed_client_and_turns_away_strangers(federation):
    fed = federation
    fed.start_server()
    assert "TLS, SuperNode authentication; 4 client key(s) registered" in fed.log("server")

    # The strangers knock while the federation starts and runs (the rogue's retries for a
    # key registered late take 30 s; this overlaps them with the run instead of waiting).
    rogue = fed.start_client("rogue")  # a valid key the server does not know
    fed.client_config("plain", key="keys/clinic-a", data="data/clinic-a.jsonl")
    plain = fed.start_client("plain", "--insecure")  # no TLS against a TLS server
    for name in NAMES:
        fed.start_client(name)
    runner = fed.start("run", "run", str(fed.root / "server.toml"))
    wait_for(lambda: rogue.poll() is not None, 120, "the unregistered client to be turned away")
    assert rogue.returncode == 1 and "Failed to activate SuperNode" in fed.log("rogue")
    assert "its key is not registered" in fed.log("rogue")
    assert "WARNING: --insecure" in fed.log("plain")
    wait_for(lambda: (fed.root / "runs").exists() and any((fed.root / "runs").iterdir()), 120, "the run folder")
    run_dir = fed.run_dir()

    victim_ledger = fed.root / "state" / VICTIM / "runs" / run_dir.name / "clients" / VICTIM / "ledger.jsonl"
    spent = lambda: any(e.get("round") == 2 and e["type"] == "spend" for e in read_jsonl(victim_ledger))  # noqa: E731
    wait_for(lambda: spent() or runner.poll() is not None, 900, f"{VICTIM} to spend on round 2")
    assert spent(), "the run ended before round 2: " + fed.log("run") + fed.log("server")[-3000:]
    # Killed at a fixed point: its spend is on disk and its masked update whole at the SuperLink
    # (its SuperNode logged the reply to round 2's collect as sent), so the round waits one key
    # stage for it (stage_timeout), never a lapse that depends on where the kill lands.
    wait_for(lambda: _sent_after(fed.log(VICTIM), "fedtune: collect message", 2), 300,
             f"{VICTIM}'s masked update of round 2 to leave", step=0.05)
    fed.kill(VICTIM)
    wait_for(lambda: runner.poll() is not None, 900, "the run to end")
    assert runner.returncode == 0, fed.log("run") + fed.log("server")[-3000:]
    assert plain.poll() is None or plain.returncode != 0  # still knocking, or gave up: never joined

    assert read_json(run_dir / "run.json")["status"] == "completed"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = {(r["round"], r["client"]): r for r in rows if r["phase"] == "train"}
    assert {c for (_, c) in train} == set(NAMES)  # the rogue and the plain client never took part
    assert all(train[(1, c)]["status"] == "ok" for c in NAMES)
    assert all(train[(2, c)]["status"] == "ok" for c in NAMES if c != VICTIM)
    round2 = next(r for r in rows if r["phase"] == "round" and r["round"] == 2)
    assert not round2["secagg-aborted"]
    assert round2["secagg-included"] == 4 and train[(2, VICTIM)]["status"] == "ok"  # its input is in the sum
    assert round2["secagg-dropped"] == [VICTIM]  # it missed a later stage; the survivors unmasked without it
    assert VICTIM not in {r["client"] for r in rows if r["phase"] == "evaluate" and r["round"] == 2}
    assert (run_dir / "adapters" / "round-002" / "adapter_model.safetensors").exists()

    # The ledgers stayed on the clients; for the audit each operator hands over its ledger.
    for name in NAMES:
        ledger = fed.root / "state" / name / "runs" / run_dir.name / "clients" / name / "ledger.jsonl"
        (run_dir / "clients" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(ledger, run_dir / "clients" / name / "ledger.jsonl")
    audit = subprocess.run(cli("audit", str(run_dir), "--verify"), capture_output=True, text=True, env=fed.env,
                           timeout=300)
    assert audit.returncode == 0 and "verification passed" in audit.stdout, audit.stdout + audit.stderr


def _sent_after(log: str, line: str, nth: int) -> bool:
    """Whether the SuperNode logged a reply as sent after the ``nth`` occurrence of ``line``."""
    parts = log.split(line)
    return len(parts) > nth and "Sent successfully" in parts[nth]
