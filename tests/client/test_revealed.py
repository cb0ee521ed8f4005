"""Only covered numbers leave a client: under DP no per-client loss by default, and under
secure aggregation nothing that tells the record count N apart (add/remove-one adjacency:
N is private). Real ClientApp handlers, real DP-SGD, tiny Llama."""

from __future__ import annotations

import json

import pytest
from flwr.app import MessageType

from fedtune.client import handle_evaluate, handle_train
from fedtune.privacy import Ledger
from fedtune.revealed import REVEALED_UNDER_DP
from fedtune.runfolder import ledger_path
from tests.conftest import tiny_config
from tests.client.test_client import _context, _message, initial  # noqa: F401  (fixture)
from tests.secagg.test_secagg_flower import NODES, Grid, _secure


@pytest.mark.parametrize("reveal", [False, True])
def test_under_dp_per_client_losses_leave_only_when_switched_on(tmp_path, task_identity, initial, reveal):  # noqa: F811
    cfg = tiny_config(run={"dir": str(tmp_path)}, privacy={"reveal_losses": reveal})
    sent = dict(handle_train(_message(initial, 1), _context(cfg)).content["metrics"])
    assert set(sent) <= set(REVEALED_UNDER_DP) | {"upload-bytes", "train-loss"}
    assert ("train-loss" in sent) == reveal and "empty-steps" not in sent
    evaluated = dict(handle_evaluate(_message(initial, 0, MessageType.EVALUATE), _context(cfg, 1)).content["metrics"])
    if reveal:
        assert evaluated["eval-tokens"] > 0 and "eval-loss" in evaluated
    else:
        assert evaluated == {"eval-withheld": 1}  # no loss of the private held-out data


def test_without_dp_there_is_nothing_to_withhold(tmp_path, task_identity, initial):  # noqa: F811
    cfg = tiny_config(run={"dir": str(tmp_path)}, privacy={"dp": False, "reveal_losses": False})
    assert "train-loss" in handle_train(_message(initial, 1), _context(cfg)).content["metrics"]


def test_under_secagg_195_and_196_records_reveal_identical_metrics(tmp_path, task_identity, initial):  # noqa: F811
    """The ε of a fixed plan identifies N (6.7111 / 6.7133 for 194 / 195 records): under
    SecAgg a client sends nothing in the clear that depends on N (only the secure sum's
    own stage timings differ, run to run)."""
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}: visit note"}) + "\n" for i in range(978)))
    cfg = tiny_config(run={"dir": str(tmp_path / "run")}, privacy={"seed": 5, "reveal_losses": True},
                      federation={"clients": len(NODES)}, secagg={"enabled": True},
                      data={"source": str(data), "partition": "iid"})
    grid = Grid(cfg)
    sec = _secure(cfg, initial, grid)
    assert not sec.aborted and sec.included == NODES
    from fedtune.client.setup import setup

    sizes = {n: len(setup(grid.contexts[n]).train) for n in NODES}
    small, large = (next(n for n in NODES if sizes[n] == size) for size in (195, 196))
    said = {node: {k: v for k, v in reply.content["metrics"].items() if k != "secagg-seconds"}
            for stage, node, reply in grid.seen if stage == "collect"}
    assert said[small] == said[large] and "epsilon" not in said[small]
    spent = {n: Ledger(ledger_path(cfg.run.dir, setup(grid.contexts[n]).name)).spends()[-1]["epsilon"]
             for n in (small, large)}
    assert spent[small] != spent[large]  # the ledgers differ: the test would see a revealed ε
