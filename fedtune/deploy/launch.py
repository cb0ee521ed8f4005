"""`fedtune server start`, `fedtune client start` and `fedtune run`.

Each checks everything it can before a process starts (certificates and the names they
carry, keys, the data file, free ports), so a mistake costs one line and exit code 2, not a
SuperNode retrying forever. TLS and SuperNode authentication are on unless ``--insecure``.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedtune import certs
from fedtune import config as config_mod
from fedtune.deploy import approved
from fedtune.deploy.control import Control
from fedtune.deploy.lifetime import open_lifetime
from fedtune.deploy.settings import ClientSettings, load_client, load_server, node_config_arg
from fedtune.deploy.supervisor import READY_FILE, SECRET_FILE, Supervisor, check_paths, supernode_command, worker_command
from fedtune.driver import RunFailed, app_dir, flower_env, stop_tree, tool
from fedtune.errors import FedtuneError
from fedtune.runfolder import atomic_write_text, file_lock, new_run_dir, read_json, update_run_file

REJECTED_RETRY_S = 30.0  # a SuperNode refused this soon is retried: keys are registered just after the server starts
INSECURE_WARNING = ("fedtune: WARNING: --insecure: no TLS and no client authentication; anyone on the network can "
                    "read the updates and join the federation. Use it only on a trusted test network.")


def warn_insecure() -> None:
    print(INSECURE_WARNING, file=sys.stderr)


def check_port(host: str, port: int, what: str) -> None:
    """Fail now, not in Flower's logs, when ``port`` is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a killed one's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FedtuneError(f"{what} port {host}:{port} is not free ({exc.strerror}); stop what uses it "
                               f"or choose another port") from None


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"did not listen on port {port} within {timeout:.0f} s")


def _supervise(proc: subprocess.Popen) -> int:
    """Wait for ``proc``; SIGTERM or Ctrl-C stops it with its children."""
    def stop(signum, frame):
        stop_tree(proc)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_tree(proc)
        return 130


# ---- the server -------------------------------------------------------------------------
def server_command(path: str, insecure: bool) -> tuple[list[str], dict, Control | None, list[Path]]:
    """The SuperLink's command line after every check, its environment, and the keys to register."""
    s, _ = load_server(path)
    certs_dir, state = Path(s.certs), Path(s.state)
    keys: list[Path] = []
    if not insecure:
        ca, cert, key = certs_dir / "ca.crt", certs_dir / "server.pem", certs_dir / "server.key"
        certs.check_server_tls(ca, cert, key, list(s.names))
        if not Path(s.keys).is_dir():
            raise FedtuneError(f"client key folder {s.keys} not found; put clients' .pub files there (server.keys)")
        keys = sorted(Path(s.keys).glob("*.pub"))
        for k in keys:
            certs.check_public_key(k)
    check_port(s.host, s.port, "the SuperLink")
    state.mkdir(parents=True, exist_ok=True)
    env = flower_env(state / "flwr-home")
    if keys:  # the ServerApp admits to a secure round only a name's registered key (fedtune.secagg.roster)
        env["FEDTUNE_CLIENT_KEYS"] = str(Path(s.keys).resolve())
    cmd = [tool("flower-superlink", env), "--host", s.host, "--port", str(s.port),
           "--database", str(state / "superlink.db"), "--isolation", "subprocess",
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
        control = None
    else:
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                "--enable-supernode-auth"]
        control = Control(state / "control-home", s.address, str(ca))
    return cmd, env, control, keys


def start_server(path: str, insecure: bool) -> int:
    cmd, env, control, keys = server_command(path, insecure)
    s, _ = load_server(path)
    if insecure:
        warn_insecure()
    proc = subprocess.Popen(cmd, env=env, cwd=s.state, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(proc, s.host, s.port)
        with ThreadPoolExecutor(max_workers=8) as pool:  # only registered keys may connect; each is a `flwr` process
            list(pool.map(control.register, keys))
    except (RuntimeError, FedtuneError) as exc:
        stop_tree(proc)
        print(f"fedtune: the SuperLink failed: {exc}", file=sys.stderr)
        return 1
    auth = "TLS, SuperNode authentication" if not insecure else "NO TLS, no authentication"
    print(f"fedtune: server listening on {s.host}:{s.port} ({auth}; {len(keys)} client key(s) registered from "
          f"{s.keys}); clients connect to {s.address}", file=sys.stderr, flush=True)
    return _supervise(proc)


def register_key(path: str, public_key: str) -> None:
    """Register one more client's key with a running server."""
    s, _ = load_server(path)
    certs.check_public_key(public_key)
    Control(Path(s.state) / "control-home", s.address, str(Path(s.certs) / "ca.crt")).register(Path(public_key))


# ---- a client -------------------------------------------------------------------------
def check_client(s: ClientSettings, insecure: bool) -> None:
    if not insecure:
        certs.check_ca(s.ca)
        certs.check_client_key(s.key)
    from fedtune.data import load_records  # lazy: datasets, pandas (only `client start` reads data)
    from fedtune.user_data import user_ids  # lazy: beside load_records

    check_paths(s.data, s.model_cache)
    d = config_mod.Config().data
    quiet = logging.getLogger("datasets")  # it logs a traceback for a malformed file; our one line says it
    level, quiet.level = quiet.level, logging.CRITICAL + 1
    try:
        records = load_records(s.data, d.text_field, d.prompt_field, d.completion_field)  # FedtuneError names it
    finally:
        quiet.setLevel(level)
    if s.user_field:  # every record names its person before any run can ask for a round
        user_ids(records, s.user_field, f"data file {s.data}", "client.user_field")
    check_port("127.0.0.1", s.port, "the client's local ClientApp")
    # The data set's lifetime ledger: a damaged one, or this file under another data set's name, stops us here.
    open_lifetime(s.state, s.dataset or s.name, s.data, s.budget, s.policy)


def client_command(path: str, insecure: bool) -> tuple[list[str], dict, ClientSettings]:
    """The SuperNode's command line: Flower's SuperNode through fedtune's launcher
    (fedtune.deploy.supernode); its messages run in fedtune's worker (fedtune.deploy.supervisor)."""
    s = load_client(path)
    check_client(s, insecure)
    Path(s.state).mkdir(parents=True, exist_ok=True)
    env = flower_env(Path(s.state) / "flwr-home")
    # The worker refuses a run whose app hash the operator did not approve (fedtune.deploy.approved).
    env.update({approved.APPS_ENV: ",".join(s.apps), approved.NAME_ENV: s.name})
    cmd = [*supernode_command(s.state, s.heartbeat), "--superlink", s.superlink, "--node-config", node_config_arg(s),
           "--port", str(s.port)]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", s.ca, "--auth-supernode-private-key", s.key]
    return cmd, env, s


def start_client(path: str, insecure: bool) -> int:
    cmd, env, s = client_command(path, insecure)
    if insecure:
        warn_insecure()
    print(f"fedtune: client {s.name} connecting to {s.superlink} (data {s.data}, budget ε={s.budget:g}, "
          f"ledgers in {s.state}/runs)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + REJECTED_RETRY_S
    while True:
        worker = worker_command(s.port, Path(s.state) / SECRET_FILE, s.data, s.model_cache)
        code = Supervisor(cmd, worker, env, s.state, stop_tree, ready=Path(s.state) / READY_FILE).run()
        if code == 0 or code >= 128 or time.monotonic() > deadline:  # done, signalled, or not a start-up refusal
            break
        time.sleep(5.0)  # a server that just started may not have registered our key yet
    if 0 < code < 128:
        print(f"fedtune: client {s.name} stopped (the SuperNode exited with code {code}); if the server at "
              f"{s.superlink} refused it, its key is not registered (send {s.key}.pub to the server operator) or "
              "TLS does not match (--insecure on one side only)", file=sys.stderr)
    return code


# ---- a run ------------------------------------------------------------------------------
def _wait_for_server(address: str, timeout: float = 60.0) -> None:
    """A server started a moment ago may not listen yet: wait a little before giving up."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RunFailed(f"no server answers at {address} after {timeout:.0f} s; start it with "
                                "`fedtune server start`") from None
            time.sleep(1.0)


def _follow(control: Control, run_id: str, logs: subprocess.Popen, poll: float, lost_after: float,
            lost: str) -> str:
    """Wait for the run's end; its Flower status. The log stream ends when the run does: its
    end is the moment to ask (each ask is a `flwr` process, ~1 s of CPU); one ask per ``poll``
    in between notices a lost server (``lost``, after ``lost_after`` seconds without status)."""
    status, lost_since = "unknown", None
    while not status.startswith("finished"):
        if logs.poll() is None:
            try:
                logs.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(poll)
        status = control.status(run_id)
        lost_since = (lost_since or time.monotonic()) if status == "unknown" else None
        if lost_since is not None and time.monotonic() - lost_since > lost_after:
            raise RunFailed(lost)
    return status


def run(path: str, insecure: bool, resume: str | None = None, overrides: dict | None = None,
        poll: float = 10.0, lost_after: float = 300.0) -> Path:
    """Submit the federation's run to the server and follow it to its end; the run folder."""
    s, cfg = load_server(path)
    if overrides:
        cfg = config_mod.load(None, {**config_mod.to_flat(cfg), **overrides})
    if resume:  # the same run: its folder and name; the config may change only where harmless
        from fedtune.server.resume import SERVER_LOCK, check as check_resume, stored_config  # lazy: torch

        run_dir = Path(resume).expanduser().resolve()
        cfg = cfg.replace(run={"dir": str(run_dir), "name": stored_config(run_dir).run.name})
        done = check_resume(run_dir, cfg)
        with file_lock(run_dir / SERVER_LOCK, busy=f"the run in {run_dir} is still running on this server (its "
                                                   "ServerApp holds the lock); stop it before resuming"):
            pass
    else:
        run_dir = new_run_dir(s.output, cfg.run.name)
        cfg = cfg.replace(run={"dir": str(run_dir), "name": run_dir.name})  # clients keep ledgers under this name
        atomic_write_text(run_dir / "config.toml", config_mod.dump_toml(cfg))
    ca = None if insecure else str(Path(s.certs) / "ca.crt")
    if ca is not None:
        certs.check_ca(ca)
    else:
        warn_insecure()
    update_run_file(run_dir, status="submitted", deployment=s.address)
    _wait_for_server(s.address)
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as home:
        control = Control(Path(home), s.address, ca)
        submitted = Path(home) / "run.toml"  # the ServerApp checks it against the run folder's config.toml
        atomic_write_text(submitted, config_mod.dump_toml(cfg))
        app = app_dir()
        digest = approved.app_hash(app)
        print(f"fedtune: app sha256 {digest}; each client runs it only once approved: "
              f"fedtune client approve CLIENT_TOML {digest}", file=sys.stderr, flush=True)
        run_id = control.submit(app, submitted)
        what = f"resuming after round {done}" if resume else "submitted"
        print(f"fedtune: run {run_id} {what} on {s.address}; run folder: {run_dir}", file=sys.stderr, flush=True)
        logs = control.stream_logs(run_id, run_dir / "flower.log")
        try:
            status = _follow(control, run_id, logs, poll, lost_after,
                             f"lost the server at {s.address}: no status of run {run_id} for {lost_after:.0f} s; "
                             f"when it is back, continue with: fedtune run --resume {run_dir}")
        finally:
            stop_tree(logs)
    run = read_json(run_dir / "run.json")
    if status != "finished:completed" or run.get("status") != "completed":
        raise RunFailed(f"the run did not complete (Flower status {status}); see {run_dir}/flower.log; to continue "
                        f"it: fedtune run --resume {run_dir}" + (f"\n{run['error']}" if run.get("error") else ""))
    return run_dir
