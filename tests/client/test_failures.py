"""A client that fails is loud: one client's training raises (as an out-of-memory kill
would) inside the real ClientApp handler, the real ServerApp main runs the rounds. With the
default floor (every selected client) the run fails naming it; with a lowered floor it
completes and its headline compares the same held-out records, naming the client left out."""

from __future__ import annotations

import math

import pytest
from flwr.app import Context, RecordDict

from fedtune import config
from fedtune.floor import RoundFailed
from fedtune.privacy import Ledger
from fedtune.runfolder import ledger_path, read_json, read_jsonl
from tests.server.test_resume import NODES, Grid, _cfg, _serve

OOM = "DefaultCPUAllocator: not enough memory: you tried to allocate 4294967296 bytes"


@pytest.fixture
def client_1_fails(monkeypatch):
    """client-1 runs out of memory in every training round and in every evaluation after
    the base model's (as the Ray workers of the issue did)."""
    import fedtune.train as train
    from fedtune.client.setup import setup

    real_train, real_eval = train.train_round, train.evaluate
    victim = {}

    def victim_data(cfg):
        if "train" not in victim:
            ctx = Context(run_id=7, node_id=NODES[1], node_config={"partition-id": 1, "num-partitions": 3},
                          state=RecordDict(), run_config=config.to_flat(cfg))
            s = setup(ctx)
            victim.update(train=s.train, heldout=s.heldout, evaluated=0)
        return victim

    def train_round(model, data, **kw):
        if data is victim.get("train"):
            raise RuntimeError(OOM)
        return real_train(model, data, **kw)

    def evaluate(model, data, **kw):
        if data is victim.get("heldout"):
            victim["evaluated"] += 1
            if victim["evaluated"] > 1:
                raise RuntimeError(OOM)
        return real_eval(model, data, **kw)

    monkeypatch.setattr(train, "train_round", train_round)
    monkeypatch.setattr(train, "evaluate", evaluate)
    return victim_data


def test_a_client_that_fails_in_training_fails_the_run_naming_it(tmp_path, task_identity, client_1_fails):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir).replace(federation={"rounds": 2})
    client_1_fails(cfg)
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 3 selected clients trained, 3 needed") as err:
        _serve(cfg, Grid(cfg, {}), 1)
    assert "client-1 (failed): client-1: training failed: RuntimeError: DefaultCPUAllocator" in str(err.value)
    run = read_json(run_dir / "run.json")
    assert run["status"] == "failed" and "client-1" in run["error"] and "federation.min_clients" in run["error"]
    # Nothing after the failed round: no aggregate saved, no round marked completed.
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "round"] == [0]
    assert not (run_dir / "adapters" / "round-001").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "**The run failed:**" in summary
    assert "| 1 | train | client-1 | failed | client-1: training failed: RuntimeError: DefaultCPUAllocator" in summary
    assert "node-" not in summary
    assert Ledger(ledger_path(run_dir, "client-1")).spends() == []  # it never paid for what it never sent
    # A restarted server (no base evaluation to learn names from) still names it, not node-22.
    with pytest.raises(RoundFailed, match="client-1 \\(failed\\): client-1: training failed"):
        _serve(cfg, Grid(cfg, {}), 2)
    assert not any(r.get("client", "").startswith("node-") for r in read_jsonl(run_dir / "metrics.jsonl"))


def _pooled(rows):
    return math.exp(sum(r["eval-loss-sum"] for r in rows) / sum(r["eval-tokens"] for r in rows))


def test_with_a_lowered_floor_the_headline_compares_the_same_records(tmp_path, task_identity, client_1_fails, capsys):
    from fedtune.cli import _print_result

    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir).replace(federation={"rounds": 2, "min_clients": 2})
    client_1_fails(cfg)
    _serve(cfg, Grid(cfg, {}), 1)
    assert read_json(run_dir / "run.json")["status"] == "completed"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = {(r["round"], r["client"]): r for r in rows if r["phase"] == "evaluate" and r["status"] == "ok"}
    assert (0, "client-1") in evals and (2, "client-1") not in evals
    s = read_json(run_dir / "summary.json")
    same = ["client-0", "client-2"]
    assert s["compared_clients"] == same and list(s["missing_clients"]) == ["client-1"]
    assert s["base_perplexity"] == pytest.approx(_pooled([evals[(0, c)] for c in same]), rel=1e-12)
    assert s["final_perplexity"] == pytest.approx(_pooled([evals[(2, c)] for c in same]), rel=1e-12)
    base_all = next(r for r in rows if r["phase"] == "round" and r["round"] == 0)["perplexity"]
    assert s["base_perplexity"] != pytest.approx(base_all, rel=1e-9)  # not the four-client base of the issue
    assert [r["trained"] for r in rows if r["phase"] == "round" and r["round"] > 0] == [2, 2]
    _print_result(run_dir)
    out = capsys.readouterr().out
    assert "not compared: client-1 (no evaluation of the final model)" in out
    assert "client-1: did not train" in out and "failures 2" in out
    md = (run_dir / "summary.md").read_text()
    assert "not compared: client-1, no evaluation of the final model" in md and "node-" not in md


def test_the_headline_names_a_client_that_never_evaluated():
    from fedtune.headline import headline, same_records

    def row(rnd, client, loss, tokens=10, status="ok"):
        return {"round": rnd, "client": client, "status": status, "eval-loss-sum": loss, "eval-tokens": tokens}

    evals = [row(0, "a", 30.0), row(0, "b", 20.0), row(0, "c", 0.0, status="failed"),
             row(2, "a", 25.0), row(2, "c", 0.0, status="failed"), row(2, "b", 15.0)]
    s = same_records(evals, 2)
    assert s["compared_clients"] == ["a", "b"] and s["missing_clients"] == {"c": "no evaluation of either model"}
    assert s["base_perplexity"] == pytest.approx(math.exp(2.5)) and s["final_perplexity"] == pytest.approx(math.exp(2.0))
    assert "not compared: c (no evaluation of either model)" in headline(s)


@pytest.mark.parametrize("statuses, floor, fails", [
    (["ok", "ok", "refused"], 0, False),  # a refusal under the client's own budget is no failure
    (["ok", "ok", "failed"], 0, True),  # default: every selected client
    (["ok", "ok", "failed"], 2, False),  # a lowered floor
    (["ok", "rejected", "failed"], 2, True),  # a rejected update did not train either
    (["refused", "refused"], 0, False),  # everyone out of budget: the run ends normally
    ([], 0, False),  # client-level DP sampled nobody this round
])
def test_the_floor(statuses, floor, fails):
    from fedtune.floor import check_floor
    from fedtune.server.strategy import Outcome

    outcomes = [Outcome(i, f"client-{i}", st, reason="why" * (st != "ok")) for i, st in enumerate(statuses)]
    if fails:
        with pytest.raises(RoundFailed, match="client-2 \\(failed\\): why"):
            check_floor(floor, 1, outcomes)
    else:
        check_floor(floor, 1, outcomes)
