"""The run folder: where a run's config, metrics, ledgers, adapters and report live.

Every file is written whole or not at all (temp file + fsync + rename), and JSON-lines
files are appended one fsync'ed line at a time, so a crash never leaves half a file.

    <run>/run.json              status, versions, timings; each (re)start of the ServerApp
                                (flwr_run_ids, resumed_from_round: the last completed round
                                a restart continued from)
    <run>/config.toml           the resolved config
    <run>/progress.json         where the run is (for progress displays)
    <run>/metrics.jsonl         one line per client per phase per round, plus round totals
    <run>/metrics-interrupted.jsonl  rows of rounds a crash cut short (moved there on resume)
    <run>/clients/<name>/       each client's ledger.jsonl and status.json (simulation), the
                                adapter part it keeps (kept_adapter.safetensors, fedsa) and its
                                personalized adapter (personalized/, PEFT folder), its last
                                release (release.safetensors, for a resend after a server crash)
    <run>/adapters/round-NNN/   the global adapter after round N (PEFT folder)
    <run>/adapters/global/      the final global adapter
    <run>/summary.md, summary.json, perplexity.png
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedtune import names
from fedtune.errors import FedtuneError

RUN_FILE = "run.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; run files are ordinary readable files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a crash


def fsync_dir(folder: str | Path) -> None:
    """Make a folder's entries (a new file, a rename) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while line:
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | Path, busy: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block; the OS drops it
    when the holder dies. With ``busy``, do not wait: a held lock is a FedtuneError saying it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise FedtuneError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise FedtuneError(f"{path}:{line_no}: not valid JSON; the file is damaged") from None
    return rows


# ---- locations -----------------------------------------------------------------------
def run_dir_for(cfg, flwr_run_id: int | str) -> Path:
    """The run folder: ``run.dir`` when set (``fedtune simulate`` sets it), else one per
    Flower run under ``run.output`` (as with a plain ``flwr run .``)."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser()
    return Path(cfg.run.output).expanduser().resolve() / f"{cfg.run.name}-flwr-{flwr_run_id}"


def new_run_dir(output: str | Path, name: str) -> Path:
    """A fresh, uniquely named run folder under ``output``."""
    output = Path(output).expanduser().resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedtuneError(f"cannot create the output folder {output} ({exc.strerror}); choose another with --output") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = output / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FedtuneError(f"cannot find a free run folder name under {output}")


def client_dir(run_dir: str | Path, client: str) -> Path:
    return Path(run_dir) / "clients" / names.check(client, "client name")


def ledger_path(run_dir: str | Path, client: str) -> Path:
    return client_dir(run_dir, client) / "ledger.jsonl"


def kept_adapter_path(run_dir: str | Path, client: str) -> Path:
    """Adapter tensors a client never sends (fedsa: its lora_B), kept between rounds."""
    return client_dir(run_dir, client) / "kept_adapter.safetensors"


def release_path(run_dir: str | Path, client: str) -> Path:
    """A client's last release (the update it sent, already DP-noised), for a resend."""
    return client_dir(run_dir, client) / "release.safetensors"


def server_ledger_path(run_dir: str | Path) -> Path:
    """The server's client-level DP ledger."""
    return Path(run_dir) / "server" / "ledger.jsonl"


def adapter_dir(run_dir: str | Path, label: str) -> Path:
    return Path(run_dir) / "adapters" / names.check(label, "adapter label")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def versions() -> dict[str, str]:
    """Versions of the packages a run's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fedtune", "flwr", "torch", "transformers", "peft", "opacus", "dp-accounting"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def update_run_file(run_dir: str | Path, **fields: Any) -> dict:
    """Merge ``fields`` into run.json (atomically)."""
    path = Path(run_dir) / RUN_FILE
    data = read_json(path) if path.exists() else {}
    data.update(fields)
    write_json(path, data)
    return data
