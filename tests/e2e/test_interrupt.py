"""Killed from outside, nothing is left running: `fedtune simulate` sent SIGTERM stops the
SuperLink it started (with Flower's helpers), and a pytest run sent SIGTERM stops every
process its tests started, even one orphaned by a SIGKILL-ed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from fedtune.runfolder import read_json
from tests.conftest import ROOT
from tests.deployment import wait_for

pytestmark = pytest.mark.slow


def _processes_mentioning(marker: str) -> list[dict]:
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(p.info["cmdline"] or []) or marker in p.cwd():
                left.append(p.info)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return left


def test_simulate_killed_with_sigterm_stops_its_superlink(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "tiny.toml"), "--quiet",
         "--output", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        # The run is submitted once flower.log exists: SuperLink, SuperExec and ServerApp are up.
        wait_for(lambda: any(tmp_path.glob("*/flower.log")) or proc.poll() is not None, 300, "the run to start")
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert _processes_mentioning(str(run_dir))  # the check below can see a SuperLink
        proc.send_signal(signal.SIGTERM)  # to the command only, not its process group
        assert proc.wait(timeout=60) == 130, proc.stdout.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert read_json(run_dir / "run.json")["status"] == "interrupted"
    wait_for(lambda: not _processes_mentioning(str(run_dir)), 30, "the run's processes to stop")


INNER_CONFTEST = "from tests.conftest import *  # noqa: F401,F403  (the suite's hooks)\n"
INNER_TEST = """\
import subprocess, sys, time
from pathlib import Path
from fedtune.simulate import LocalSuperLink

def test_leaks(tmp_path):
    here = Path(__file__).parent
    LocalSuperLink(here / "home", here, here / "superlink.log").__enter__()  # never stopped by the test
    # A parent that starts a detached child, SIGKILL-ed by subprocess.run on the interrupt.
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
    child += repr(str(here)) + "], start_new_session=True); time.sleep(600)"
    (here / "ready").touch()
    subprocess.run([sys.executable, "-c", child, str(here)], timeout=600)
"""


def test_a_pytest_run_killed_with_sigterm_leaves_no_process(tmp_path):
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 120, "the inner test")
        time.sleep(1.0)
        assert len(_processes_mentioning(str(tmp_path))) >= 3, proc.stdout.read().decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: not _processes_mentioning(str(tmp_path)), 30, "the inner run's processes to stop")
