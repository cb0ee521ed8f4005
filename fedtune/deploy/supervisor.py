"""`fedtune client start`'s two processes: the SuperNode and fedtune's client worker.

The SuperNode runs in ``--isolation process`` mode: it keeps the server's messages and
serves them on its local Runtime API, where only the holder of a fresh SuperExec secret
(owner-only file in the state folder, new at every start) may take a task. The worker
(fedtune.deploy.worker) is that holder; it starts once the SuperNode is admitted (its
launcher, fedtune.deploy.supernode, writes the ready file), so a node the server turns
away never loads torch. A worker that dies is started again at once; its
messages in flight then fail (the server sees a missing reply) and a paid request asked
again is resent from the release store, never paid twice.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.runfolder import atomic_write_bytes

SECRET_FILE = "superexec.secret"
READY_FILE = "supernode.ready"  # written by the SuperNode when the server admitted it
RESTART_PAUSE_S = 1.0  # between a worker's death and its restart (a crash loop then costs little)


def new_secret(state: str | Path) -> Path:
    """A fresh SuperExec secret, readable by this user only."""
    path = Path(state) / SECRET_FILE
    atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
    return path


def worker_command(port: int, secret: Path, data: str, model_cache: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.deploy.worker", "--runtime-api", f"127.0.0.1:{port}",
            "--secret-file", str(secret), "--data", data, "--model-cache", model_cache]


def check_paths(data: str, model_cache: str) -> None:
    """What the worker needs on disk at every (re)start, else one line naming the fix."""
    if model_cache and not Path(model_cache).is_dir():
        raise FedtuneError(f"model cache folder {model_cache} not found; create it or fix client.model_cache")
    if not Path(data).is_file():
        raise FedtuneError(f"data file {data} is gone; put it back or fix client.data, then start the client again")


def supernode_command(state: str | Path, heartbeat: float) -> list[str]:
    """fedtune's SuperNode launcher (fedtune.deploy.supernode), with what turns the SuperNode's
    own per-message executor off and lets the worker in; Flower's other options follow."""
    return [sys.executable, "-m", "fedtune.deploy.supernode", "--fedtune-heartbeat", f"{heartbeat:g}",
            "--fedtune-ready-file", str(Path(state) / READY_FILE),
            "--isolation", "process", "--superexec-auth-secret-file", str(new_secret(state))]


class Supervisor:
    """Keeps the worker alive while the SuperNode runs; stops both together."""

    def __init__(self, node_cmd: list[str], worker_cmd: list[str], env: dict, cwd: str,
                 stop_tree, log=lambda line: print(line, file=sys.stderr, flush=True), ready: Path | None = None) -> None:
        self.node_cmd, self.worker_cmd, self.env, self.cwd = node_cmd, worker_cmd, env, cwd
        self.stop_tree, self.log, self.ready = stop_tree, log, ready  # ready: start the worker once it exists
        self.node: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.restarts = 0

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in (self.worker, self.node):
            if proc is not None:
                self.stop_tree(proc)

    def run(self, poll: float = 0.2) -> int:
        """Start both; restart the worker whenever it exits; the SuperNode's exit code."""
        def on_signal(signum, frame):
            self.stop()
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        if self.ready is not None:
            self.ready.unlink(missing_ok=True)
        self.node = subprocess.Popen(self.node_cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL)
        try:
            while True:
                code = self.node.poll()
                if code is not None:
                    if self.worker is not None:
                        self.stop_tree(self.worker)
                    return code
                if self.worker is None:
                    if self.ready is None or self.ready.exists():
                        self._start_worker()
                elif self.worker.poll() is not None:
                    if self.worker.returncode == 2:  # a start-up error: it said why; retrying will not help
                        self.stop_tree(self.node)
                        return 2
                    self.log(f"fedtune: the client worker exited with code {self.worker.returncode}; restarting it "
                             "(a message it was handling fails; what it paid for is resent, not paid again)")
                    time.sleep(RESTART_PAUSE_S)
                    self.restarts += 1
                    self._start_worker()
                time.sleep(poll)
        except KeyboardInterrupt:
            self.stop()
            return 130
