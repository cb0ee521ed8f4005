"""Smaller guarantees, tested as the attacker: a client-reported name that would escape the
run folder, private keys readable by others for a moment, renames that a crash could undo,
oversized or malformed replies."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune import names, runfolder
from fedtune.errors import FedtuneError
from fedtune.runfolder import adapter_dir, atomic_write_bytes, client_dir, ledger_path
from fedtune.server.strategy import MAX_METRICS, check_update
from tests.server.test_strategy import TEMPLATE, _arrays, _record, _reply, _update

EVIL = ["../../etc", "..", ".", "/abs", "a/b", ".hidden", "", "x" * 65, "a\nb", None, 7]


@pytest.mark.parametrize("name", EVIL)
def test_no_path_from_an_unsafe_name(tmp_path, name):
    with pytest.raises(FedtuneError, match="cannot be a folder name"):
        client_dir(tmp_path, name)
    with pytest.raises(FedtuneError, match="cannot be a folder name"):
        ledger_path(tmp_path, name)
    with pytest.raises(FedtuneError, match="cannot be a folder name"):
        adapter_dir(tmp_path, name)
    assert names.reported(name, 9) == "node-9"


def test_safe_names_pass():
    for name in ("client-0", "clinic_a.2", "local-client-1", "round-001"):
        assert names.check(name) == name and names.reported(name, 1) == name


def test_a_client_reporting_a_path_as_its_name_is_recorded_by_node(task_identity):
    """A lying client calls itself ../../x: the server's record (and in local mode the
    folder of its adapter, adapters/local-<name>) uses node-<id> instead."""
    from fedtune.server.strategy import AdapterFedAvg

    strategy = AdapterFedAvg(num_clients=2, clients_per_round=2, template=TEMPLATE, local=True)
    liar = _reply(4, RecordDict({"arrays": _arrays(1.0), "metrics": MetricRecord({"num-examples": 3, "refused": 0}),
                                 "client": ConfigRecord({"name": "../../outside"})}))
    strategy.aggregate_train(1, [_update(1, 2.0, 10), liar])
    assert sorted(o.client for o in strategy.outcomes) == ["client-1", "node-4"]
    assert strategy.names[4] == "node-4"


def _modes_at_rename(monkeypatch) -> dict[str, int]:
    seen: dict[str, int] = {}
    real = os.replace

    def spy(src, dst, *a, **k):
        seen[os.path.basename(dst)] = stat.S_IMODE(os.stat(src).st_mode)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(runfolder.os, "replace", spy)
    return seen


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_private_keys_are_never_readable_by_others(tmp_path, monkeypatch, umask):
    """Even with a umask of 0: the key file is owner-only before its first byte is visible
    under its name (checked at the rename) and right after creation."""
    from fedtune.certs import make_certs, make_client_key

    seen = _modes_at_rename(monkeypatch)
    old = os.umask(umask)
    try:
        paths = make_certs(tmp_path / "certs", ["localhost"])
        private, public = make_client_key(tmp_path / "keys", "clinic-a")
    finally:
        os.umask(old)
    for key in (paths["ca.key"], paths["server.key"], private):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert seen[key.name] == 0o600, key  # the temp file, at the moment it got the key's name
    assert stat.S_IMODE(public.stat().st_mode) & 0o044  # the public half stays readable


def test_every_atomic_write_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(runfolder.os, "replace", lambda *a: (events.append("rename"), real_replace(*a))[1])
    monkeypatch.setattr(runfolder.os, "fsync",
                        lambda fd: (events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"),
                                    real_fsync(fd))[1])
    atomic_write_bytes(tmp_path / "release.safetensors", b"x")
    assert events == ["file", "rename", "dir"]


def test_a_reply_with_too_many_metrics_is_refused_in_one_line():
    content = RecordDict({"arrays": _record({k: np.zeros(s, np.float32) for k, s in TEMPLATE.items()}),
                          "metrics": MetricRecord({"num-examples": 5, **{f"m{i}": i for i in range(MAX_METRICS)}})})
    problem = check_update(content, TEMPLATE)
    assert "more than the 64" in problem and "\n" not in problem


def test_the_client_refuses_an_adapter_of_the_wrong_dtype():
    from fedtune.model import check_adapter_state

    expected = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="dtype"):
        check_adapter_state({"w": torch.zeros(2, 3, dtype=torch.int64)}, expected)
    with pytest.raises(ValueError, match="shape"):
        check_adapter_state({"w": torch.zeros(3, 3)}, expected)
    with pytest.raises(ValueError, match="NaN"):
        check_adapter_state({"w": torch.full((2, 3), float("nan"))}, expected)
