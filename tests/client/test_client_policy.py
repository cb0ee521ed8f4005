"""A deployed client's own privacy policy (client.toml [policy]) against a server that asks
for less: the run is refused at its first message, before anything is planned or spent,
and the refusal reaches the server's log, the client's ledger and the audit."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import config
from fedtune.client import handle_train
from fedtune.deploy.policy import Policy
from fedtune.privacy import Ledger
from fedtune.privacy.audit import _refusals
from fedtune.runfolder import ledger_path
from fedtune.server import initial_adapter
from fedtune.server.strategy import AdapterFedAvg
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from fedtune.data import export_clients

    out = tmp_path_factory.mktemp("data")
    export_clients(tiny_config(), out)
    return out / "client-1.jsonl"


def _node(tmp_path, data_file, **policy) -> dict:
    return {"fedtune-client": "clinic-a", "data-file": str(data_file), "budget": 8.0,
            "state-dir": str(tmp_path / "state"), "model-cache": "", "allow-seeded": False,
            **Policy(**policy).check("test").to_node_config()}


def _train(cfg, node, initial, server_round=1):
    ctx = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config=config.to_flat(cfg))
    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    return handle_train(msg, ctx)


def _server_sees(reply, monkeypatch) -> tuple[list[str], list[dict]]:
    """What the real server does with the reply: its log lines and the audit's refusals."""
    import fedtune.server.strategy as strategy_mod

    lines = []
    monkeypatch.setattr(strategy_mod, "log", lambda level, fmt, *args: lines.append(fmt % args))
    strategy = AdapterFedAvg(num_clients=1, clients_per_round=1, template={})
    assert strategy.screen(1, [reply]) == []  # nothing to aggregate
    rows = [{"round": 1, "phase": "train", "client": o.client, "node": o.node, "status": o.status,
             "reason": o.reason, **o.metrics} for o in strategy.outcomes]  # as fedtune.server writes them
    return lines, _refusals(rows, {})


ASKS = {  # what the server's run config asks for, the policy the client holds, what the refusal names
    "no DP": ({"privacy": {"dp": False}}, {}, "privacy.dp = false"),
    "delta 0.5": ({"privacy": {"delta": 0.5}}, {}, "privacy.delta = 0.5"),
    "untrusted PRV": ({"privacy": {"accountant": "prv"}}, {}, "accountant = 'prv'"),
    "PRV at a large delta": ({"privacy": {"accountant": "prv", "delta": 0.9}}, {"accountants": ["rdp", "prv"]},
                             "privacy.delta = 0.9"),
    "no secure aggregation": ({}, {"secagg": True}, "outside secure aggregation"),
    "no distributed DP": ({}, {"secagg": True, "client_dp": True}, "outside secure aggregation"),
}


@pytest.mark.parametrize("case", list(ASKS))
def test_a_run_asking_for_less_than_the_policy_is_refused_before_anything_is_spent(
        tmp_path, task_identity, tiny_path, data_file, monkeypatch, case):
    change, policy, named = ASKS[case]
    cfg = tiny_config(**change)
    node = _node(tmp_path, data_file, **policy)
    reply = _train(cfg, node, initial_adapter(cfg, tiny_path))
    assert not reply.has_error()
    assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content.array_records
    reason = reply.content["client"]["reason"]
    assert reason.startswith("policy: ") and named in reason
    ledger = Ledger(ledger_path(tmp_path / "state" / "runs" / cfg.run.name, "clinic-a"))
    assert [(e["type"], e["reason"]) for e in ledger.entries()] == [("refusal", reason)]  # no plan, no spend
    lines, refusals = _server_sees(reply, monkeypatch)
    assert f"fedtune: client clinic-a refused round 1: {reason}" in lines
    assert refusals == [{"client": "clinic-a", "round": 1, "reason": reason, "recorded_by": ["server"]}]
    if case == "no DP":  # the whole audit: the server's rows and the operator's handed-over ledger
        _audit_of_a_refused_run(tmp_path, cfg, ledger, reason)


def _audit_of_a_refused_run(tmp_path, cfg, ledger, reason):
    import shutil

    from fedtune.privacy.audit import run_audit
    from fedtune.runfolder import append_jsonl, write_json

    run_dir = tmp_path / "server-run"
    write_json(run_dir / "run.json", {"status": "completed"})
    append_jsonl(run_dir / "metrics.jsonl", {"round": 1, "phase": "train", "client": "clinic-a", "node": 5,
                                             "status": "refused", "reason": reason, "refused": 1})
    (run_dir / "clients" / "clinic-a").mkdir(parents=True)
    shutil.copy(ledger.path, run_dir / "clients" / "clinic-a" / "ledger.jsonl")
    result = run_audit(run_dir, verify=True)
    assert result["problems"] == []
    assert [(r["client"], r["epsilon"], r["refusals"]) for r in result["rows"]] == [("clinic-a", 0.0, 1)]
    assert result["refusals"] == [{"client": "clinic-a", "round": 1, "reason": reason,
                                   "recorded_by": ["server", "ledger"]}]


def test_the_same_run_meeting_the_policy_trains(tmp_path, task_identity, tiny_path, data_file):
    """The refusals above are the policy's doing: the default run passes it and trains."""
    cfg = tiny_config()
    reply = _train(cfg, _node(tmp_path, data_file), initial_adapter(cfg, tiny_path))
    assert not reply.has_error() and reply.content["metrics"]["refused"] == 0 and "arrays" in reply.content.array_records


def test_a_model_the_operator_did_not_accept_is_refused_before_it_is_loaded(
        tmp_path, task_identity, tiny_path, data_file, monkeypatch):
    """A server naming a folder on the client's machine (here the tiny model's, which exists)
    gets a one-line refusal and nothing is loaded from it; listed in policy.models, it trains."""
    import fedtune.client.setup as client_mod
    import fedtune.model as model_mod

    cfg = tiny_config(model={"name": tiny_path})
    loaded = []
    real = model_mod.load_base_model
    monkeypatch.setattr(model_mod, "load_base_model", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    monkeypatch.setattr(client_mod, "_MODELS", {})  # a fresh worker
    reply = _train(cfg, _node(tmp_path, data_file), initial_adapter(cfg, tiny_path))
    assert reply.has_error() and loaded == []
    assert "clinic-a refused the run: policy: the run's model.name" in reply.error.reason
    assert "policy.models" in reply.error.reason and "\n" not in reply.error.reason
    reply = _train(cfg, _node(tmp_path, data_file, models=[tiny_path]), initial_adapter(cfg, tiny_path))
    assert not reply.has_error() and reply.content["metrics"]["refused"] == 0 and loaded == [tiny_path]


def test_a_weaker_client_level_epsilon_is_refused_at_the_first_secure_message(tmp_path, data_file):
    """Under SecAgg+ the first message is advertise: the client derives its distributed-DP
    noise from the run's plan only once the plan meets its policy."""
    from fedtune.client.secure import check_encoding as _check_encoding
    from fedtune.errors import FedtuneError

    cfg = tiny_config(federation={"clients": 3}, secagg={"enabled": True},
                      client_dp={"enabled": True, "epsilon": 1e6, "sample_rate": 1.0})
    node = _node(tmp_path, data_file, secagg=True, client_dp=True, max_client_epsilon=10.0)
    ctx = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config=config.to_flat(cfg))
    with pytest.raises(FedtuneError, match="refused the round: policy: .*client-level ε .*1e\\+06.* 10"):
        _check_encoding(ctx, encoding=None)


@pytest.mark.parametrize("table, fix", [
    ({"accountants": ["moments"]}, "policy.accountants must list"),
    ({"accountants": []}, "policy.accountants must list"),
    ({"max_delta": 0.0}, "policy.max_delta must be in"),
    ({"client_dp": True}, "needs policy.secagg = true"),
    ({"max_client_epsilon": 4.0}, "applies under policy.client_dp"),
    ({"dp": "yes"}, "policy.dp must be a bool"),
    ({"strict": True}, "unknown key policy.strict"),
    ({"models": "smollm2"}, "policy.models must be a list"),
    ({"secagg": True, "secagg_colluders": -1}, "policy.secagg_colluders must be an integer >= 0"),
    ({"secagg_colluders": 2}, "policy.secagg_colluders applies under policy.secagg = true"),
])
def test_a_bad_policy_is_one_line_naming_the_file_and_exit_2(tmp_path, table, fix):
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.deployment import _toml

    path = tmp_path / "client.toml"
    path.write_text(_toml({"client": {"name": "clinic-a", "data": "data.jsonl"}, "policy": table}))
    res = subprocess.run([sys.executable, "-m", "fedtune.cli", "client", "start", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert str(path) in line and fix in line


def test_a_worker_serving_run_after_run_holds_one_data_set(tmp_path, task_identity, tiny_path, data_file, monkeypatch):
    """A long-lived deployed worker: runs that ask again and again (other seeds) do not pile
    up tokenized copies of the client's data; one model, one data set."""
    import fedtune.client.setup as client_mod

    monkeypatch.setattr(client_mod, "_DATA", {})
    for seed in (1, 2, 3):
        cfg = tiny_config(run={"seed": seed, "name": f"run-{seed}"})
        node = {**_node(tmp_path, data_file), "budget": 100.0}  # a lifetime budget for three runs
        reply = _train(cfg, node, initial_adapter(cfg, tiny_path))
        assert not reply.has_error() and reply.content["metrics"]["refused"] == 0, reply.content["client"]
    assert len(client_mod._DATA) == 1 and len(client_mod._MODELS) == 1
