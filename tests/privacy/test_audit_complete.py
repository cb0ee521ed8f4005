"""An audit that misses nothing: the server's hash-chained receipts of every update it
received, checked against the clients' ledgers. Written as the attacker: a client that
sends a metric named ``round``, a reply stripped of its ledger head, a ledger whose last
spend line was deleted, a deleted ledger. One real run (real ServerApp main, real
ClientApp handlers, tiny Llama) over the in-memory grid of tests/server/test_resume.py."""

from __future__ import annotations

import json
import shutil

import pytest

from fedtune.cli import main as cli_main
from fedtune.privacy.audit import run_audit
from fedtune.receipts import receipts_path
from fedtune.runfolder import ledger_path, read_jsonl
from tests.server.test_resume import Grid, _cfg, _serve

LIAR, HEADLESS, HONEST = "client-0", "client-1", "client-2"


class TamperingGrid(Grid):
    """client-0 reports a metric ``round`` (and ``status``); client-1's round-2 reply loses its ledger head."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if "client" not in reply.content.config_records or "metrics" not in reply.content.metric_records:
                continue
            name, metrics = reply.content["client"].get("name"), reply.content["metrics"]
            if name == LIAR:
                metrics["round"], metrics["status"] = 99, 7
            if name == HEADLESS and "ledger-head" in reply.content["client"] and metrics.get("refused") == 0:
                if int(messages_round(messages)) == 2:
                    del reply.content["client"]["ledger-head"]
        return replies


def messages_round(messages) -> int:
    return int(next(iter(messages)).content["config"]["server-round"])


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, tiny_path):
    from flwr.supercore.task_identity import TaskIdentity

    run_dir = tmp_path_factory.mktemp("tampered")
    cfg = _cfg(run_dir).replace(federation={"rounds": 2})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        _serve(cfg, TamperingGrid(cfg, {}), 1)
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    return run_dir


@pytest.fixture
def copy(tampered, tmp_path):
    return shutil.copytree(tampered, tmp_path / "run")


def _problems(run_dir, needle: str) -> list[str]:
    return [p for p in run_audit(run_dir, verify=True)["problems"] if needle in p]


def test_a_client_metric_named_round_does_not_move_the_servers_row(tampered):
    rows = [r for r in read_jsonl(tampered / "metrics.jsonl") if r.get("client") == LIAR and r["phase"] == "train"]
    assert [r["round"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    assert all(r["metric_collisions"] == ["round", "status"] for r in rows)
    evals = [r for r in read_jsonl(tampered / "metrics.jsonl") if r.get("client") == LIAR and r["phase"] == "evaluate"]
    assert evals and all(r["round"] != 99 for r in evals)


def test_verify_names_exactly_the_tampered_clients_and_rounds(tampered):
    problems = run_audit(tampered, verify=True)["problems"]
    assert len(problems) == 3, problems
    assert [p for p in problems if f"{LIAR} round 1" in p and "named like server fields" in p]
    assert [p for p in problems if f"{LIAR} round 2" in p and "named like server fields" in p]
    assert [p for p in problems if f"{HEADLESS} round 2" in p and "without a ledger head" in p]


def test_the_audit_lists_what_clients_revealed_in_the_clear(tampered):
    """tiny.toml sets privacy.reveal_losses: the per-client losses are listed, as data-dependent."""
    revealed = {(r["phase"], r["metric"]): r for r in run_audit(tampered)["revealed"]}
    assert revealed[("train", "train-loss")]["clients"] == ["client-0", "client-1", "client-2"]
    assert not revealed[("train", "train-loss")]["data_independent"]
    assert not revealed[("evaluate", "eval-loss")]["data_independent"] and revealed[("train", "refused")]["data_independent"]
    assert ("train", "round") not in revealed  # a server field, whoever sent it
    assert "## Revealed in the clear" in (tampered / "audit.md").read_text()


def test_a_ledger_with_its_last_spend_deleted_fails_naming_client_and_round(copy, capsys):
    path = ledger_path(copy, HONEST)
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "spend" and json.loads(lines[-1])["round"] == 2
    path.write_text("".join(lines[:-1]))  # still a valid chain: only the receipts can tell
    found = _problems(copy, f"{HONEST} round 2")
    assert len(found) == 1 and "no spend with its head" in found[0]
    assert cli_main(["audit", str(copy), "--verify"]) == 1
    assert f"{HONEST} round 2" in capsys.readouterr().out


def test_a_missing_ledger_fails_naming_client_and_round(copy):
    ledger_path(copy, HONEST).unlink()
    assert len(_problems(copy, "ledger is missing")) == 2
    assert _problems(copy, f"{HONEST} round 1") and _problems(copy, f"{HONEST} round 2")


def test_deleted_or_edited_receipts_fail(copy):
    path = receipts_path(copy)
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted((e["round"], e["client"]) for e in entries) == [(r, f"client-{i}") for r in (1, 2) for i in range(3)]
    text = path.read_text()
    path.write_text(text.replace(f'"client": "{LIAR}"', '"client": "client-x"', 1))
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="receipts.jsonl:1"):
        run_audit(copy, verify=True)
    path.unlink()
    assert _problems(copy, "receipts.jsonl: missing")
