"""The coordinator's ServerApp main: one federated run, recorded in its run folder.

It takes the run folder's lock, checks a resumed folder (fedtune.server.resume), writes
run.json and config.toml, runs the rounds (fedtune.server.loop) and writes the summary,
also when the run fails.
"""

from __future__ import annotations

import traceback
from logging import WARNING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune import config as config_mod
from fedtune.report import write_summary
from fedtune.runfolder import (
    RUN_FILE, atomic_write_text, file_lock, is_run_dir, now, read_json, run_dir_for, update_run_file, versions,
)
from fedtune.server import resume
from fedtune.server.loop import run


def main(grid: Grid, context: Context) -> None:
    """The ServerApp's main: one federated run, recorded in its run folder."""
    cfg = config_mod.from_flat(dict(context.run_config))
    run_dir = run_dir_for(cfg, context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One ServerApp per run folder; the OS drops the lock when it dies, so a killed server's
    # run can be resumed at once and a running one is never run twice.
    with file_lock(run_dir / resume.SERVER_LOCK, busy=f"another ServerApp is running the run in {run_dir}"):
        before = read_json(run_dir / RUN_FILE) if is_run_dir(run_dir) else {}
        done = resume.check(run_dir, cfg) if before else -1  # FedtuneError: leaves the folder as it was
        atomic_write_text(run_dir / "config.toml", config_mod.dump_toml(cfg))
        starts = before.get("starts", []) + [{"flwr_run_id": str(context.run_id), "after_round": done, "time": now()}]
        restarted = {"resumed_from_round": done} if len(starts) > 1 else {}
        update_run_file(run_dir, status="running", flwr_run_id=str(context.run_id),
                        flwr_run_ids=[st["flwr_run_id"] for st in starts], starts=starts,
                        started=before.get("started", now()), mode=cfg.federation.mode, dp=cfg.privacy.dp,
                        versions=versions(), **restarted,
                        **{k: None for k in ("finished", "error", "traceback") if k in before})
        if cfg.privacy.seed >= 0:  # said where anyone looks: run.json, the server's log, the summary
            warning = (f"privacy.seed={cfg.privacy.seed}: DP noise, sampling and secure-aggregation rounding are "
                       "reproducible (tests only); the run's DP guarantee does NOT hold")
            update_run_file(run_dir, seeded=True, warning=warning)
            log(WARNING, "fedtune: %s", warning)
        try:
            run(grid, cfg, run_dir)
        except BaseException as exc:
            update_run_file(run_dir, status="failed", finished=now(), error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc())
            try:  # who failed and why, in summary.md too (run.json has the error in any case)
                write_summary(run_dir)
            except Exception:  # noqa: BLE001 - a run that failed before its first row has no summary
                pass
            raise
        update_run_file(run_dir, status="completed", finished=now())
        write_summary(run_dir)
