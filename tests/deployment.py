"""Helpers for tests that deploy on loopback: a federation folder (certs, keys, data,
configs) and real `fedtune server start` / `fedtune client start` processes, each in its own
process group so a test can kill one (or all) by process group id."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedtune.runfolder import read_jsonl

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def write_data(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@functools.cache
def approved_app() -> str:
    """The hash of this checkout's app, which the test clients approve."""
    from fedtune.deploy.approved import app_hash

    return app_hash(ROOT)


class Federation:
    """A loopback deployment under ``root``: server config, client configs, processes."""

    def __init__(self, root: Path, clients: list[str], run: dict[str, dict], budget: float = 8.0) -> None:
        self.root, self.clients = root, clients
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cli("certs", "--host", "localhost", "--host", "127.0.0.1", "--out", str(root / "certs")),
                       check=True, capture_output=True, env=self.env)
        subprocess.run(cli("keys", *clients, "--out", str(root / "keys")), check=True, capture_output=True, env=self.env)
        tables = {"server": {"host": "127.0.0.1", "port": self.port, "names": ["localhost"], "certs": "certs",
                             "keys": "keys", "state": "state/server", "output": "runs"}, **run}
        (root / "server.toml").write_text(_toml(tables))
        for name in clients:
            self.client_config(name, budget=budget)

    def client_config(self, label: str, **changes) -> Path:
        """``<label>.toml``: client ``label`` with its own key, data and state, then ``changes``."""
        c = {"name": label, "superlink": f"localhost:{self.port}", "ca": "certs/ca.crt", "key": f"keys/{label}",
             "data": f"data/{label}.jsonl", "budget": 8.0, "state": f"state/{label}", "port": free_port(),
             "allow_seeded": True, "apps": [approved_app()], **changes}
        path = self.root / f"{label}.toml"
        # These operators report held-out losses (the tests compare them); the default withholds them.
        path.write_text(_toml({"client": c, "policy": {"reveal_losses": True}}))
        return path

    def start(self, label: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{label}.log", "ab")
        proc = subprocess.Popen(cli(*args), cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[label] = proc
        return proc

    def start_server(self) -> subprocess.Popen:
        seen = self.log("server").count("server listening")  # a restart appends to the same log
        proc = self.start("server", "server", "start", str(self.root / "server.toml"))
        wait_for(lambda: self.log("server").count("server listening") > seen or proc.poll() is not None, 90,
                 "server start")
        assert proc.poll() is None, self.log("server")
        return proc

    def start_client(self, name: str, *extra: str) -> subprocess.Popen:
        return self.start(name, "client", "start", str(self.root / f"{name}.toml"), *extra)

    def log(self, label: str) -> str:
        path = self.root / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, label: str, sig: int = signal.SIGKILL) -> None:
        """Kill a command with everything it started (its process group)."""
        import psutil

        proc = self.procs.pop(label, None)
        if proc is None:
            return
        try:  # Flower starts its SuperExec in a session of its own: kill the whole tree too
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)

    def stop_all(self) -> None:
        for label in list(self.procs):
            self.kill(label)

    def run_dir(self) -> Path:
        (folder,) = [p for p in (self.root / "runs").iterdir() if p.is_dir()]
        return folder

    def train_rows(self, run_dir: Path) -> list[dict]:
        return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train"]


def wait_for(check, timeout: float, what: str, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _toml(tables: dict[str, dict]) -> str:
    from fedtune.config import toml_value

    out = []
    for name, body in tables.items():
        out.append(f"[{name}]")
        for k, v in body.items():
            out.append(f"{k} = [{', '.join(toml_value(x) for x in v)}]" if isinstance(v, list) else f"{k} = {toml_value(v)}")
        out.append("")
    return "\n".join(out)
