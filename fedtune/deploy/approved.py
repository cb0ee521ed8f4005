"""Only approved code runs on a deployed client.

A run's app (Flower's FAB) is whatever its submitter built; fedtune's library is not in it
(pyproject ``fab-include``), so the DP-SGD, the budget check and the ledger are the client's
installed code. The app's own wiring could still replace them once imported, so a client
runs an app only if its operator listed the app's hash (SHA-256 of the FAB, Flower's
``fab_hash``) in client.toml's ``apps``. The check runs in the ClientApp process before the
FAB is installed or any of its code imported: ``fedtune client start`` puts a
``flwr-clientapp`` of its own first on the SuperNode's PATH, which wraps Flower's with it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

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


def wrapper_dir(state: str | Path) -> Path:
    """A folder holding this client's ``flwr-clientapp`` (first on the SuperNode's PATH)."""
    folder = Path(state) / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    body = (f"#!{sys.executable}\nimport sys\nfrom fedtune.deploy.approved import clientapp_main\n"
            "sys.exit(clientapp_main())\n")
    if not script.is_file() or script.read_text() != body:
        tmp = folder / ".flwr-clientapp.tmp"
        tmp.write_text(body)
        tmp.chmod(0o755)
        os.replace(tmp, script)
    return folder


def clientapp_main() -> int | None:
    """Flower's ``flwr-clientapp``, refusing (an error reply, nothing installed) an app not approved."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    approved = [h for h in os.environ.get(APPS_ENV, "").split(",") if h]
    who = os.environ.get(NAME_ENV, "?")
    install = runtime.install_from_fab

    def install_if_approved(content: bytes, *args, **kwargs):
        check_fab(content, approved, who)
        return install(content, *args, **kwargs)

    runtime.install_from_fab = install_if_approved
    return flwr_clientapp()


def approve(config_path: str | Path, app: str) -> str:
    """Add ``app`` (a hash, or an app folder to hash) to client.toml's ``apps``; the hash."""
    from fedtune.deploy.settings import load_client

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
