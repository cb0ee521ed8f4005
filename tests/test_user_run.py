"""A tiny federated run at the user unit through the real ServerApp main and ClientApp
handlers (in process): the unit is named in the ledgers, the audit and summary.md,
`--verify` recomputes it, personalization trains on people, and a forged plan is caught."""

from __future__ import annotations

import json

import pytest

from fedtune.privacy import Ledger
from fedtune.privacy.audit import run_audit
from fedtune.privacy.ledger import entry_hash
from fedtune.runfolder import ledger_path
from tests.test_resume import Grid, _serve
from tests.test_user_data import people_file, user_config

PERSON = "one person: every record with the same patient at this client"


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    tmp = tmp_path_factory.mktemp("user-run")
    cfg = user_config(people_file(tmp, people=45), run={"dir": str(tmp / "run")}, data={"max_eval_examples": 4},
                      federation={"clients": 3, "rounds": 2}, train={"local_steps": 2, "batch_size": 4},
                      privacy={"records_per_user": 2, "budget": 24.0})  # room left for personalization
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        _serve(cfg, Grid(cfg, {}), 1)
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    return cfg, tmp / "run"


def test_the_run_names_the_person_everywhere_and_verifies(user_run):
    cfg, run_dir = user_run
    result = run_audit(run_dir, verify=True)
    assert result["problems"] == []
    assert [r["level"] for r in result["rows"]] == ["user"] * 3
    for r in result["rows"]:
        assert r["unit"].startswith(PERSON) and r["rounds_joined"] == 2
        plan = Ledger(r["ledger"]).plan()
        assert plan["sample_rate"] == pytest.approx(4 / plan["dataset_size"])  # q over the client's people
    audit_md = (run_dir / "audit.md").read_text()
    assert "| one person |" in audit_md and PERSON in audit_md
    assert PERSON in (run_dir / "summary.md").read_text()


def test_a_forged_user_plan_fails_verification(user_run, tmp_path):
    """The attacker rewrites client-0's plan consistently (hashes recomputed): no per-person bound."""
    import shutil

    _, run_dir = user_run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    path = ledger_path(copy, "client-0")
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[0]["records_per_user"] = 0
    entries[0]["unit"] = "one training record"
    prev = "0" * 64
    for e in entries:
        e["prev_hash"] = prev
        e["hash"] = prev = entry_hash(e)
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    problems = run_audit(copy, verify=True)["problems"]
    assert any("clients/client-0/ledger.jsonl:1: the plan is for the user unit but names its unit" in p for p in problems)
    assert any("records_per_user = 0" in p for p in problems)


def test_personalization_samples_people_and_charges_the_same_ledger(user_run, tiny_path, monkeypatch):
    from fedtune.personalize import personalize_client
    from fedtune.privacy import user_level
    from fedtune.server import initial_adapter

    cfg, run_dir = user_run
    cfg = cfg.replace(personalize={"method": "finetune", "steps": 2})
    made = []
    real = user_level.person_sampler
    monkeypatch.setattr(user_level, "person_sampler", lambda *a: made.append(a[1:]) or real(*a))
    before = Ledger(ledger_path(run_dir, "client-1")).spends()
    row = personalize_client(cfg, 1, initial_adapter(cfg, tiny_path))
    assert row["status"] == "ok"
    plan = Ledger(ledger_path(run_dir, "client-1")).plan()
    assert made and all(m == (2, plan["sample_rate"]) for m in made)  # local-only and personalized: people
    spends = Ledger(ledger_path(run_dir, "client-1")).spends()
    assert len(spends) == len(before) + 1 and spends[-1]["round"] == "personalize"
