"""A deployed client's lifetime budget per data set: every run on the data spends from one
budget, whatever the server names its runs, and `fedtune budget` shows and rechecks it."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import config
from fedtune.cli import main
from fedtune.client import handle_train
from fedtune.deploy.lifetime import lifetime_path
from fedtune.privacy import Ledger, epsilon_independent
from fedtune.runfolder import ledger_path
from fedtune.server import initial_adapter
from tests.conftest import tiny_config
from tests.deployment import _toml


@pytest.fixture
def client(tmp_path):
    """A client's data file (client-1's records) and its client.toml, budget ε = 8."""
    from fedtune.data import export_clients

    export_clients(tiny_config(), tmp_path / "data")
    toml = tmp_path / "client.toml"
    toml.write_text(_toml({"client": {"name": "clinic-a", "data": "data/client-1.jsonl", "budget": 8.0,
                                      "state": "state"}}))
    return toml


def _node(tmp_path, **changes) -> dict:
    from fedtune.deploy.settings import load_client, node_config

    return {**node_config(load_client(tmp_path / "client.toml")), **changes}


def _train(run_name, node, initial, server_round, epsilon=8.0):
    cfg = tiny_config(run={"name": run_name}, privacy={"epsilon": epsilon})
    ctx = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config=config.to_flat(cfg))
    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    return handle_train(msg, ctx)


def _budget(capsys, toml, *flags) -> tuple[int, dict]:
    code = main(["budget", str(toml), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_a_second_run_on_the_same_data_is_refused_and_fedtune_budget_composes_both(
        tmp_path, task_identity, tiny_path, client, capsys):
    initial = initial_adapter(tiny_config(), tiny_path)
    node = _node(tmp_path)
    first = [_train("run-a", node, initial, r) for r in (1, 2)]
    assert [m.content["metrics"]["refused"] for m in first] == [0, 0]
    second = _train("run-b", node, initial, 1)  # a new run name: its own per-run ledger, the same data set
    assert second.content["metrics"]["refused"] == 1 and "arrays" not in second.content.array_records
    assert "lifetime budget of data set 'clinic-a'" in second.content["client"]["reason"]
    state = tmp_path / "state"
    histories = {run: Ledger(ledger_path(state / "runs" / run, "clinic-a")).history() for run in ("run-a", "run-b")}
    assert len(histories["run-a"]) == 2 and histories["run-b"] == []  # refused before training
    code, report = _budget(capsys, client, "--verify")
    assert code == 0 and report["problems"] == []
    composed = epsilon_independent(histories["run-a"] + histories["run-b"], 1e-5)
    assert report["lifetime_epsilon"] == pytest.approx(composed, rel=0.01) and report["lifetime_epsilon"] <= 8.0
    assert [r["run"] for r in report["runs"]] == ["run-a"] and report["refusals"][0]["run"] == "run-b"
    assert report["remaining"] == pytest.approx(8.0 - report["lifetime_epsilon"])


def test_a_new_data_set_name_for_the_same_file_resets_nothing(tmp_path, task_identity, tiny_path, client):
    initial = initial_adapter(tiny_config(), tiny_path)
    assert _train("run-a", _node(tmp_path), initial, 1).content["metrics"]["refused"] == 0
    renamed = _train("run-b", _node(tmp_path, dataset="fresh-start"), initial, 1)
    assert renamed.has_error() and "is already data set 'clinic-a'" in renamed.error.reason
    assert not lifetime_path(tmp_path / "state", "fresh-start").exists()
    assert Ledger(ledger_path(tmp_path / "state" / "runs" / "run-b", "clinic-a")).entries() == []  # nothing trained


def test_a_changed_file_keeps_its_spend_and_the_change_is_recorded(tmp_path, task_identity, tiny_path, client, capsys):
    initial = initial_adapter(tiny_config(), tiny_path)
    node = _node(tmp_path)
    assert _train("run-a", node, initial, 1, epsilon=4.0).content["metrics"]["refused"] == 0
    data = tmp_path / "data" / "client-1.jsonl"
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])  # one record more
    assert _train("run-b", node, initial, 1, epsilon=4.0).content["metrics"]["refused"] == 0
    _, report = _budget(capsys, client)
    assert len(report["files"]) == 2 and [r["run"] for r in report["runs"]] == ["run-a", "run-b"]
    spends = Ledger(lifetime_path(tmp_path / "state", "clinic-a")).spends()
    assert report["lifetime_epsilon"] == pytest.approx(spends[-1]["epsilon"])
    assert report["lifetime_epsilon"] > max(s["run_epsilon"] for s in spends)  # both runs count


def test_an_edited_lifetime_ledger_stops_training_and_fedtune_budget(tmp_path, task_identity, tiny_path, client, capsys):
    initial = initial_adapter(tiny_config(), tiny_path)
    node = _node(tmp_path)
    _train("run-a", node, initial, 1)
    path = lifetime_path(tmp_path / "state", "clinic-a")
    path.write_text(path.read_text().replace('"type": "spend"', '"type": "spent"'))  # hide the spend
    reply = _train("run-b", node, initial, 1)
    assert reply.has_error() and "lifetime.jsonl:2" in reply.error.reason
    assert main(["budget", str(client)]) == 2
    assert "lifetime.jsonl:2" in capsys.readouterr().err


def test_verify_recomputes_a_recorded_epsilon(tmp_path, task_identity, tiny_path, client, capsys):
    """A lifetime ε written lower than its σ, q and steps give (and re-hashed) fails --verify."""
    from fedtune.privacy.ledger import entry_hash

    _train("run-a", _node(tmp_path), initial_adapter(tiny_config(), tiny_path), 1)
    path = lifetime_path(tmp_path / "state", "clinic-a")
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    entries[-1]["epsilon"] /= 2
    entries[-1]["hash"] = entry_hash(entries[-1])
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    code, report = _budget(capsys, client, "--verify")
    assert code == 1 and "recorded lifetime ε" in report["problems"][0] and "lifetime.jsonl:2" in report["problems"][0]


def test_client_start_refuses_the_same_file_under_a_new_data_set_name(tmp_path, client):
    """Bad input: one line naming the file and the fix, exit 2, before any SuperNode starts."""
    import subprocess
    import sys

    from fedtune.deploy.lifetime import open_lifetime
    from fedtune.deploy.settings import load_client
    from tests.conftest import ROOT

    s = load_client(client)
    open_lifetime(s.state, "clinic-a", s.data, s.budget, s.policy)  # registered by an earlier start
    client.write_text(client.read_text().replace('name = "clinic-a"', 'name = "clinic-a"\ndataset = "new-name"'))
    res = subprocess.run([sys.executable, "-m", "fedtune.cli", "client", "start", str(client), "--insecure"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "is already data set 'clinic-a'" in res.stderr and 'client.dataset = "clinic-a"' in res.stderr
    assert not lifetime_path(s.state, "new-name").exists()
