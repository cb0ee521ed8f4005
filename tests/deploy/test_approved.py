"""The app-hash allowlist's pieces, in process: the check on a FAB's bytes, `fedtune client
approve`, and the worker's hook that runs before any handler."""

from __future__ import annotations

import hashlib
import pytest

from fedtune.cli import main
from fedtune.deploy.approved import APPS_ENV, NAME_ENV, approve, check_fab
from fedtune.deploy.settings import load_client
from fedtune.errors import FedtuneError
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


def test_the_workers_hook_refuses_an_unlisted_app_and_accepts_a_listed_one(monkeypatch):
    """The worker runs every message of a deployed client; its hook checks the FAB's bytes
    against the operator's list before any handler (and it never imports the FAB)."""
    from types import SimpleNamespace

    from fedtune.deploy.worker import check_app

    fab = SimpleNamespace(content=b"tampered", hash_str="x")
    monkeypatch.setenv(NAME_ENV, "clinic-a")
    monkeypatch.setenv(APPS_ENV, approved_app())
    with pytest.raises(FedtuneError, match="client clinic-a refuses the run"):
        check_app(None, fab)
    monkeypatch.delenv(APPS_ENV)
    with pytest.raises(FedtuneError, match="not approved"):  # no list: nothing is approved
        check_app(None, fab)
    monkeypatch.setenv(APPS_ENV, f"{approved_app()},{hashlib.sha256(b'tampered').hexdigest()}")
    check_app(None, fab)
