"""Resuming a run after its server stopped: the run folder's bookkeeping (completed rounds,
metrics of a cut-short round, what may not be resumed) and whole runs through the real
ServerApp main and ClientApp handlers over an in-memory grid that can crash the server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from fedtune import config
from fedtune.client import handle_evaluate, handle_train
from fedtune.errors import FedtuneError
from fedtune.privacy import Ledger, epsilon, make_plan
from fedtune.server.resume import SERVER_LOCK, check, completed_round, restart
from fedtune.runfolder import file_lock, ledger_path, read_json, read_jsonl, update_run_file
from tests.conftest import tiny_config

NODES = [11, 22, 33]


# ---- bookkeeping -------------------------------------------------------------------------
def _folder(tmp_path, rows: list[dict], tail: bytes = b"", status: str = "running"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"rounds": 3})
    (tmp_path / "config.toml").write_text(config.dump_toml(cfg))
    update_run_file(tmp_path, status=status)
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)
    for r in rows:
        if r.get("adapter"):
            (tmp_path / "adapters" / r["adapter"]).mkdir(parents=True, exist_ok=True)
            (tmp_path / "adapters" / r["adapter"] / "adapter_model.safetensors").write_bytes(b"x")
    return cfg


ROUNDS_0_1 = [{"round": 0, "phase": "evaluate", "client": "a"}, {"round": 0, "phase": "round", "adapter": ""},
              {"round": 1, "phase": "train", "client": "a"}, {"round": 1, "phase": "evaluate", "client": "a"},
              {"round": 1, "phase": "round", "adapter": "round-001"}]


def test_the_rows_of_a_cut_short_round_move_aside_and_a_torn_line_goes(tmp_path):
    partial = [{"round": 2, "phase": "train", "client": "a"}]
    _folder(tmp_path, ROUNDS_0_1 + partial, tail=b'{"round": 2, "pha')
    assert restart(tmp_path) == (1, "round-001")
    assert read_jsonl(tmp_path / "metrics.jsonl") == ROUNDS_0_1
    assert read_jsonl(tmp_path / "metrics-interrupted.jsonl") == partial
    assert restart(tmp_path) == (1, "round-001")  # again: nothing more to do
    assert read_jsonl(tmp_path / "metrics-interrupted.jsonl") == partial


def test_a_round_without_an_aggregate_keeps_the_adapter_before_it(tmp_path):
    _folder(tmp_path, ROUNDS_0_1 + [{"round": 2, "phase": "round", "adapter": "round-001"}])
    assert completed_round(tmp_path) == (2, "round-001")


def test_nothing_completed_restarts_from_the_base_evaluation(tmp_path):
    _folder(tmp_path, ROUNDS_0_1[:1])
    assert restart(tmp_path) == (-1, "")
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_a_missing_adapter_is_a_damaged_folder(tmp_path):
    _folder(tmp_path, ROUNDS_0_1)
    (tmp_path / "adapters" / "round-001" / "adapter_model.safetensors").unlink()
    with pytest.raises(FedtuneError, match="round-001, which is missing"):
        completed_round(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"model": {"name": "smollm2-135m-instruct"}}, "model.name"),
    ({"lora": {"r": 4}}, "lora.r"),
    ({"privacy": {"epsilon": 3.0}}, "privacy.epsilon"),
    ({"federation": {"rounds": 1}}, "already completed round 2"),
])
def test_a_config_that_breaks_the_run_is_refused(tmp_path, change, match):
    cfg = _folder(tmp_path, ROUNDS_0_1 + [{"round": 2, "phase": "round", "adapter": "round-002"}])
    with pytest.raises(FedtuneError, match=match):
        check(tmp_path, cfg.replace(**change))


def test_harmless_changes_are_allowed(tmp_path):
    cfg = _folder(tmp_path, ROUNDS_0_1)
    assert check(tmp_path, cfg.replace(federation={"rounds": 5, "round_timeout": 60.0}, train={"threads": 1})) == 1


def test_a_completed_run_or_a_folder_that_is_no_run_is_refused(tmp_path):
    cfg = _folder(tmp_path / "done", ROUNDS_0_1, status="completed")
    with pytest.raises(FedtuneError, match="already completed"):
        check(tmp_path / "done", cfg)
    (tmp_path / "other").mkdir()
    with pytest.raises(FedtuneError, match="not a run folder"):
        check(tmp_path / "other", cfg)


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi"])
def test_the_server_optimizer_continues_with_its_moments(tmp_path, kind):
    from fedtune.server.aggregation import ServerOptimizer
    from fedtune.server.resume import load_optimizer, save_optimizer

    rng = np.random.default_rng(0)
    steps = [({"w": rng.normal(size=5).astype(np.float32)}, {"w": rng.normal(size=5).astype(np.float32)})
             for _ in range(3)]
    straight, resumed = ServerOptimizer(kind), ServerOptimizer(kind)
    for old, avg in steps[:2]:
        straight.step(old, avg)
    (tmp_path / "adapters" / "round-002").mkdir(parents=True)
    save_optimizer(tmp_path, "round-002", straight)
    load_optimizer(tmp_path, "round-002", resumed)  # a fresh process after the restart
    assert np.array_equal(straight.step(*steps[2])["w"], resumed.step(*steps[2])["w"])


def test_fedtune_run_resume_refuses_in_one_line(tmp_path, capsys):
    """Exit 2 and one line, before anything is submitted: not a run, a changed config, a run
    whose ServerApp still runs, a completed run."""
    from fedtune.cli import main

    cfg = _folder(tmp_path / "run", ROUNDS_0_1)
    server = tmp_path / "server.toml"
    server.write_text("[server]\nport = 1\n" + config.dump_toml(cfg))
    (tmp_path / "nothing").mkdir()

    def error(folder, *extra) -> str:
        assert main(["run", str(server), "--resume", str(folder), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    assert "is not a run folder" in error(tmp_path / "nothing")
    assert "the config changed: privacy.epsilon" in error(tmp_path / "run", "--set", "privacy.epsilon=3")
    with file_lock(tmp_path / "run" / SERVER_LOCK):
        assert "still running on this server" in error(tmp_path / "run")
    update_run_file(tmp_path / "run", status="completed")
    assert "already completed" in error(tmp_path / "run")


# ---- whole runs ----------------------------------------------------------------------------
class Crash(Exception):
    """The server process dies here."""


class Grid:
    """Routes messages to the real ClientApp handlers of three simulated clients (node
    ``NODES[i]`` is client-i); with ``crash = (phase, round)`` the server dies once the
    clients answered that phase of that round."""

    def __init__(self, cfg, budgets: dict[int, float], crash: tuple[str, int] | None = None):
        self.contexts = {}
        for i, n in enumerate(NODES):
            own = cfg.replace(privacy={"budget": budgets[n]}) if n in budgets else cfg
            self.contexts[n] = Context(run_id=7, node_id=n, node_config={"partition-id": i, "num-partitions": 3},
                                       state=RecordDict(), run_config=config.to_flat(own))
        self.crash = crash

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        replies, phase, round_ = [], "", 0
        for msg in messages:
            node = msg.metadata.dst_node_id
            train = msg.metadata.message_type == MessageType.TRAIN
            phase, round_ = ("train" if train else "evaluate"), int(msg.content["config"]["server-round"])
            reply = (handle_train if train else handle_evaluate)(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        if self.crash == (phase, round_):
            raise Crash(f"killed in {phase} of round {round_}")
        return replies


def _serve(cfg, grid, run_id: int) -> None:
    from fedtune.server import main

    main(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_flat(cfg)))


def _cfg(run_dir, **sections):
    return tiny_config(run={"dir": str(run_dir)}, federation={"rounds": 3}, privacy={"seed": 5, "noise_multiplier": 1.0},
                       data={"max_eval_examples": 2}, train={"local_steps": 1}, **sections)


def _tight_budget(cfg) -> float:
    """Between what 2 and 3 rounds of client-2's plan cost: it pays for 2 rounds, not 3."""
    from fedtune.client.setup import setup

    ctx = Context(run_id=7, node_id=NODES[2], node_config={"partition-id": 2, "num-partitions": 3},
                  state=RecordDict(), run_config=config.to_flat(cfg))
    plan = make_plan(cfg, len(setup(ctx).train))
    return sum(epsilon([plan.round_history] * r, plan.delta) for r in (2, 3)) / 2


def _spends(run_dir, client):
    return [(e["round"], e["epsilon"]) for e in Ledger(ledger_path(run_dir, client)).spends()]


def _adapter(run_dir, label="global"):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapters" / label / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path):
    from flwr.supercore.task_identity import TaskIdentity

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    cfg = _cfg(run_dir)
    budgets = {NODES[2]: _tight_budget(cfg)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as the task_identity fixture
    try:
        _serve(cfg, Grid(cfg, budgets), 1)
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    return run_dir, budgets


@pytest.mark.parametrize("crash", [("train", 2), ("evaluate", 2)])
def test_a_server_killed_in_round_2_resumes_to_the_uninterrupted_result(tmp_path, task_identity, uninterrupted, crash):
    from fedtune.privacy.audit import run_audit

    ref, budgets = uninterrupted
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir)
    with pytest.raises(Crash):
        _serve(cfg, Grid(cfg, budgets, crash=crash), 1)
    assert read_json(run_dir / "run.json")["status"] == "failed" and completed_round(run_dir) == (1, "round-001")
    _serve(cfg, Grid(cfg, budgets), 2)  # the restarted server; the clients never stopped

    run = read_json(run_dir / "run.json")
    assert run["status"] == "completed" and run["flwr_run_ids"] == ["1", "2"] and run["resumed_from_round"] == 1
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows if r["phase"] == "round"] == [0, 1, 2, 3]
    train = [(r["round"], r["client"]) for r in rows if r["phase"] == "train"]
    assert len(train) == len(set(train)) == 9
    # Every client paid once per round it trained, exactly as without the crash; those that
    # trained round 2 before the crash sent that update again for free.
    for i in range(3):
        name = f"client-{i}"
        assert _spends(run_dir, name) == _spends(ref, name)
        assert "resend" in [e["type"] for e in Ledger(ledger_path(run_dir, name)).entries()]
    assert [r for r, _ in _spends(run_dir, "client-2")] == [1, 2]
    # The same seeded run: the same global adapter, bit for bit, and the same evaluation.
    a, b = _adapter(ref), _adapter(run_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ppl = lambda d: [r["perplexity"] for r in read_jsonl(d / "metrics.jsonl") if r["phase"] == "round"]  # noqa: E731
    assert ppl(run_dir) == ppl(ref)
    # The tight client's refusal of round 3 is in the audit, from the server's record and its ledger.
    audit = run_audit(run_dir, verify=True)
    assert audit["problems"] == []
    assert [(r["client"], r["round"], r["recorded_by"]) for r in audit["refusals"]] == [
        ("client-2", 3, ["server", "ledger"])]
    assert "privacy budget" in audit["refusals"][0]["reason"]
    assert "## Refusals" in (run_dir / "audit.md").read_text()
    with pytest.raises(FedtuneError, match="already completed"):  # and a completed run stays so
        _serve(cfg, Grid(cfg, budgets), 3)


def test_a_refusal_the_clients_ledger_does_not_show_fails_the_verification(uninterrupted, tmp_path):
    import shutil

    from fedtune.privacy.audit import run_audit

    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "run")
    path = ledger_path(run_dir, "client-2")
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "refusal"
    path.write_text("".join(lines[:-1]))  # a ledger that hides the refusal
    problems = run_audit(run_dir, verify=True)["problems"]
    assert any("refusing round 3" in p and "no refusal" in p for p in problems)


def test_client_level_spend_of_a_cut_short_round_stays_counted(tmp_path, task_identity, tiny_path):
    """Client-level DP: the server's spend for the round the crash cut short stays in its
    ledger (the noisy model went out for evaluation); the plan is not made again."""
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, client_dp={"enabled": True, "epsilon": 20.0, "budget": 40.0, "clip_norm": 0.5})
    with pytest.raises(Crash):
        _serve(cfg, Grid(cfg, {}, crash=("evaluate", 2)), 1)
    _serve(cfg, Grid(cfg, {}), 2)
    server = Ledger(run_dir / "server" / "ledger.jsonl")
    assert [e["type"] for e in server.entries()].count("plan") == 1
    assert [e["round"] for e in server.spends()] == [1, 2, 2, 3]
    assert server.spends()[-1]["epsilon"] > server.spends()[-2]["epsilon"]
    for i in range(3):  # the clients paid once per round
        assert [r for r, _ in _spends(run_dir, f"client-{i}")] == [1, 2, 3]
