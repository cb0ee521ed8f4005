"""The app-hash allowlist's pieces, in process: the check on a FAB's bytes, `fedtune client
approve`, and the wrapper that runs before Flower installs an app."""

from __future__ import annotations

import hashlib
import os

import pytest

from fedtune.cli import main
from fedtune.deploy.approved import APPS_ENV, NAME_ENV, approve, check_fab, wrapper_dir
from fedtune.deploy.settings import load_client
from fedtune.errors import FedtuneError
from tests.conftest import ROOT
from tests.deployment import _toml, approved_app


def _client(tmp_path, **extra):
    path = tmp_path / "client.toml"
    path.write_text("# mine\n" + _toml({"client": {"name": "clinic-a", "data": "data.jsonl", **extra}}))
    return path


def test_an_app_not_listed_is_refused_by_its_bytes(tmp_path):
    fab = b"any app"
    digest = hashlib.sha256(fab).hexdigest()
    with pytest.raises(FedtuneError, match=f"client clinic-a refuses the run: its app sha256 {digest} is not approved"):
        check_fab(fab, [approved_app()], "clinic-a")
    with pytest.raises(FedtuneError, match="not approved"):
        check_fab(fab, [], "clinic-a")  # the empty list approves nothing
    check_fab(fab, [digest], "clinic-a")


def test_approve_adds_the_hash_once_and_keeps_the_rest_of_the_file(tmp_path, capsys):
    path = _client(tmp_path)
    assert main(["client", "approve", str(path)]) == 0  # this checkout's app
    assert load_client(path).apps == [approved_app()] and approved_app() in capsys.readouterr().out
    other = "ab" * 32
    approve(path, other)
    approve(path, other)
    assert load_client(path).apps == [approved_app(), other]
    assert path.read_text().startswith("# mine\n")


def test_a_bad_hash_is_one_line_and_exit_2(tmp_path, capsys):
    path = _client(tmp_path)
    assert main(["client", "approve", str(path), "not-a-hash"]) == 2
    assert "neither an app hash" in capsys.readouterr().err
    path = _client(tmp_path, apps=["abc"])
    assert main(["budget", str(path)]) == 2
    assert "client.apps must list app hashes" in capsys.readouterr().err


def test_the_wrapper_checks_before_flower_installs(tmp_path, monkeypatch):
    """The state folder's flwr-clientapp runs fedtune's check in front of Flower's installer."""
    import flwr.supernode.runtime.run_clientapp as runtime

    import fedtune.deploy.approved as approved

    script = wrapper_dir(tmp_path) / "flwr-clientapp"
    assert os.access(script, os.X_OK) and "clientapp_main" in script.read_text()
    installed = []
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, **kw: installed.append(content))
    monkeypatch.setattr("flwr.supernode.cli.flwr_clientapp", lambda: runtime.install_from_fab(b"tampered", skip_prompt=True))
    monkeypatch.setenv(APPS_ENV, approved_app())
    monkeypatch.setenv(NAME_ENV, "clinic-a")
    with pytest.raises(FedtuneError, match="client clinic-a refuses the run"):
        approved.clientapp_main()
    assert installed == []  # nothing installed, no app code imported
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, **kw: installed.append(content))  # a fresh process
    monkeypatch.setenv(APPS_ENV, hashlib.sha256(b"tampered").hexdigest())
    approved.clientapp_main()
    assert installed == [b"tampered"]
