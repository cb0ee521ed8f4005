"""User-level DP-SGD (privacy.unit = "user"): per-person clipping from Opacus' per-sample
gradients, bounded influence of one person on the released update, accounting over people,
the budget and the ledger, through the real train_round and ClientApp handler."""

from __future__ import annotations

import copy

import pytest
import torch

from fedtune.data import client_data, collate, tokenize
from fedtune.privacy import Ledger, epsilon, epsilon_independent, make_plan
from fedtune.privacy.user_level import PersonSampler
from fedtune.runfolder import ledger_path
from fedtune.train import DPParams, forward_logits, per_sequence_loss, train_round
from tests.client.test_client import _context, _message, initial  # noqa: F401  (fixture)
from tests.privacy.test_user_data import people_file, user_config

CPU = torch.device("cpu")


def _data(cfg, tok, users: list[str]):
    data = tokenize(client_data(cfg, 0)[0].select(range(len(users))), tok, cfg.model.max_length, users=users)
    assert len(data) == len(users)
    return data


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone()


def _sgd_step(model, data, tok, monkeypatch, *, clip, records_per_user=100, expected=None, chunk=0):
    """One noiseless user-level step of the real train_round with every person sampled (q = 1),
    SGD at lr 1 in place of AdamW, so the update IS the released (clipped, summed, scaled) gradient."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=1.0))
    m = copy.deepcopy(model)
    before = _flat(m)
    people = len(set(data.users)) if data.users else len(data)
    dp = DPParams(0.0, clip, 1.0, expected or people, records_per_user if data.users else 0)
    train_round(m, data, steps=1, batch_size=people, learning_rate=1.0, weight_decay=0.0, dp=dp, device=CPU,
                amp_dtype=None, pad_id=tok.pad_token_id, sampling_generator=torch.Generator().manual_seed(0),
                noise_generator=torch.Generator().manual_seed(1), physical_batch_size=chunk)
    return before - _flat(m)


def _person_reference(model, data, tok) -> torch.Tensor:
    """Each person's gradient from its own backward pass: the mean loss of its records, alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for person in dict.fromkeys(data.users):
        model.zero_grad(set_to_none=True)
        mine = [i for i, u in enumerate(data.users) if u == person]
        batch = collate(data, mine, tok.pad_token_id)
        per_sequence_loss(forward_logits(model, batch, CPU, None), batch["labels"]).mean().backward()
        rows.append(torch.cat([p.grad.flatten() for p in params]).clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [0, 3])
def test_a_persons_contribution_is_its_clipped_mean_gradient(tiny_lora, monkeypatch, chunk):
    cfg, tok, model = tiny_lora
    users = ["ann", "ann", "ann", "bob", "bob", "cat", "dan", "dan"]
    data = _data(cfg, tok, users)
    ref = _person_reference(model, data, tok)
    norms = ref.norm(dim=1)
    clip = float(norms.median())
    assert (norms > clip * 1.01).sum() >= 1 and (norms < clip).sum() >= 1, "clipping must be active for some"
    expected = (ref * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / 4
    update = _sgd_step(model, data, tok, monkeypatch, clip=clip, chunk=chunk)
    assert float((update - expected).norm() / expected.norm()) < 1e-4
    record_level = _sgd_step(model, tokenize_without_users(data), tok, monkeypatch, clip=clip, expected=4)
    assert float((record_level - expected).norm() / expected.norm()) > 0.05  # the control: another mechanism


def tokenize_without_users(data):
    return type(data)(data.ids, data.starts, None)


def test_a_person_with_50_records_moves_the_release_no_more_than_one_with_1(tiny_lora, monkeypatch):
    cfg, tok, model = tiny_lora
    records = client_data(cfg.replace(federation={"clients": 1}), 0)[0]
    base_users = ["a", "b", "c", "d"]
    data = {}
    for name, extra in (("none", 0), ("one", 1), ("fifty", 50)):
        users = base_users + ["x"] * extra
        data[name] = tokenize(records.select(range(len(users))), tok, cfg.model.max_length, users=users)
    clip = 1e-3  # every person's gradient is clipped: the bound is reached
    moved = {}
    for unit in ("user", "record"):
        updates = {}
        for name, d in data.items():
            d = d if unit == "user" else tokenize_without_users(d)
            updates[name] = _sgd_step(model, d, tok, monkeypatch, clip=clip, records_per_user=50, expected=5)
        moved[unit] = {k: float((updates[k] - updates["none"]).norm()) for k in ("one", "fifty")}
    bound = clip / 5  # C / expected people
    assert moved["user"]["fifty"] <= bound * (1 + 1e-4) and moved["user"]["one"] <= bound * (1 + 1e-4)
    assert moved["user"]["fifty"] <= moved["user"]["one"] * (1 + 1e-3)
    assert moved["record"]["fifty"] > 5 * bound  # record-level: 50 records move it up to 50·C/B


def test_each_step_samples_people_and_at_most_k_of_their_records():
    users = [f"p{i % 7}" for i in range(40)]  # 7 people, 5-6 records each
    sampler = PersonSampler(users, per_person=2, sample_rate=0.5)
    g = torch.Generator().manual_seed(0)
    steps = list(sampler.steps(200, g))
    seen_subsets = set()
    for groups in steps:
        for rows in groups:
            assert 1 <= len(rows) <= 2 and len({users[i] for i in rows}) == 1  # one person, <= k records
            seen_subsets.add(tuple(rows))
    mean_people = sum(len(s) for s in steps) / len(steps)
    assert 2.8 < mean_people < 4.2  # Poisson over 7 people at q = 0.5
    assert len(seen_subsets) > 30  # a fresh random choice of records each step


def test_the_ledger_accounts_over_people_and_matches_dp_accounting(tmp_path, task_identity, initial):  # noqa: F811
    from fedtune.client import handle_train
    from fedtune.client.setup import setup

    cfg = user_config(people_file(tmp_path), run={"dir": str(tmp_path)}, federation={"clients": 1, "rounds": 2},
                      privacy={"records_per_user": 2})
    s = setup(_context(cfg))
    people = len(set(s.train.users))
    assert people < len(s.train)  # people, not records
    reply = handle_train(_message(initial, 1), _context(cfg))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    plan = ledger.plan()
    assert plan["unit"].startswith("one person: every record with the same patient at this client")
    assert (plan["dataset_size"], plan["records_per_user"]) == (people, 2)
    assert plan["sample_rate"] == pytest.approx(cfg.train.batch_size / people)
    spent = ledger.spends()[-1]["epsilon"]
    assert spent == pytest.approx(epsilon_independent([(plan["noise_multiplier"], cfg.train.batch_size / people,
                                                        plan["steps_per_round"])], plan["delta"]), rel=1e-3)
    record_plan = make_plan(cfg.replace(privacy={"unit": "record"}), len(s.train))
    assert record_plan.sample_rate < plan["sample_rate"]  # fewer people than records: a larger q


def test_budget_refuses_the_round_that_would_exceed_it_under_the_user_unit(tmp_path, task_identity, initial):  # noqa: F811
    from fedtune.client import handle_train
    from fedtune.client.setup import setup

    cfg = user_config(people_file(tmp_path), run={"dir": str(tmp_path)}, federation={"clients": 1, "rounds": 3})
    plan = make_plan(cfg, len(set(setup(_context(cfg)).train.users)))
    one, two = (epsilon([plan.round_history] * r, plan.delta) for r in (1, 2))
    cfg = cfg.replace(privacy={"budget": (one + two) / 2})
    replies = [handle_train(_message(initial, r), _context(cfg)) for r in (1, 2, 3)]
    assert [m.content["metrics"]["refused"] for m in replies] == [0, 1, 1]
    entries = Ledger(ledger_path(tmp_path, "client-0")).entries()
    assert [e["type"] for e in entries] == ["plan", "spend", "refusal", "refusal"]
    assert entries[1]["epsilon"] <= cfg.budget


def test_a_run_config_that_changes_the_unit_mid_run_is_refused(tmp_path, task_identity, initial):  # noqa: F811
    from fedtune.client import handle_train

    cfg = user_config(people_file(tmp_path), run={"dir": str(tmp_path)}, federation={"clients": 1, "rounds": 3})
    assert not handle_train(_message(initial, 1), _context(cfg)).has_error()
    weaker = cfg.replace(privacy={"unit": "record"})
    reply = handle_train(_message(initial, 2), _context(weaker))
    assert reply.has_error() and "planned for privacy.unit = 'user'" in reply.error.reason  # the server's log
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    assert len(ledger.spends()) == 1 and ledger.entries()[-1]["type"] == "refusal"  # and the ledger (the audit)
    assert "planned for privacy.unit = 'user'" in ledger.entries()[-1]["reason"]


def test_a_deployed_clients_unit_is_its_operators(tmp_path):
    """The server's run config cannot choose the unit: the operator's person column forces the
    user unit, and without one a run asking for the user unit is refused."""
    from fedtune.deploy.node import LocalNode, local_config
    from fedtune.errors import FedtuneError
    from tests.conftest import tiny_config

    node = LocalNode("clinic-a", "d.jsonl", 3.0, str(tmp_path), "", False, user_field="patient")
    mine = local_config(tiny_config(privacy={"unit": "record"}), node)  # a server asking for records
    assert (mine.privacy.unit, mine.data.user_field) == ("user", "patient")
    other = local_config(tiny_config(privacy={"unit": "user"}, data={"user_field": "ward"}), node)
    assert other.data.user_field == "patient"  # not the server's grouping
    plain = LocalNode("clinic-b", "d.jsonl", 3.0, str(tmp_path), "", False)
    assert local_config(tiny_config(), plain).privacy.unit == "record"
    with pytest.raises(FedtuneError, match=r'clinic-b refuses privacy.unit = "user": its operator chose no person column'):
        local_config(tiny_config(privacy={"unit": "user"}, data={"user_field": "ward"}), plain)


def test_a_lifetime_budget_spent_per_record_is_not_reused_for_people(tmp_path, task_identity, tiny_path):
    """A deployed client's lifetime ε composes rounds of one unit. Its operator trains run-a
    per record, then sets client.user_field: a new run would count record-level rounds as a
    bound on a person. Refused, in the reply (the server's log) and the lifetime ledger."""
    from fedtune.deploy.lifetime import lifetime_path
    from fedtune.deploy.settings import load_client, node_config
    from fedtune.server import initial_adapter
    from tests.conftest import tiny_config
    from tests.deployment import _toml
    from tests.deploy.test_lifetime import _train

    people_file(tmp_path, name="visits.jsonl")
    toml = tmp_path / "client.toml"

    def node(**extra):
        toml.write_text(_toml({"client": {"name": "clinic-a", "data": "visits.jsonl", "budget": 100.0,
                                          "state": "state", **extra}}))
        return node_config(load_client(toml))

    adapter = initial_adapter(tiny_config(), tiny_path)
    for run in ("run-a", "run-b"):  # the control: a second record-level run on the data set trains
        assert _train(run, node(), adapter, 1, epsilon=2.0).content["metrics"]["refused"] == 0
    reply = _train("run-c", node(user_field="patient"), adapter, 1, epsilon=2.0)
    assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content.array_records
    reason = "was spent at privacy unit 'record' and this round is at 'user' (client.user_field changed)"
    assert reason in reply.content["client"]["reason"]
    lifetime = Ledger(lifetime_path(tmp_path / "state", "clinic-a"))
    assert [e["unit"] for e in lifetime.spends()] == ["record", "record"]
    assert lifetime.entries()[-1]["type"] == "refusal" and reason in lifetime.entries()[-1]["reason"]
