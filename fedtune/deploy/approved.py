"""Only approved code runs on a deployed client.

A run's app (Flower's FAB) is whatever its submitter built; fedtune's library is not in it
(pyproject ``fab-include``), so the DP-SGD, the budget check and the ledger are the client's
installed code. A deployed client's messages run in its worker (fedtune.deploy.worker),
which never installs or imports the FAB; it still answers a run only if the operator listed
the app's hash (SHA-256 of the FAB, Flower's ``fab_hash``) in client.toml's ``apps``: the
worker's ``check_app`` calls ``check_fab`` before any handler runs.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from fedtune.deploy.settings import load_client
from fedtune.errors import FedtuneError

APPS_ENV = "FEDTUNE_APPROVED_APPS"  # comma-separated hashes, set by `fedtune client start`
NAME_ENV = "FEDTUNE_CLIENT_NAME"
HASH = re.compile(r"^[0-9a-f]{64}$")


def app_hash(app: str | Path) -> str:
    """The hash Flower gives the FAB built from the app folder ``app``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app))).hexdigest()


def check_fab(content: bytes, approved: list[str], who: str) -> None:
    digest = hashlib.sha256(content).hexdigest()
    if digest not in approved:
        raise FedtuneError(f"client {who} refuses the run: its app sha256 {digest} is not approved in client.toml "
                           f"(client.apps); the operator approves it with: fedtune client approve CLIENT_TOML {digest}")


def approve(config_path: str | Path, app: str) -> str:
    """Add ``app`` (a hash, or an app folder to hash) to client.toml's ``apps``; the hash."""
    digest = app if HASH.match(app) else app_hash(app) if Path(app).is_dir() else ""
    if not digest:
        raise FedtuneError(f"{app} is neither an app hash (64 hex digits, as `fedtune run` prints it) nor an app folder")
    path = Path(config_path).expanduser()
    s = load_client(path)  # a valid file before we touch it
    if digest in s.apps:
        return digest
    apps = ", ".join(f'"{h}"' for h in [*s.apps, digest])
    text = path.read_text()
    line = re.compile(r"^apps\s*=\s*\[[^\]\n]*\][^\n]*$", re.M)
    if s.apps and not line.search(text):
        raise FedtuneError(f"{path}: client.apps spans several lines; add \"{digest}\" to it by hand")
    text = (line.sub(f"apps = [{apps}]", text, count=1) if line.search(text)
            else re.sub(r"^\[client\][^\n]*$", lambda m: f"{m.group(0)}\napps = [{apps}]", text, count=1, flags=re.M))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if digest not in load_client(path).apps:
        raise FedtuneError(f"{path}: could not add the app hash to client.apps; add \"{digest}\" by hand")
    return digest
