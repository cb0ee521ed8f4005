"""Only approved code runs on a deployed client (processes: real SuperLink, SuperNodes and
`fedtune run`). A run whose app carries a changed budget check is refused by every client
before the app is installed: nothing trains, nothing is spent. The approved app, submitted
next to the same clients, trains."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from fedtune.data import export_clients
from fedtune.deploy.approved import app_hash
from fedtune.runfolder import read_jsonl
from tests.conftest import ROOT, tiny_config
from tests.deployment import Federation, approved_app, cli

pytestmark = pytest.mark.slow

NAMES = ["clinic-a", "clinic-b"]
RUN = {"run": {"name": "approved"}, "model": {"name": "tiny-random-llama", "max_length": 128, "precision": "fp32"},
       "train": {"local_steps": 1, "batch_size": 8, "threads": 1}, "data": {"max_eval_examples": 4},
       "federation": {"clients": 2, "rounds": 1, "round_timeout": 300.0}}
# The submitter's app, with the client's budget check replaced by one that always says yes.
TAMPER = """
import fedtune.privacy.budget as _budget
_budget.check_round = lambda history, plan: _budget.RoundDecision(True, 0.0, 0.0)
"""
# `fedtune run`, submitting the app in argv[2] instead of this installation's.
RUN_APP = """
import sys
from pathlib import Path
import fedtune.deploy.launch
fedtune.deploy.launch.app_dir = lambda: Path(sys.argv[2])
from fedtune.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


@pytest.fixture
def federation(tmp_path, tiny_path):
    export_clients(tiny_config(federation={"clients": len(NAMES)}), tmp_path / "data", NAMES)
    fed = Federation(tmp_path, NAMES, RUN)
    yield fed
    fed.stop_all()


def _tampered(tmp_path):
    app = tmp_path / "app"
    for part in ("server", "client", "simulations"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.toml.bak"))
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    path = app / "client" / "client_app.py"
    path.write_text(path.read_text() + TAMPER)
    return app


def _run(fed, app) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_APP, str(fed.root / "server.toml"), str(app)], cwd=fed.root,
                          env=fed.env, capture_output=True, text=True, timeout=600)


def test_a_tampered_app_is_refused_and_trains_nothing_the_approved_one_trains(federation, tmp_path):
    fed = federation
    app = _tampered(tmp_path)
    digest = app_hash(app)
    assert digest != approved_app()
    fed.start_server()
    for name in NAMES:
        fed.start_client(name)
    res = _run(fed, app)
    assert f"fedtune: app sha256 {digest}" in res.stderr  # printed for the operators to approve (or not)
    (run_dir,) = [p for p in (fed.root / "runs").iterdir()]
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train"]
    assert len(rows) == 2 and all(r["status"] == "failed" and f"app sha256 {digest} is not approved" in r["reason"]
                                  for r in rows), rows
    for name in NAMES:
        assert f"client {name} refuses the run: its app sha256 {digest} is not approved" in fed.log(name)
        assert not (fed.root / "state" / name / "runs").exists()  # no ledger: nothing planned, trained or spent
        assert not (fed.root / "state" / name / "datasets").exists() or not any(
            e["type"] == "spend" for e in read_jsonl(fed.root / "state" / name / "datasets" / name / "lifetime.jsonl"))

    res = _run(fed, ROOT)  # the approved app, to the same clients
    assert res.returncode == 0, res.stderr[-3000:]
    (good,) = [p for p in (fed.root / "runs").iterdir() if p != run_dir]
    assert all(r["status"] == "ok" for r in fed.train_rows(good))
    budget = subprocess.run(cli("budget", str(fed.root / "clinic-a.toml"), "--verify"), capture_output=True,
                            text=True, env=fed.env, timeout=120)
    assert budget.returncode == 0 and f"run {good.name}: 1 round(s)" in budget.stdout, budget.stdout + budget.stderr
