"""The deployed client's long-lived worker (fedtune.deploy.worker, fedtune.deploy.supervisor).

Written as the attacker would: a run whose app package (FAB) carries code that would
take over the client if imported; a worker SIGKILLed mid-round, after its spend is on
disk, and asked for the same round again by the restarted worker."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedtune.errors import FedtuneError
from fedtune.privacy import Ledger
from fedtune.runfolder import ledger_path
from tests.conftest import ROOT
from tests.deployment import write_data
from tests.client.test_client import initial  # noqa: F401 - fixture
from tests.deploy.test_deploy import _context_of, _deployed, _error, _rewrite, _rows, fed  # noqa: F401 - fixture

EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('the app package ran on the client')\n"


def _fab(marker) -> bytes:
    """An app package whose every module writes ``marker`` when imported (fedtune's own names too)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", '[tool.flwr.app.components]\nclientapp = "client.client_app:app"\n')
        for name in ("client/__init__.py", "client/client_app.py", "fedtune/__init__.py", "fedtune/client/__init__.py", "fedtune/client/app.py"):
            z.writestr(name, EVIL.format(marker=str(marker)))
    return buf.getvalue()


class _Run:
    run_id, fab_id, fab_version = 1, "evil/app", "1.0"


def _task(monkeypatch, message, context, fab_bytes, pushed):
    """Flower's ClientAppIo calls as the SuperNode would answer them, for one task."""
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supercore.fab import Fab

    from fedtune.deploy import worker

    class Client:
        def SendTaskHeartbeat(self, req):  # noqa: N802 - Flower's name
            return None

        def close(self):
            pass

    def no_install(*args, **kwargs):
        raise AssertionError("the worker installed the run's FAB")

    monkeypatch.setattr("flwr.cli.install.install_from_fab", no_install)
    monkeypatch.setattr(worker, "_task_client", lambda address, token: Client())
    monkeypatch.setattr(worker, "pull_task_input", lambda client: (message, context, _Run(), Fab("ab" * 32, fab_bytes, {}),
                                                                 time.time()))
    monkeypatch.setattr(rc, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(rc, "push_task_output", lambda **kw: pushed.append(kw["sub_status"]))


def _evaluate_message(initial):  # noqa: F811
    return Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=1, message_type=MessageType.EVALUATE)


def test_the_worker_runs_its_own_handlers_and_never_the_app_packages_code(tmp_path, monkeypatch, task_identity,
                                                                          initial):  # noqa: F811
    from fedtune.deploy.worker import fedtune_app, run_task

    marker = tmp_path / "pwned"
    import hashlib

    from fedtune.deploy.approved import APPS_ENV

    cfg, node = _deployed(tmp_path, _rows(12))
    pushed: list = []
    fab = _fab(marker)
    monkeypatch.setenv(APPS_ENV, hashlib.sha256(fab).hexdigest())  # approved by its operator, still never imported
    _task(monkeypatch, _evaluate_message(initial), _context_of(cfg, node), fab, pushed)
    before = set(sys.modules)
    run_task(fedtune_app(), "127.0.0.1:1", "token")
    reply, status = pushed
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"]["num-examples"] > 0 and status == "completed"
    assert not marker.exists()  # no module of the package was imported
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] == "client"}


def test_the_approval_hook_refuses_a_run_in_one_line_before_any_handler(tmp_path, monkeypatch, task_identity,
                                                                        initial):  # noqa: F811
    from fedtune.deploy.worker import REFUSED, fedtune_app, run_task

    def reject(run, fab):
        raise FedtuneError(f"app {fab.hash_str[:8]} is not on this client's allowlist")

    cfg, node = _deployed(tmp_path, _rows(12))
    train = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=1, message_type=MessageType.TRAIN)
    pushed: list = []
    _task(monkeypatch, train, _context_of(cfg, node), _fab(tmp_path / "pwned"), pushed)
    run_task(fedtune_app(), "127.0.0.1:1", "token", check=reject)
    reply = pushed[0]
    assert reply.has_error() and reply.error.code == REFUSED
    assert reply.error.reason == "client worker refused the run: app abababab is not on this client's allowlist"
    assert not (tmp_path / "state" / "runs").exists()  # nothing planned, nothing spent


KILLED_WORKER = r"""
import json, os, signal, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedtune import release
from fedtune.deploy.worker import fedtune_app, handle

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
run_config, node_config, adapter, kill = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
store = release.store
def killed(path, rel):  # SIGKILL once the spend is on disk: before or after the release is kept
    if kill == "after-release":
        store(path, rel)
    if kill != "no":
        os.kill(os.getpid(), signal.SIGKILL)
    store(path, rel)
release.store = killed
arrays = ArrayRecord({k: Array(v) for k, v in np.load(adapter).items()})
msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
              message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
reply = handle(fedtune_app(), msg, ctx, None, None, check=lambda run, fab: None)
print(json.dumps({"error": reply.error.reason if reply.has_error() else None,
                  "resent": reply.content["metrics"].get("resent", 0) if not reply.has_error() else 0}))
"""


@pytest.mark.parametrize("kill", ["after-release", "before-release"])
def test_a_worker_killed_after_paying_is_restarted_and_never_pays_twice(tmp_path, initial, kill):  # noqa: F811
    import numpy as np

    from fedtune import config as config_mod

    cfg, node = _deployed(tmp_path, _rows(12))
    cfg = cfg.replace(run={"name": "killed"})
    np.savez(tmp_path / "adapter.npz", **initial)

    def worker(mode):
        args = [json.dumps(config_mod.to_flat(cfg)), json.dumps(node), str(tmp_path / "adapter.npz"), mode]
        return subprocess.run([sys.executable, "-c", KILLED_WORKER, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    first = worker(kill)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    ledger = Ledger(ledger_path(tmp_path / "state" / "runs" / "killed", "clinic-a"))
    assert [e["round"] for e in ledger.spends()] == [1]  # paid, on disk, before the kill
    again = json.loads(worker("no").stdout.strip().splitlines()[-1])  # the restarted worker, same request
    if kill == "after-release":
        assert again == {"error": None, "resent": 1}
    else:  # the update was never kept: the round fails cleanly for this client
        assert "paid for, but the client stopped before keeping its update" in again["error"]
    assert [e["round"] for e in ledger.spends()] == [1]


def test_the_supervisor_restarts_a_killed_worker_and_stops_with_the_supernode(tmp_path):
    from fedtune.deploy.launch import stop_tree
    from fedtune.deploy.supervisor import Supervisor

    starts = tmp_path / "starts"
    worker = [sys.executable, "-c", f"import os, time; open({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
                                    "time.sleep(60)"]
    node = [sys.executable, "-c", "import time; time.sleep(6)"]
    lines: list[str] = []
    sup = Supervisor(node, worker, {}, str(tmp_path), stop_tree, log=lines.append)
    killer = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, time, pathlib
p = pathlib.Path({str(starts)!r})
while not p.exists() or not p.read_text(): time.sleep(0.05)
os.kill(int(p.read_text().split()[0]), signal.SIGKILL)
"""])
    t0 = time.monotonic()
    assert sup.run(poll=0.05) == 0  # the SuperNode's exit code
    killer.wait(timeout=10)
    pids = starts.read_text().split()
    assert len(pids) == 2 and sup.restarts == 1 and time.monotonic() - t0 < 30
    assert "restarting it" in lines[0] and "not paid again" in lines[0]
    assert sup.worker.poll() is not None  # stopped with the SuperNode


def test_a_worker_that_cannot_start_stops_the_client_with_code_2(tmp_path):
    from fedtune.deploy.launch import stop_tree
    from fedtune.deploy.supervisor import Supervisor

    node = [sys.executable, "-c", "import time; time.sleep(60)"]
    sup = Supervisor(node, [sys.executable, "-c", "raise SystemExit(2)"], {}, str(tmp_path), stop_tree)
    assert sup.run(poll=0.05) == 2
    assert sup.node.poll() is not None


# ---- bad input at start-up: one line, exit code 2 ------------------------------------------
def test_client_start_without_its_model_cache_says_so(fed, capsys):  # noqa: F811
    root, _, client = fed
    _rewrite(root / "client.toml", "client", {**client, "model_cache": "no-such-cache"})
    assert "model cache folder" in _error(capsys, ["client", "start", str(root / "client.toml")])


@pytest.mark.parametrize("gone", ["data", "model-cache"])
def test_a_restarted_worker_whose_data_or_cache_is_gone_exits_2_in_one_line(tmp_path, gone):
    (tmp_path / "secret").write_bytes(b"s" * 32)
    write_data(tmp_path / "data.jsonl", _rows(2))
    (tmp_path / "cache").mkdir()
    paths = {"data": tmp_path / "data.jsonl", "model-cache": tmp_path / "cache"}
    paths[gone] = tmp_path / "gone"
    res = subprocess.run([sys.executable, "-m", "fedtune.deploy.worker", "--runtime-api", "127.0.0.1:1",
                          "--secret-file", str(tmp_path / "secret"), "--data", str(paths["data"]),
                          "--model-cache", str(paths["model-cache"])], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("fedtune: the client worker cannot start: ") and str(tmp_path / "gone") in res.stderr
