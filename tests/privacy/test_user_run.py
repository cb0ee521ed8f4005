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
from tests.server.test_resume import Grid, _serve
from tests.privacy.test_user_data import people_file, user_config

PERSON = "one person: every record with the same patient at this client"


def _serve_in_process(cfg) -> None:
    """The real ServerApp main, its messages answered by three clients' real ClientApp handlers."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        _serve(cfg, Grid(cfg, {}), 1)
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user-run")
    cfg = user_config(people_file(tmp, people=45), run={"dir": str(tmp / "run")}, data={"max_eval_examples": 4},
                      federation={"clients": 3, "rounds": 2}, train={"local_steps": 2, "batch_size": 4},
                      privacy={"records_per_user": 2, "budget": 24.0})  # room left for personalization
    _serve_in_process(cfg)
    return cfg, tmp / "run"


def test_the_run_names_the_person_everywhere_and_verifies(user_run):
    cfg, run_dir = user_run
    result = run_audit(run_dir, verify=True)
    assert result["problems"] == []
    assert [r["level"] for r in result["rows"]] == ["user"] * 3
    for r in result["rows"]:
        assert r["unit"].startswith(PERSON) and r["rounds_joined"] == 2
        assert "a person also at other clients is protected at each by that client's own ε" in r["unit"]  # stated
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


def test_canary_people_are_planted_as_one_person_with_several_records(tmp_path, tiny_path):
    from fedtune import config
    from fedtune.data import client_examples
    from fedtune.errors import FedtuneError
    from fedtune.model import load_tokenizer
    from fedtune.privacy.empirical import plant, planted_records

    cfg = user_config(people_file(tmp_path), federation={"clients": 2}, privacy={"seed": 0},
                      audit={"canaries": 10, "canary_records": 3, "secrets": 1, "secret_repeats": 2})
    planted = plant(cfg)
    rows = planted_records(planted, 0, centralized=False)
    mine = [c for c in planted["canaries"] if c["client"] == 0 and c["included"]]
    assert mine and len([r for r in rows if r["user"].startswith("canary-")]) == 3 * len(mine)
    train, _ = client_examples(cfg, 0, load_tokenizer(tiny_path), extra_train=rows)
    for c in mine:
        assert train.users.count(f"canary-{c['id']}") == 3  # one person, three records
    assert train.users.count("secret-0") == 2
    with pytest.raises(FedtuneError, match="audit.canary_records = 3 plants canary people with several records"):
        config.load(None, {"audit.canaries": 10, "audit.canary_records": 3})


@pytest.fixture(scope="module")
def canary_people_audits(tmp_path_factory):
    """The tiny Llama at the user unit, 3 clients, 12 patients plus 100 canary people of 3
    records each (half of them planted): 2 rounds of 30 steps without DP give the canary
    people away; the same at ε = 1 for one person must not."""
    from tests.memorization import audit_both_arms

    base = tmp_path_factory.mktemp("canary-people")
    data = people_file(base, people=12)

    def train(folder, dp):
        _serve_in_process(user_config(
            data, run={"dir": str(folder)}, data={"partition": "iid"}, federation={"clients": 3, "rounds": 2},
            train={"local_steps": 30, "batch_size": 8, "learning_rate": 0.03},
            privacy={"dp": dp, "epsilon": 1.0, "records_per_user": 3, "seed": 0},
            audit={"canaries": 100, "canary_words": 3, "canary_records": 3}))
        return folder

    return audit_both_arms(base, train)


@pytest.mark.slow  # about 2 minutes on 2 shared cores
def test_canary_people_without_dp_are_found(canary_people_audits):
    from tests.memorization import assert_found_without_dp

    assert_found_without_dp(canary_people_audits)


@pytest.mark.slow
def test_canary_people_at_epsilon_1_stay_below_the_persons_epsilon(canary_people_audits):
    from tests.memorization import assert_below_epsilon_1

    audit = canary_people_audits["dp-eps1"]
    assert [r["level"] for r in audit["rows"]] == ["user"] * 3 and audit["problems"] == []
    assert all(r["unit"].startswith(PERSON) for r in audit["rows"])
    assert_below_epsilon_1(canary_people_audits)
