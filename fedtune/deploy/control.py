"""Talking to a deployed SuperLink through Flower's CLI: register client keys, submit a
run, read its real status (``flwr run`` exits 0 on a failed run) and stream its log.

Each command gets a private FLWR_HOME whose config.toml names one connection, with the
CA that signed the server's certificate (or ``insecure = true`` when asked for).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fedtune.driver import CONNECTION, RunFailed, flower_env, tool
from fedtune.errors import FedtuneError
from fedtune.runfolder import atomic_write_text


class Control:
    """The SuperLink at ``address`` seen through ``flwr``; ``ca`` None means no TLS."""

    def __init__(self, home: Path, address: str, ca: str | None) -> None:
        self.home, self.address = Path(home), address
        self.env = flower_env(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if ca is None else f"root-certificates = {json.dumps(str(ca))}"
        atomic_write_text(self.home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address}"\n{security}\n'))

    def flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([tool("flwr", self.env), *args], env=self.env, cwd=cwd or self.home,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def register(self, public_key: Path) -> str:
        """Register one client's public key; a key already registered is fine (a restart)."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", public_key.stem)
        out = (res.stdout + res.stderr).strip()
        if res.returncode != 0 and "already" not in out.lower():
            raise FedtuneError(f"could not register {public_key} with the SuperLink at {self.address}: "
                               f"{out.splitlines()[-1] if out else 'no output'}")
        return out

    def submit(self, app: Path, run_config: Path) -> str:
        res = self.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", str(run_config), cwd=app)
        try:
            payload = json.loads(res.stdout)
        except json.JSONDecodeError:
            payload = {}
        if res.returncode != 0 or not payload.get("success"):
            raise RunFailed(f"flwr run could not start the run on {self.address}:\n"
                            f"{(res.stdout + res.stderr).strip()[-2000:]}")
        return str(payload["run-id"])

    def status(self, run_id: str) -> str:
        try:
            res = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60)
            runs = json.loads(res.stdout).get("runs", [])
        except (json.JSONDecodeError, subprocess.TimeoutExpired):
            return "unknown"
        return runs[0].get("status", "unknown") if runs else "unknown"

    def stream_logs(self, run_id: str, path: Path) -> subprocess.Popen:
        with open(path, "ab") as fh:
            return subprocess.Popen([tool("flwr", self.env), "log", run_id, CONNECTION, "--stream"], env=self.env,
                                    cwd=self.home, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
