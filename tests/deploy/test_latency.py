"""What keeps a deployed message quick, on Flower's own modules. fedtune's SuperNode launcher
(fedtune.deploy.supernode): the fixed sleeps shortened only while messages flow, an object
not yet uploaded asked for again within 50 ms, a 10 s heartbeat declared, the ready file
written with the node id the SuperLink gave, one line and exit code 2 when Flower is not the
version it adjusts; the supervisor starts the worker only once that file exists. The
ServerApp's grid retries a reply's objects within 50 ms too, and `fedtune run` asks for the
run's status when the log stream ends. The e2e tests run all of it in real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest
from flwr.supercore import heartbeat as beat
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import fleet_http_connection as fleet
from flwr.supernode import start_client_internal as sci

from fedtune import exchange
from fedtune.deploy import supernode


@pytest.fixture
def flower(monkeypatch):
    """Flower's SuperNode modules, put back as they were after the test."""
    for module, names in ((sci, ["time", "_pull_and_store_message", "_push_messages", "_init_connection",
                                 "pull_objects"]),
                          (fleet, ["HEARTBEAT_DEFAULT_INTERVAL"]), (beat, ["HEARTBEAT_DEFAULT_INTERVAL"])):
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    return monkeypatch


def test_the_idle_pull_is_0_2_s_while_a_run_flows_and_flowers_3_s_when_idle(flower):
    flower.setattr(sci, "_pull_and_store_message", lambda **kw: kw["found"])
    flower.setattr(sci, "_push_messages", lambda **kw: None)
    slept: list[float] = []
    clock = supernode.patch(10.0, None, sleep=slept.append)
    sci.time.sleep(3)  # nothing has flowed yet: Flower's own 3 s
    assert sci._pull_and_store_message(found=None) is None
    sci.time.sleep(3)  # a pull that found nothing does not count as traffic
    assert sci._pull_and_store_message(found=7) == 7
    sci.time.sleep(3)
    sci.time.sleep(0.5)  # the wait for the worker's reply (local state)
    clock.last_message -= supernode.BUSY_S + 1  # idle for longer than BUSY_S
    sci.time.sleep(3)
    sci._push_messages()  # a reply sent (after a long training) counts as traffic too
    sci.time.sleep(3)
    assert slept == [3, 3, supernode.PULL_S, supernode.LOCAL_S, 3, supernode.PULL_S]
    assert sci.time.monotonic() > 0  # the rest of the time module is the real one


def _pull_once_unavailable(pull_objects) -> float:
    """Seconds ``pull_objects`` takes for one object that is not uploaded at its first ask."""
    asked: list[str] = []

    def pull(object_id: str) -> bytes:
        asked.append(object_id)
        if len(asked) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    t0 = time.monotonic()
    assert pull_objects(["obj"], pull_object_fn=pull) == {"obj": b"content"}
    return time.monotonic() - t0


def test_an_object_not_yet_at_the_superlink_is_asked_again_within_50_ms_not_1_s(flower):
    assert _pull_once_unavailable(sci.pull_objects) >= 0.75  # Flower: 1 s (±20 %) before the second ask
    supernode.patch(10.0, None)
    assert _pull_once_unavailable(sci.pull_objects) < 0.5


def test_the_heartbeat_is_declared_and_sent_at_the_operators_interval(flower):
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == beat.HEARTBEAT_DEFAULT_INTERVAL == 30  # Flower's
    supernode.patch(12.0, None)
    # Declared to the SuperLink (activate, every heartbeat), and the sender's own period.
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == beat.HEARTBEAT_DEFAULT_INTERVAL == 12.0


def test_the_ready_file_names_the_node_the_superlink_admitted(flower, tmp_path):
    @contextlib.contextmanager
    def connect(**kwargs):
        yield (4242, "receive", "send")

    flower.setattr(sci, "_init_connection", connect)
    ready = tmp_path / "supernode.ready"
    supernode.patch(10.0, ready)
    with sci._init_connection(server_address="x") as conn:
        assert conn[0] == 4242 and ready.read_text() == "4242\n"


def test_a_changed_flower_or_a_short_heartbeat_stops_the_supernode_in_one_line(flower, capsys):
    assert supernode.main(["--fedtune-heartbeat", "5"]) == 2
    assert capsys.readouterr().err.strip() == "fedtune: client.heartbeat must be >= 10 s (the SuperLink's minimum)"
    flower.setattr(supernode.inspect, "getsource", lambda module: "")  # as if Flower had rewritten its loop
    assert supernode.main(["--fedtune-heartbeat", "10", "--superlink", "x:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtune: cannot start the SuperNode: flwr ")
    assert "time.sleep(3)" in err[0] and "flwr==1.42.0" in err[0]
    assert sci.time is time  # nothing was changed


def test_the_worker_starts_only_once_the_supernode_is_admitted(tmp_path):
    from fedtune.deploy.launch import stop_tree
    from fedtune.deploy.supervisor import Supervisor

    ready, started = tmp_path / "supernode.ready", tmp_path / "started"
    worker = [sys.executable, "-c", f"import time; open({str(started)!r}, 'w').write(repr(time.time())); time.sleep(60)"]
    admitted = [sys.executable, "-c", f"import time; time.sleep(1); open({str(ready)!r}, 'w').write(repr(time.time()));"
                                      " time.sleep(3)"]
    sup = Supervisor(admitted, worker, {}, str(tmp_path), stop_tree, ready=ready)
    assert sup.run(poll=0.05) == 0
    assert float(started.read_text()) >= float(ready.read_text())  # after the node was admitted, not before
    started.unlink()
    ready.write_text("stale")  # a file left by an earlier start does not count: the supervisor removes it
    refused = [sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(1)"]  # turned away
    sup = Supervisor(refused, worker, {}, str(tmp_path), stop_tree, ready=ready)
    assert sup.run(poll=0.05) == 1 and sup.worker is None and not started.exists()


def test_the_servers_grid_asks_again_for_a_replys_object_within_50_ms_not_1_s(monkeypatch):
    """A node registers its reply before it uploads the reply's objects, so a prompt pull by
    the ServerApp often meets one not there yet; Flower's grid would wait 1 s."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid, http_grid

    flowers = getattr(http_grid.pull_objects, "func", http_grid.pull_objects)  # unpatched by an earlier exchange
    monkeypatch.setattr(http_grid, "pull_objects", flowers)
    assert _pull_once_unavailable(http_grid.pull_objects) >= 0.75
    grid = InMemoryGrid(state_factory=LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(),
                                                        ObjectStoreFactory()))
    exchange.send_and_receive(grid, [], timeout=1.0)  # any exchange through a real grid sets it
    assert _pull_once_unavailable(http_grid.pull_objects) < 0.5


def test_run_asks_for_the_status_when_the_log_stream_ends_not_every_few_seconds():
    """Each status ask is a `flwr` process (~1 s of CPU): `fedtune run` asks when Flower's log
    stream ends (the run's end), and otherwise once per ``poll``."""
    from fedtune.deploy.launch import _follow

    class Finished:
        asks = 0

        def status(self, run_id):
            self.asks += 1
            return "finished:completed"

    control, t0 = Finished(), time.monotonic()
    logs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    assert _follow(control, "7", logs, poll=120.0, lost_after=300.0, lost="lost") == "finished:completed"
    assert control.asks == 1 and time.monotonic() - t0 < 30


def test_the_commands_that_start_processes_do_not_import_torch(tmp_path):
    """`fedtune client start` stays resident as the supervisor: it reads and checks the data
    file without torch (~1.5 s of CPU and ~180 MB less per client); `fedtune server start` and
    `fedtune run` need no torch either. Only the worker and the ServerApp load it."""
    from tests.deployment import free_port, write_data

    write_data(tmp_path / "data.jsonl", [{"text": f"record {i}"} for i in range(10)])
    (tmp_path / "client.toml").write_text(f'[client]\nname = "clinic-a"\ndata = "data.jsonl"\nstate = "state"\n'
                                          f"port = {free_port()}\n")
    probe = ("import sys; from fedtune.deploy import launch; launch.check_client(launch.load_client(sys.argv[1]), "
             "insecure=True); import fedtune.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "client.toml")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]
