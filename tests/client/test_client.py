"""The ClientApp's logic, driven with real Flower messages (no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import config
from fedtune.client import handle_evaluate, handle_train
from fedtune.errors import FedtuneError
from fedtune.privacy import Ledger, epsilon, epsilon_independent, make_plan
from fedtune.runfolder import ledger_path
from fedtune.server import initial_adapter
from tests.conftest import tiny_config


def _context(cfg, index=0):
    return Context(run_id=7, node_id=100 + index, node_config={"partition-id": index, "num-partitions": cfg.num_clients},
                   state=RecordDict(), run_config=config.to_flat(cfg))


def _message(arrays, server_round, kind=MessageType.TRAIN):
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=100, message_type=kind)


@pytest.fixture
def initial(tiny_path):
    return initial_adapter(tiny_config(), tiny_path)


@pytest.mark.parametrize("k", [1, 2])
def test_a_budget_that_lasts_k_rounds_gives_exactly_k_rounds(tmp_path, task_identity, initial, k):
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"rounds": 4})
    ctx = _context(cfg)
    # The ε after k and k+1 rounds of this client's plan; a budget in between lasts k rounds.
    from fedtune.client.setup import setup

    plan = make_plan(cfg, len(setup(ctx).train))
    eps = [epsilon([plan.round_history] * r, plan.delta) for r in (k, k + 1)]
    cfg = cfg.replace(privacy={"budget": (eps[0] + eps[1]) / 2})
    ctx = _context(cfg)
    replies = [handle_train(_message(initial, r), ctx) for r in range(1, 5)]
    trained = [not m.has_error() and m.content["metrics"]["refused"] == 0 for m in replies]
    assert trained == [True] * k + [False] * (4 - k)
    for m in replies[k:]:
        assert "arrays" not in m.content.array_records  # a refusal sends no update
        assert "budget" in m.content["client"]["reason"]
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    types = [e["type"] for e in ledger.entries()]
    assert types == ["plan"] + ["spend"] * k + ["refusal"] * (4 - k)
    spent = ledger.spends()[-1]["epsilon"]
    assert spent <= cfg.budget
    assert replies[k - 1].content["metrics"]["epsilon"] == pytest.approx(spent)
    # The ledger's ε is what an independent accountant computes from the raw parameters.
    assert spent == pytest.approx(epsilon_independent(ledger.history(), plan.delta), rel=1e-3)


def test_spend_is_on_disk_before_the_reply_and_the_update_changed(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)})
    reply = handle_train(_message(initial, 1), _context(cfg))
    spends = Ledger(ledger_path(tmp_path, "client-0")).spends()
    assert len(spends) == 1 and spends[0]["round"] == 1
    new = reply.content["arrays"].to_numpy_ndarrays()
    assert any(not np.array_equal(a, initial[k].numpy()) for a, k in zip(new, initial))
    assert math.isfinite(reply.content["metrics"]["train-loss"])


def test_a_malformed_global_adapter_is_rejected_without_spending(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)})
    bad = dict(initial)
    key = next(iter(bad))
    bad[key] = bad[key][:1]  # wrong shape
    reply = handle_train(_message(bad, 1), _context(cfg))
    assert reply.has_error() and "shape" in reply.error.reason
    assert Ledger(ledger_path(tmp_path, "client-0")).spends() == []


def test_evaluate_reports_held_out_loss(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)})
    reply = handle_evaluate(_message(initial, 0, MessageType.EVALUATE), _context(cfg, 1))
    m = reply.content["metrics"]
    assert m["eval-tokens"] > 0 and m["perplexity"] == pytest.approx(math.exp(m["eval-loss-sum"] / m["eval-tokens"]))


def test_a_client_with_a_damaged_ledger_will_not_train(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)})
    handle_train(_message(initial, 1), _context(cfg))
    path = ledger_path(tmp_path, "client-0")
    path.write_text(path.read_text().replace('"round": 1', '"round": 9'))
    reply = handle_train(_message(initial, 2), _context(cfg))
    assert reply.has_error() and "ledger.jsonl:2" in reply.error.reason


def test_without_dp_the_ledger_says_so_and_nothing_is_refused(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)}, privacy={"dp": False})
    replies = [handle_train(_message(initial, r), _context(cfg)) for r in (1, 2, 3)]
    assert all(not m.has_error() and m.content["metrics"]["refused"] == 0 for m in replies)
    assert math.isinf(replies[-1].content["metrics"]["epsilon"])
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    assert ledger.plan()["dp"] is False and [s["dp"] for s in ledger.spends()] == [False] * 3


KILLED_AFTER_RECORDING = """
import os, signal, sys
import fedtune.client.reply as reply
from fedtune.client import handle_train
from fedtune import config
from fedtune.server import initial_adapter
from flwr.supercore.task_identity import TaskIdentity
from tests.client.test_client import _context, _message

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
cfg = config.load(sys.argv[1])
reply.ArrayRecord = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies as the update is packed
initial = initial_adapter(cfg, sys.argv[2])
handle_train(_message(initial, 1), _context(cfg))
print("the update left")
"""


def test_killed_between_recording_and_sending_the_spend_counts(tmp_path, task_identity, initial, tiny_path):
    """SIGKILL after the ledger append, before the reply exists: the spend is on disk, and
    the budget check of the next round counts it."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"rounds": 4})
    from fedtune.client.setup import setup

    plan = make_plan(cfg, len(setup(_context(cfg)).train))
    cfg = cfg.replace(privacy={"budget": epsilon([plan.round_history], plan.delta)})  # exactly one round
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(config.dump_toml(cfg))
    res = subprocess.run([sys.executable, "-c", KILLED_AFTER_RECORDING, str(cfg_file), tiny_path],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    assert "the update left" not in res.stdout
    spends = Ledger(ledger_path(tmp_path, "client-0")).spends()
    assert [s["round"] for s in spends] == [1]
    reply = handle_train(_message(initial, 2), _context(cfg))
    assert reply.content["metrics"]["refused"] == 1
    assert reply.content["metrics"]["epsilon"] == pytest.approx(spends[0]["epsilon"])
    assert "budget" in reply.content["client"]["reason"]
    assert os.path.getsize(ledger_path(tmp_path, "client-0")) > 0


def test_a_deployed_client_trains_exactly_as_the_simulated_client_of_its_name(tmp_path, task_identity, initial):
    """With client-1's exported records and a test seed, a deployed client named client-1
    (node config, partition index 0) draws the same batches and noise as simulated client-1:
    the same update, bit for bit, and the same ledger numbers."""
    from fedtune.data import export_clients

    cfg = tiny_config(privacy={"seed": 4})
    export_clients(cfg, tmp_path / "data")
    node = {"fedtune-client": "client-1", "data-file": str(tmp_path / "data" / "client-1.jsonl"), "budget": cfg.budget,
            "state-dir": str(tmp_path / "state"), "model-cache": "", "allow-seeded": True}
    deployed = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config=config.to_flat(cfg))
    simulated = _context(cfg.replace(run={"dir": str(tmp_path / "sim")}), index=1)
    other = _context(cfg.replace(run={"dir": str(tmp_path / "other")}), index=2)
    updates = [handle_train(_message(initial, 1), ctx).content["arrays"].to_numpy_ndarrays()
               for ctx in (deployed, simulated, other)]
    assert all(np.array_equal(a, b) for a, b in zip(updates[0], updates[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(updates[0], updates[2]))  # another client draws otherwise
    ledgers = [Ledger(ledger_path(d, "client-1")) for d in (tmp_path / "state" / "runs" / cfg.run.name, tmp_path / "sim")]
    numbers = [{k: v for k, v in e.items() if k not in ("time", "hash", "prev_hash")} for led in ledgers for e in led.entries()]
    assert numbers[:2] == numbers[2:] and numbers[0]["seeded"] is True


def _arrays(reply) -> dict:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_a_round_asked_again_with_the_same_adapter_is_resent_not_charged(tmp_path, task_identity, initial):
    """A restarted server asks again for a round the client already paid for: the same
    update goes out again, the ledger records a resend, not a second spend, and a budget
    that pays for exactly one round does not refuse it."""
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"rounds": 4})
    from fedtune.client.setup import setup

    plan = make_plan(cfg, len(setup(_context(cfg)).train))
    cfg = cfg.replace(privacy={"budget": epsilon([plan.round_history], plan.delta)})  # exactly one round
    first = handle_train(_message(initial, 1), _context(cfg))
    again = handle_train(_message(initial, 1), _context(cfg))
    assert not again.has_error() and again.content["metrics"]["refused"] == 0
    assert again.content["metrics"]["resent"] == 1 and "resent" not in first.content["metrics"]
    a, b = _arrays(first), _arrays(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the same bytes, not a retrain
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    assert [e["type"] for e in ledger.entries()] == ["plan", "spend", "resend"]
    head = ledger.spends()[0]["hash"]
    assert first.content["client"]["ledger-head"] == again.content["client"]["ledger-head"] == head
    assert again.content["metrics"]["epsilon"] == pytest.approx(ledger.spends()[0]["epsilon"])
    # The next round is a new release: over this budget, refused.
    assert handle_train(_message(initial, 2), _context(cfg)).content["metrics"]["refused"] == 1


def test_a_different_adapter_for_the_same_round_is_a_new_release_and_charged(tmp_path, task_identity, initial):
    cfg = tiny_config(run={"dir": str(tmp_path)}, federation={"rounds": 4})
    other = {k: v + 0.01 for k, v in initial.items()}
    first = handle_train(_message(initial, 1), _context(cfg))
    second = handle_train(_message(other, 1), _context(cfg))
    third = handle_train(_message(other, 1), _context(cfg))  # the latest release is the one kept
    assert "resent" not in second.content["metrics"] and third.content["metrics"]["resent"] == 1
    a, b, c = _arrays(first), _arrays(second), _arrays(third)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(b[k], c[k]) for k in b)
    ledger = Ledger(ledger_path(tmp_path, "client-0"))
    assert [e["type"] for e in ledger.entries()] == ["plan", "spend", "spend", "resend"]
    spends = ledger.spends()
    assert spends[1]["epsilon"] > spends[0]["epsilon"]  # two releases, both paid for
    assert second.content["client"]["ledger-head"] == third.content["client"]["ledger-head"] == spends[1]["hash"]


def test_a_release_that_its_ledger_does_not_show_is_not_resent(tmp_path, task_identity, initial):
    """The stored update is resent only against the spend that paid for it."""
    cfg = tiny_config(run={"dir": str(tmp_path)})
    handle_train(_message(initial, 1), _context(cfg))
    ledger = ledger_path(tmp_path, "client-0")
    ledger.unlink()  # e.g. a ledger restored from a backup taken before the round
    again = handle_train(_message(initial, 1), _context(cfg))
    assert "resent" not in again.content["metrics"]
    assert [e["type"] for e in Ledger(ledger).entries()] == ["plan", "spend"]


def test_a_paid_round_is_never_sent_again_into_a_second_secure_sum_with_fresh_noise(tmp_path):
    """Distributed DP: re-encoding a resent update draws new noise, and two sums of the same
    update with independent noise average it down. A server asking again (a resume, or on
    purpose) gets a refusal, not a second noisy copy; plain and record-level resends still work."""
    from types import SimpleNamespace

    import numpy as np

    from fedtune import release
    from fedtune.client.state import resend as _resend
    from fedtune.privacy import Ledger
    from fedtune.runfolder import ledger_path, release_path

    def setup(input_set="ab" * 32, **sections):
        s = SimpleNamespace(cfg=tiny_config(**sections), name="client-0", run_dir=tmp_path / "run")
        ledger = Ledger(ledger_path(s.run_dir, s.name))
        if not ledger.entries():
            head = ledger.append({"type": "spend", "round": 2, "epsilon": 1.0})["hash"]
        head = ledger.spends()[0]["hash"]
        release.store(release_path(s.run_dir, s.name), release.Release(
            2, "asked", {"w": np.zeros(3, dtype=np.float32)}, 10.0, {}, {"name": s.name, "ledger-head": head},
            input_set))
        return s, ledger

    s, ledger = setup(client_dp={"enabled": True}, secagg={"enabled": True})
    with pytest.raises(FedtuneError, match="will not send it again in a second sum"):
        _resend(s, ledger, 2, "asked", secure=True)
    assert not any(e["type"] == "resend" for e in ledger.entries())
    s, ledger = setup(secagg={"enabled": True})  # record-level DP under SecAgg+: the stored, noised update...
    assert _resend(s, ledger, 2, "asked", secure=True).bound == bytes.fromhex("ab" * 32)  # ...bound to its first set
    s, ledger = setup("", secagg={"enabled": True})  # its first sum's set never signed: no second sum
    with pytest.raises(FedtuneError, match="whose input set it never signed; it will not mask it into another"):
        _resend(s, ledger, 2, "asked", secure=True)
    s, ledger = setup(client_dp={"enabled": True}, secagg={"enabled": True}, privacy={"seed": 3})  # tests: same noise
    assert _resend(s, ledger, 2, "asked", secure=True) is not None
