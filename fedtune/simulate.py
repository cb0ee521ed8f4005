"""`fedtune simulate`: run the fedtune Flower app through Flower's simulation engine.

It does what `flwr run .` does, without its pitfalls: a private SuperLink in simulation
mode (own FLWR_HOME, own port, runtime dependency installation off, stopped by process
id, with every process it started), the run submitted with `flwr run`, logs streamed to
the run folder, and the run's real status read back (`flwr run` exits 0 on a failed run).
Before anything starts, the config, model and data are checked, so mistakes fail in
seconds with one line, not at round 5.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


from fedtune import config as config_mod
from fedtune.driver import CONNECTION, RunFailed, app_dir, stop_tree  # noqa: F401 (RunFailed, app_dir: public here too)
from fedtune.errors import FedtuneError
from fedtune.privacy import check_affordable, make_plan
from fedtune.privacy.user_level import dataset_units
from fedtune.report import summarize, write_summary
from fedtune.runfolder import (
    atomic_write_text, is_run_dir, new_run_dir, read_json, update_run_file,
)

# ---- checks before anything starts ------------------------------------------------------
def preflight(cfg: config_mod.Config) -> dict[str, tuple[int, int]]:
    """Fail fast on a bad model, data or device; returns each client's (train, held-out) size."""
    import torch

    from fedtune.data import client_examples, client_name  # lazy: torch
    from fedtune.model import add_lora, load_base_model, load_tokenizer, resolve_device, resolve_model  # lazy: torch

    resolve_device(cfg.model.device)
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tokenizer = load_tokenizer(path)
    add_lora(load_base_model(path, torch.device("cpu")), cfg, seed=cfg.run.seed)  # weights and LoRA targets load
    from fedtune.privacy.client_level import make_server_plan  # lazy: numpy (`fedtune` start-up)

    sizes = {}
    for index in range(cfg.num_clients):
        train, heldout = client_examples(cfg, index, tokenizer)
        name = client_name(cfg, index)
        sizes[name] = (len(train), len(heldout))
        check_affordable(make_plan(cfg, dataset_units(cfg, train)), name, "privacy.budget")
        if cfg.secagg.enabled and len(train) > cfg.secagg.max_weight:
            raise FedtuneError(f"{name} has {len(train)} training records, above secagg.max_weight="
                               f"{cfg.secagg.max_weight:g} (the public bound on a client's weight); raise it")
    if cfg.client_dp.enabled:
        check_affordable(make_server_plan(cfg), "the federation", "client_dp.budget")
    return sizes


def simulation_resources(cfg: config_mod.Config) -> dict[str, object]:
    """Flower's federation config: one simulated SuperNode per client, CPU/GPU shares."""
    import torch

    total = cfg.simulation.total_cpus or os.cpu_count() or 1
    # At least client_cpus each; cores that would sit idle (fewer clients than cores) are shared out.
    per_client = min(total, max(cfg.simulation.client_cpus, total // cfg.num_clients))
    gpus = cfg.simulation.client_gpus
    if gpus < 0:  # auto: share every visible GPU among the clients that run at once
        n_gpus = torch.cuda.device_count() if cfg.model.device != "cpu" else 0
        parallel = max(1, min(cfg.num_clients, total // per_client))
        gpus = min(1.0, n_gpus / parallel) if n_gpus else 0.0
    return {
        "num-supernodes": cfg.num_clients,
        "client-resources-num-cpus": per_client,
        "client-resources-num-gpus": float(gpus),
        "init-args-num-cpus": total,
    }


# ---- a private SuperLink ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalSuperLink:
    """A SuperLink in simulation mode that belongs to one fedtune command."""

    def __init__(self, home: Path, workdir: Path, log_file: Path) -> None:
        self.home, self.workdir, self.log_file = home, workdir, log_file
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        bindir = str(Path(sys.executable).parent)  # Flower starts its helpers by name from PATH
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def __enter__(self) -> LocalSuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        ))
        exe = shutil.which("flower-superlink", path=self.env["PATH"])
        if exe is None:
            raise FedtuneError("flower-superlink not found; install fedtune's dependencies (make install)")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
                 "--port", str(self.port), "--database", str(self.home / "state.db"),
                 "--disable-runtime-dependency-installation"],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:  # an interrupt at start-up too: __exit__ will not run
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunFailed(f"the Flower SuperLink exited at start-up:\n{_tail(self.log_file)}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RunFailed(f"the Flower SuperLink did not start within {timeout:.0f} s:\n{_tail(self.log_file)}")

    def _flwr(self) -> str:
        return shutil.which("flwr", path=self.env["PATH"]) or "flwr"

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([self._flwr(), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self, app: Path, run_config: Path, federation: dict[str, object]) -> str:
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in federation.items())
        res = self.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", str(run_config),
                        "--federation-config", fed)
        try:
            payload = json.loads(res.stdout)
        except json.JSONDecodeError:
            payload = {}
        if res.returncode != 0 or not payload.get("success"):
            raise RunFailed(f"flwr run could not start the run:\n{(res.stdout + res.stderr).strip()[-2000:]}")
        return str(payload["run-id"])

    def stream_logs(self, run_id: str, path: Path) -> subprocess.Popen:
        fh = open(path, "ab")
        try:
            return subprocess.Popen([self._flwr(), "log", run_id, CONNECTION, "--stream"],
                                    env=self.env, cwd=self.workdir, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        finally:
            fh.close()

    def status(self, run_id: str) -> str:
        res = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except json.JSONDecodeError:
            return "unknown"
        return runs[0].get("status", "unknown") if runs else "unknown"

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the SuperLink and every process it started (SuperExec, simulation, Ray)."""
        if self.proc is None:
            return
        stop_tree(self.proc)
        self.proc = None


# ---- one simulated run ---------------------------------------------------------------------
@dataclass
class SimulationResult:
    run_dir: Path
    status: str
    summary: dict


def run_simulation(cfg: config_mod.Config, run_dir: Path, link: LocalSuperLink, show) -> SimulationResult:
    """Submit one run to ``link``, follow it to the end, return its outcome."""
    cfg = cfg.replace(run={"dir": str(run_dir)})
    atomic_write_text(run_dir / "config.toml", config_mod.dump_toml(cfg))  # also the run config Flower gets
    update_run_file(run_dir, status="submitted")
    run_id = link.submit(app_dir(), run_dir / "config.toml", simulation_resources(cfg))
    update_run_file(run_dir, flwr_run_id=run_id)
    logs = link.stream_logs(run_id, run_dir / "flower.log")
    try:
        show(run_dir, cfg, logs)  # returns when the log stream ends (the run finished)
    except KeyboardInterrupt:
        update_run_file(run_dir, status="interrupted")
        raise
    finally:
        if logs.poll() is None:
            logs.terminate()
            logs.wait(timeout=10)
    status = "unknown"
    for _ in range(20):  # the status can trail the end of the log stream by a moment
        status = link.status(run_id)
        if status.startswith("finished"):
            break
        time.sleep(0.5)
    run = read_json(run_dir / "run.json") if is_run_dir(run_dir) else {}
    if status != "finished:completed" or run.get("status") != "completed":
        error = run.get("error") or _tail(run_dir / "flower.log", 25)
        raise RunFailed(f"the run did not complete (Flower status {status}); see {run_dir}/flower.log\n{error}")
    return SimulationResult(run_dir, status, summarize(run_dir))


BASELINES = {
    "no-dp": ("same federation without DP (what DP costs)", {"privacy": {"dp": False}}),
    "centralized": ("one client holding all training data (what federation costs)", {"federation": {"mode": "centralized"}}),
    "local-only": ("each client trains alone, no aggregation (what federation gains)", {"federation": {"mode": "local"}}),
}


def variant(cfg: config_mod.Config, baseline: str) -> config_mod.Config:
    """The baseline's config: no personalization, and no server optimizer where nothing is averaged."""
    change = {**BASELINES[baseline][1], "personalize": {"method": "none"}}
    if baseline == "local-only":
        change["federation"] = {**change["federation"], "server_optimizer": "none"}
    return cfg.replace(**change, run={"name": f"{cfg.run.name}-{baseline}"})


def simulate(cfg: config_mod.Config, baselines: list[str], show, announce=None) -> Path:
    """Run the configured simulation (then each baseline, then personalization); returns its run folder.

    ``show(run_dir, cfg, log_process)`` follows a run; ``announce(cfg, sizes)`` hears the
    checked plan before anything starts."""
    app_dir()
    sizes = preflight(cfg)
    for b in baselines:
        preflight(variant(cfg, b))
    if announce is not None:
        announce(cfg, sizes)
    run_dir = new_run_dir(cfg.run.output, cfg.run.name)
    with LocalSuperLink(run_dir / ".flower", run_dir, run_dir / "superlink.log") as link:
        main = run_simulation(cfg, run_dir, link, show)
        if baselines:
            rows = [_row("this run", "as configured", main.summary)]
            for name in baselines:
                sub = run_dir / "baselines" / name
                sub.mkdir(parents=True)
                rows.append(_row(name, BASELINES[name][0], run_simulation(variant(cfg, name), sub, link, show).summary))
            write_summary(run_dir, rows)
    shutil.rmtree(run_dir / ".flower", ignore_errors=True)  # the private SuperLink's state
    if cfg.personalize.method != "none":
        from fedtune.personalize import personalize  # lazy: torch, flwr

        personalize(run_dir)
    return run_dir


def _row(label: str, what: str, s: dict) -> dict:
    eps = [c.get("epsilon") for c in s["clients"] if c.get("epsilon") is not None]
    return {"label": label, "what": what, "final_perplexity": s["final_perplexity"],
            "relative_change": s["relative_change"], "epsilon": max(eps) if eps else None}
