"""Driving Flower's processes and command line, for `fedtune simulate` and the deployed
commands alike: the environment Flower's tools run in, finding them, stopping a process
with everything it started, the Flower app folder, and the error of a run that failed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from fedtune.errors import FedtuneError

CONNECTION = "fedtune"  # the one SuperLink connection in each private FLWR_HOME


class RunFailed(Exception):
    """The simulation ran but did not complete (not a config mistake: exit code 1)."""


def app_dir() -> Path:
    """The Flower app (this project's root, holding pyproject.toml, server/ and client/)."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / "pyproject.toml").is_file() and (root / "server").is_dir() and (root / "client").is_dir()):
        raise FedtuneError(
            "fedtune simulate needs the fedtune project folder (pyproject.toml, server/, client/); "
            "install fedtune from a checkout with `make install` (pip install -e .)"
        )
    return root


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's commands: this venv's tools first, no telemetry, no installs."""
    bindir = str(Path(sys.executable).parent)  # Flower starts its helpers by name from PATH
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1"}


def tool(name: str, env: dict[str, str]) -> str:
    exe = shutil.which(name, path=env["PATH"])
    if exe is None:
        raise FedtuneError(f"{name} not found; install fedtune's dependencies (make install)")
    return exe


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and every process it started (Flower's ServerApp/ClientApp children)."""
    try:
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
