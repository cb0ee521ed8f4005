"""The `fedtune` command on bad input: one line naming the problem and the fix, exit
code 2, no traceback, and nothing written to the output folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = str(ROOT / "simulations" / "tiny.toml")


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _files(tmp_path, rows: str, name: str):
    path = tmp_path / name
    path.write_text(rows)
    return str(path)


CASES = {
    "malformed config": (lambda t: [_files(t, "[train\nbatch_size = 8", "bad.toml")], "not valid TOML"),
    "unknown key": (lambda t: [TINY, "--set", "privacy.epsion=3"], "did you mean 'privacy.epsilon'"),
    "unknown model folder": (lambda t: [TINY, "--model", "./no-such-model"], "model folder ./no-such-model not found"),
    "unknown hub model": (lambda t: [TINY, "--model", "no-org/no-such-model"], "cannot load model 'no-org/no-such-model'"),
    "data without fields": (lambda t: [TINY, "--data", _files(t, '{"body": "x"}\n' * 20, "d.jsonl")], "needs 'text'"),
    "missing data file": (lambda t: [TINY, "--data", str(t / "nope.csv")], "not found"),
    "bad split value": (lambda t: [TINY, "--data", _files(t, '{"text": "x", "split": "test"}\n' * 20, "d.jsonl")],
                        "record 1 has split = 'test'; use 'train' or 'heldout'"),
    "empty partition": (lambda t: [TINY, "--clients", "500"], "records cannot fill 500 clients"),
    "epsilon out of range": (lambda t: [TINY, "--epsilon", "-1"], "privacy.epsilon must be a finite number > 0"),
    "delta out of range": (lambda t: [TINY, "--set", "privacy.delta=2"], "privacy.delta must be in (0, 1)"),
    "prompts longer than max_length": (lambda t: [TINY, "--set", "model.max_length=16"], "raise model.max_length"),
    "budget below one step": (lambda t: [TINY, "--set", "privacy.budget=0.001"], "is below what one step costs client-0"),
    "budget below one round": (lambda t: [TINY, "--set", "privacy.budget=6.5"], "pays for no whole round of client-0"),
    "client-level budget": (lambda t: [TINY, "--set", "client_dp.enabled=true", "--set", "client_dp.budget=0.0001"],
                            "client_dp.budget=0.0001 is below what one step costs the federation"),
    "secagg with two clients": (lambda t: [TINY, "--secagg", "--clients", "2"], "needs at least 3 clients per round"),
    "secagg weight bound": (lambda t: [TINY, "--secagg", "--set", "secagg.max_weight=10"],
                            "above secagg.max_weight=10"),
    "no GPU": (lambda t: [TINY, "--set", "model.device=cuda"], "no CUDA GPU is visible"),
    "DP defaults: ε buys no useful step": (lambda t: [TINY, "--set", "train.batch_size=0", "--set", "train.local_steps=0",
                                                   "--epsilon", "0.01"], "no step would learn"),
    "DP defaults: no compute": (lambda t: [TINY, "--set", "train.batch_size=0", "--set", "train.local_steps=0",
                                          "--set", "train.local_epochs=0.001"], "trains no batch"),
    "unknown aggregation": (lambda t: [TINY, "--aggregation", "fedfoo"],
                            "federation.aggregation must be one of fedavg, ffa, fedsa"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make_args, message = CASES[case]
    if case == "no GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible here")
    out = tmp_path / "runs"
    res = run_cli("simulate", *make_args(tmp_path), "--output", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fedtune:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())  # no run folder, not even an empty one


def test_a_run_that_fails_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    """`flwr run` exits 0 on failed runs; fedtune reads the real status instead."""
    import subprocess as sp

    from fedtune import cli, simulate
    from fedtune.runfolder import update_run_file
    from tests.conftest import tiny_config

    class FailingLink:
        def submit(self, app, run_config, federation):
            update_run_file(tmp_path, status="failed", error="ValueError: boom in round 1")
            return "42"

        def stream_logs(self, run_id, path):
            return sp.Popen(["true"])

        def status(self, run_id):
            return "finished:failed"

    with pytest.raises(simulate.RunFailed, match="boom in round 1"):
        simulate.run_simulation(tiny_config(), tmp_path, FailingLink(), show=lambda *a: a[2].wait())

    def failing_simulate(cfg, baselines, show, announce=None):
        raise simulate.RunFailed("the run did not complete (Flower status finished:failed)")

    monkeypatch.setattr(cli, "simulate", failing_simulate)  # the name cmd_simulate calls
    assert cli.main(["simulate", TINY]) == 1
    assert "fedtune: run failed: the run did not complete" in capsys.readouterr().err
