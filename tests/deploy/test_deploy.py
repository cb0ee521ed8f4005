"""Deployment commands fail at start-up with one line and exit 2 on bad input; certificates,
keys and the client's own settings are what Flower and the operator need."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedtune import certs
from fedtune.cli import main
from fedtune.deploy import settings
from fedtune.deploy.node import from_node_config, local_config
from fedtune.errors import FedtuneError
from tests.conftest import tiny_config
from tests.deployment import _toml, free_port, write_data


def _error(capsys, argv) -> str:
    """Run the CLI in-process; it must exit 2 with one line on stderr and nothing else."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtune: error: "), err
    return err[0]


@pytest.fixture
def fed(tmp_path):
    """A server and one client folder with valid certificates, keys, data and configs."""
    certs.make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    certs.make_client_key(tmp_path / "keys", "clinic-a")
    write_data(tmp_path / "data" / "clinic-a.jsonl", [{"text": f"record {i}"} for i in range(10)])
    server = {"host": "127.0.0.1", "port": free_port(), "names": ["localhost"], "certs": "certs", "keys": "keys",
              "state": "state/server", "output": "runs"}
    client = {"name": "clinic-a", "superlink": "localhost:9092", "ca": "certs/ca.crt", "key": "keys/clinic-a",
              "data": "data/clinic-a.jsonl", "budget": 3.0, "state": "state/clinic-a", "port": free_port()}
    (tmp_path / "server.toml").write_text(_toml({"server": server, "federation": {"clients": 3}}))
    (tmp_path / "client.toml").write_text(_toml({"client": client}))
    return tmp_path, server, client


def _rewrite(path, table, body):
    path.write_text(_toml({table: body}))


# ---- certificates and keys --------------------------------------------------------------
def test_certs_name_the_hosts_and_chain_to_the_ca(tmp_path):
    paths = certs.make_certs(tmp_path, ["fl.example.org", "10.0.0.5"])
    certs.check_server_tls(paths["ca.crt"], paths["server.pem"], paths["server.key"], ["fl.example.org", "10.0.0.5"])
    assert certs.cert_names(certs.load_certificate(paths["server.pem"], "", "")) == ["fl.example.org", "10.0.0.5"]
    assert (paths["server.key"].stat().st_mode & 0o777) == 0o600
    with pytest.raises(FedtuneError, match="does not name 'other.example.org'"):
        certs.check_server_tls(paths["ca.crt"], paths["server.pem"], paths["server.key"], ["other.example.org"])
    other = certs.make_certs(tmp_path / "other", ["fl.example.org"])
    with pytest.raises(FedtuneError, match="was not signed by the CA"):
        certs.check_server_tls(other["ca.crt"], paths["server.pem"], paths["server.key"], ["fl.example.org"])
    with pytest.raises(FedtuneError, match="does not belong to the certificate"):
        certs.check_server_tls(paths["ca.crt"], paths["server.pem"], other["server.key"], ["fl.example.org"])
    with pytest.raises(FedtuneError, match="already exists"):
        certs.make_certs(tmp_path, ["fl.example.org"])


def test_client_keys_are_p384_openssh_as_flower_loads_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    private, public = certs.make_client_key(tmp_path, "clinic-a")
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (private.stat().st_mode & 0o777) == 0o600
    assert try_load_public_key(public)  # Flower's own loader for `flwr supernode register`
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1" and uses_nist_ec_curve(key.public_key())


def test_cli_certs_and_keys(tmp_path, capsys):
    assert main(["certs", "--host", "localhost", "--out", str(tmp_path / "c")]) == 0
    assert main(["keys", "a", "b", "--out", str(tmp_path / "k")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["a", "a.pub", "b", "b.pub"]
    capsys.readouterr()
    assert "already exists" in _error(capsys, ["keys", "a", "--out", str(tmp_path / "k")])


# ---- `fedtune server start`: checks before the SuperLink starts -------------------------
def test_server_start_missing_certificate(fed, capsys):
    root, _, _ = fed
    (root / "certs" / "server.pem").unlink()
    assert "server certificate" in _error(capsys, ["server", "start", str(root / "server.toml")])


def test_server_start_certificate_without_the_servers_name(fed, capsys):
    root, server, _ = fed
    _rewrite(root / "server.toml", "server", {**server, "names": ["fl.example.org"]})
    assert "does not name 'fl.example.org'" in _error(capsys, ["server", "start", str(root / "server.toml")])


def test_server_start_wrong_certificate_path(fed, capsys):
    root, server, _ = fed
    _rewrite(root / "server.toml", "server", {**server, "certs": "no-such-folder"})
    assert "no-such-folder" in _error(capsys, ["server", "start", str(root / "server.toml")])


def test_server_start_port_in_use(fed, capsys):
    root, server, _ = fed
    with socket.socket() as s:
        s.bind(("127.0.0.1", server["port"]))
        s.listen()
        assert "is not free" in _error(capsys, ["server", "start", str(root / "server.toml")])


def test_server_start_bad_public_key_and_missing_config(fed, capsys):
    root, _, _ = fed
    (root / "keys" / "rogue.pub").write_text("ssh-rsa not-a-key\n")
    assert "rogue.pub is not an OpenSSH public key" in _error(capsys, ["server", "start", str(root / "server.toml")])
    assert "not found" in _error(capsys, ["server", "start", str(root / "nope.toml")])


# ---- `fedtune client start`: checks before the SuperNode starts -------------------------
def test_client_start_unreadable_key(fed, capsys):
    root, _, _ = fed
    (root / "keys" / "clinic-a").write_text("not a key\n")
    assert "is not an unencrypted OpenSSH or PEM private key" in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_client_start_missing_key_and_ca(fed, capsys):
    root, _, client = fed
    (root / "keys" / "clinic-a").unlink()
    assert "client private key" in _error(capsys, ["client", "start", str(root / "client.toml")])
    _rewrite(root / "client.toml", "client", {**client, "ca": "certs/missing.crt"})
    assert "CA certificate" in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_client_start_missing_data_file(fed, capsys):
    root, _, _ = fed
    (root / "data" / "clinic-a.jsonl").unlink()
    assert "data file" in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_client_start_malformed_data_file(fed, capsys):
    root, _, _ = fed
    (root / "data" / "clinic-a.jsonl").write_text('{"note": "no text column"}\n')
    assert "needs 'text'" in _error(capsys, ["client", "start", str(root / "client.toml")])
    (root / "data" / "clinic-a.jsonl").write_text('{"text": "ok"}\n{broken\n')
    assert "could not be read" in _error(capsys, ["client", "start", str(root / "client.toml")])
    (root / "data" / "clinic-a.jsonl").write_text('{"text": "a", "split": "train"}\n{"text": "b", "split": "eval"}\n')
    assert "record 2 has split = 'eval'" in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_data_export_writes_one_file_per_client_and_refuses_bad_names(tmp_path, capsys):
    from tests.conftest import ROOT

    tiny = str(ROOT / "simulations" / "tiny.toml")
    assert main(["data", "export", tiny, "--out", str(tmp_path), "--names", "clinic-a, clinic-b,clinic-c"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"clinic-{c}.jsonl") for c in "abc"]
    assert "give 3 distinct client names" in _error(capsys, ["data", "export", tiny, "--out", str(tmp_path),
                                                             "--names", "a,b"])
    assert "not a plain file name" in _error(capsys, ["data", "export", tiny, "--out", str(tmp_path),
                                                      "--clients", "2", "--names", "a,../b"])


def test_client_start_port_in_use(fed, capsys):
    root, _, client = fed
    with socket.socket() as s:
        s.bind(("127.0.0.1", client["port"]))
        s.listen()
        assert "is not free" in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_client_config_mistakes(fed, capsys):
    root, _, client = fed
    for change, message in [({"budget": 0.0}, "client.budget"), ({"superlink": "nohost"}, "host:port"),
                            ({"name": "../x"}, "client.name"), ({"colour": "red"}, "unknown key client.colour"),
                            ({"port": "9094"}, "client.port must be a int"),
                            ({"heartbeat": 5.0}, "client.heartbeat must be 10..1800 seconds")]:
        _rewrite(root / "client.toml", "client", {**client, **change})
        assert message in _error(capsys, ["client", "start", str(root / "client.toml")])


def test_client_command_is_secure_by_default(fed):
    from fedtune.deploy.launch import client_command, server_command

    root, _, _ = fed
    cmd, env, s = client_command(str(root / "client.toml"), insecure=False)
    assert "--insecure" not in cmd and cmd[cmd.index("--isolation") + 1] == "process"  # fedtune's worker runs messages
    secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32  # only the worker takes tasks
    assert cmd[cmd.index("--root-certificates") + 1] == s.ca and cmd[cmd.index("--auth-supernode-private-key") + 1] == s.key
    cmd, _, _, keys = server_command(str(root / "server.toml"), insecure=False)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd and [k.name for k in keys] == ["clinic-a.pub"]
    assert "--insecure" in server_command(str(root / "server.toml"), insecure=True)[0]


# ---- the client operator's settings win ---------------------------------------------------
def test_node_config_round_trips_through_flowers_parser(fed):
    from flwr.common.config import parse_config_args

    root, _, _ = fed
    s = settings.load_client(root / "client.toml")
    parsed = parse_config_args([settings.node_config_arg(s)])
    assert parsed == settings.node_config(s)
    node = from_node_config(parsed)
    assert node.budget == 3.0 and node.data_file == str(root / "data" / "clinic-a.jsonl")


def test_the_clients_budget_overrides_the_servers_and_seeded_runs_are_refused(fed):
    root, _, _ = fed
    node = from_node_config(settings.node_config(settings.load_client(root / "client.toml")))
    cfg = tiny_config(privacy={"budget": 100.0})  # a server asking for more
    assert local_config(cfg, node).budget == 3.0
    with pytest.raises(FedtuneError, match="refuses a run with seeded DP noise"):
        local_config(tiny_config(privacy={"seed": 1}), node)
    with pytest.raises(FedtuneError, match="not a plain folder name"):
        node.run_dir(tiny_config(run={"name": "../../etc"}))
    assert from_node_config({"partition-id": 0}) is None  # simulation


def test_after_every_client_joined_a_round_goes_ahead_without_a_dead_one(task_identity):
    """Flower's FedAvg waits until its minimum of nodes is connected; once the run started,
    one dead client must not stall every later round."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord

    from fedtune.server.setup import tolerate_dropouts
    from fedtune.server.strategy import AdapterFedAvg

    class Grid:  # 3 of the 4 clients still connected
        def get_node_ids(self):
            return [1, 2, 3]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            from flwr.app import Message

            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    strategy = AdapterFedAvg(num_clients=4, clients_per_round=4, template={})
    tolerate_dropouts(strategy)
    arrays = ArrayRecord([np.zeros(2)])
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(2, arrays, ConfigRecord(), Grid())) == [1, 2, 3]
    assert len(list(strategy.configure_evaluate(2, arrays, ConfigRecord(), Grid()))) == 3


# A deployed client runs each message in a fresh process: the SecAgg+ key stages must not
# pay for torch and the model. Collect trains through a zero update here (no model), so the
# whole round (advertise, share, collect, unmask) runs through the real handlers.
KEY_STAGES_CHILD = r"""
import sys
import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict
import client.client_app
from fedtune import config
from fedtune.client import handle_train
from fedtune.secagg.flower import STAGE, Encoding, LocalUpdate, handle_stage, secure_train
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # messages outside a running app

HEAVY = ("torch", "transformers", "peft", "opacus", "datasets", "flwr_datasets")
cfg = config.load(sys.argv[1]).replace(run={"dir": sys.argv[2]}, federation={"clients": 3}, secagg={"enabled": True})
nodes = [11, 22, 33]
contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 3}, state=RecordDict(),
                       run_config=config.to_flat(cfg)) for i, n in enumerate(nodes)}
arrays = ArrayRecord({"w": Array(np.zeros(6, np.float32))})
stages = []

class Grid:
    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, stage = msg.metadata.dst_node_id, str(msg.content["config"][STAGE])
            if stage == "collect":
                update = LocalUpdate({"w": np.full(6, 0.5, np.float32)}, 2.0, {}, {"name": str(node)})
                reply = handle_stage(msg, contexts[node], lambda m: update)
            else:
                reply = handle_train(msg, contexts[node])
                stages.append((stage, [m for m in HEAVY if m in sys.modules]))
            assert not reply.has_error(), reply.error.reason
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies

enc = Encoding(bits=24, clip=1.0, max_weight=10.0, n_max=3)
out = secure_train(Grid(), nodes, 1, arrays, enc, degree=2, threshold=2, timeout=10)
assert out.aborted is None or out.aborted == "", out.aborted
assert np.allclose(out.arrays["w"].numpy(), 0.5, atol=1e-4), out.arrays["w"].numpy()
print(stages)
assert {s for s, _ in stages} == {"identify", "graph", "advertise", "share", "consistency", "unmask"} and all(not heavy for _, heavy in stages), stages
"""


def test_secagg_key_stages_import_no_torch_or_model(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-c", KEY_STAGES_CHILD, str(ROOT / "simulations" / "tiny.toml"),
                          str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "advertise" in res.stdout


# ---- a deployed client's model messages --------------------------------------------------
def _deployed(tmp_path, rows):
    """(config, node config) of a deployed client holding ``rows`` in its own data file."""
    write_data(tmp_path / "data.jsonl", rows)
    node = {"fedtune-client": "clinic-a", "data-file": str(tmp_path / "data.jsonl"), "budget": 8.0,
            "state-dir": str(tmp_path / "state"), "model-cache": "", "allow-seeded": False,
            "policy-reveal-losses": True}  # its operator reports held-out losses (the tests compare them)
    return tiny_config(run={"dir": str(tmp_path / "runs")}), node


def _rows(n, tag=""):
    return [{"prompt": f"Q{i}{tag}:", "completion": f" answer {i * 7} {tag}"} for i in range(n)]



def _context_of(cfg, node):
    from flwr.app import Context, RecordDict

    from fedtune import config as config_mod

    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=config_mod.to_flat(cfg))


def _evaluate(cfg, node, initial):
    """The evaluate reply's metrics, less its timing."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedtune.client import handle_evaluate

    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.EVALUATE)
    reply = handle_evaluate(msg, _context_of(cfg, node))
    assert not reply.has_error(), reply.error.reason
    return {k: v for k, v in reply.content["metrics"].items() if k != "eval-seconds"}


def test_a_deployed_client_caches_its_tokenized_examples_and_notices_new_data(tmp_path, monkeypatch, task_identity,
                                                                              tiny_path):
    import fedtune.client.setup
    import fedtune.data
    from fedtune.deploy.node import data_config
    from fedtune.model import load_tokenizer
    from fedtune.server import initial_adapter

    cfg, node = _deployed(tmp_path, _rows(30))
    initial = initial_adapter(cfg, tiny_path)
    monkeypatch.setattr(fedtune.client.setup, "_MODELS", {})  # a fresh process: no model, no data in memory
    monkeypatch.setattr(fedtune.client.setup, "_DATA", {})
    first = _evaluate(cfg, node, initial)
    cache = tmp_path / "state" / "cache" / "examples.npz"
    assert cache.is_file() and (cache.stat().st_mode & 0o777) == 0o600  # derived from private data
    fedtune.client.setup._DATA.clear()
    fedtune.client.setup._MODELS.clear()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached examples were tokenized again")

    monkeypatch.setattr(fedtune.data, "client_examples", no_tokenizing)
    assert _evaluate(cfg, node, initial) == first
    s = fedtune.client.setup.setup(_context_of(cfg, node))
    assert s.m._tokenizer is None  # nor was the tokenizer loaded
    monkeypatch.undo()
    fresh = fedtune.data.client_examples(data_config(cfg, node["data-file"]), 0, load_tokenizer(tiny_path))
    for cached, computed in zip((s.train, s.heldout), fresh):
        assert [x.tolist() for x in cached.ids] == [x.tolist() for x in computed.ids]
        assert cached.starts == computed.starts
    assert s.pad_id == load_tokenizer(tiny_path).pad_token_id

    def next_message():  # a fresh process: nothing read or tokenized in memory
        fedtune.client.setup._DATA.clear()
        fedtune.data.load_records.cache_clear()
        fedtune.data._client_splits.cache_clear()

    write_data(tmp_path / "data.jsonl", _rows(30, tag="new"))  # same file, new records: the cache is stale
    next_message()
    assert _evaluate(cfg, node, initial)["eval-loss-sum"] != first["eval-loss-sum"]
    cache.write_bytes(b"damaged")  # an unreadable cache is recomputed, not trusted
    next_message()
    assert _evaluate(cfg, node, initial)["num-examples"] == first["num-examples"]
    (tmp_path / "data.jsonl").unlink()  # a cache does not stand in for a data file that is gone
    next_message()
    with pytest.raises(AssertionError, match="data.jsonl not found"):
        _evaluate(cfg, node, initial)


# Each message runs in a fresh process: model messages import what they use and no more.
# The data libraries (datasets, flwr_datasets and their pandas, matplotlib, seaborn) load
# records, which the cached examples make unnecessary; evaluation needs no Opacus. At exit
# the garbage collector is spared the imported objects (frozen).
MODEL_MESSAGES_CHILD = r"""
import atexit, gc, json, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count()))  # runs after the ClientApp's hooks
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
import client.client_app
from fedtune.client import handle_evaluate, handle_train

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
run_config, node_config = json.loads(sys.argv[1]), json.loads(sys.argv[2])
initial = {k: Array(v) for k, v in np.load(sys.argv[3]).items()}
ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
watched = ("datasets", "flwr_datasets", "pandas", "matplotlib", "seaborn", "opacus")
imported = {}
for kind, handler in (("evaluate", handle_evaluate), ("train", handle_train)):
    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=getattr(MessageType, kind.upper()))
    reply = handler(msg, ctx)
    assert not reply.has_error(), reply.error.reason
    imported[kind] = [m for m in watched if m in sys.modules]
print(json.dumps(imported))
"""


def test_model_messages_in_a_fresh_process_import_no_data_libraries(tmp_path, task_identity, tiny_path):
    import json
    import subprocess
    import sys

    import numpy as np

    from fedtune import config as config_mod
    from fedtune.server import initial_adapter
    from tests.conftest import ROOT

    cfg, node = _deployed(tmp_path, _rows(30))
    initial = initial_adapter(cfg, tiny_path)
    _evaluate(cfg, node, initial)  # the client's first message caches its examples
    np.savez(tmp_path / "initial.npz", **{k: v.numpy() for k, v in initial.items()})
    res = subprocess.run([sys.executable, "-c", MODEL_MESSAGES_CHILD, json.dumps(config_mod.to_flat(cfg)),
                          json.dumps(node), str(tmp_path / "initial.npz")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    *_, imported, frozen = res.stdout.strip().splitlines()
    assert json.loads(imported) == {"evaluate": [], "train": ["opacus"]}, imported
    assert int(frozen.split(":")[1]) > 100_000, frozen


def test_run_gives_up_on_a_server_that_stays_unreachable(fed, monkeypatch):
    """A server that dies mid-run (no status for lost_after seconds) ends `fedtune run` with
    the command that resumes it, instead of polling forever."""
    import subprocess

    from fedtune.deploy import launch
    from fedtune.simulate import RunFailed

    class Lost:
        def __init__(self, *args):
            pass

        def submit(self, *args):
            return "7"

        def stream_logs(self, *args):
            return subprocess.Popen(["sleep", "30"], start_new_session=True)

        def status(self, run_id):
            return "unknown"

    root = fed[0]
    monkeypatch.setattr(launch, "Control", Lost)
    monkeypatch.setattr(launch, "_wait_for_server", lambda address: None)
    with pytest.raises(RunFailed, match=r"lost the server .* fedtune run --resume .*runs"):
        launch.run(str(root / "server.toml"), insecure=False, poll=0.01, lost_after=0.2)


def test_a_deployed_client_reads_its_file_whatever_the_runs_round_floor(tmp_path, tiny_path):
    """The client's own data config is one client's file: the run's federation.min_clients and
    client_dp.min_clients (for the whole federation) must not make it invalid."""
    from fedtune.deploy.node import data_config

    cfg, node = _deployed(tmp_path, _rows(12))
    cfg = cfg.replace(federation={"min_clients": 3})
    assert data_config(cfg, node["data-file"]).federation.clients == 1
