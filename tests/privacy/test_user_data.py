"""Records grouped by person (data.user_field): partitions and splits keep a person whole,
the person column survives export, and bad person ids are refused naming the record."""

from __future__ import annotations

import json

import pytest

from fedtune import config
from fedtune.data import client_data, client_examples, export_clients
from fedtune.errors import FedtuneError
from tests.conftest import tiny_config as _tiny
from tests.deploy.test_deploy import fed  # noqa: F401  (fixture)


def people_file(tmp_path, people: int = 30, name: str = "people.jsonl", **override) -> str:
    """``people`` patients with 1..6 notes each, over three wards (a patient's notes may sit on several)."""
    rows = []
    for p in range(people):
        for k in range(1 + p % 6):
            rows.append({"prompt": f"Patient {p} visit {k}:", "completion": f" note {p}-{k}.",
                         "patient": f"p{p}", "ward": f"w{(p + k) % 3}"})
    for i, value in override.items():
        rows[int(i[1:])]["patient"] = value
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user_config(path, **sections):
    data = {"source": path, "user_field": "patient", "partition_by": "ward", "max_eval_examples": 0,
            **sections.pop("data", {})}
    return _tiny(data=data, privacy={"unit": "user", **sections.pop("privacy", {})}, **sections)


@pytest.mark.parametrize("partition", ["natural", "dirichlet", "iid"])
def test_a_person_stays_whole_at_one_client_and_on_one_side(tmp_path, partition):
    cfg = user_config(people_file(tmp_path), data={"partition": partition}, federation={"clients": 3})
    where: dict[str, set] = {}
    total = 0
    for i in range(3):
        train, heldout = client_data(cfg, i)
        total += len(train) + len(heldout)
        assert not set(train["patient"]) & set(heldout["patient"])  # held out as whole people
        for side, records in (("train", train), ("heldout", heldout)):
            for p in records["patient"]:
                where.setdefault(p, set()).add((i, side))
    assert total == sum(1 + p % 6 for p in range(30))  # every record once
    assert len(where) == 30 and all(len(v) == 1 for v in where.values())  # one client, one side


def test_without_the_person_column_a_natural_partition_would_split_people(tmp_path):
    """The control for the test above: by ward alone, people land at several clients."""
    cfg = user_config(people_file(tmp_path), data={"user_field": ""}, privacy={"unit": "record"},
                      federation={"clients": 3})
    at = {}
    for i in range(3):
        for records in client_data(cfg, i):
            for p in records["patient"]:
                at.setdefault(p, set()).add(i)
    assert any(len(v) > 1 for v in at.values())


def test_examples_carry_their_person_and_export_round_trips(tmp_path, tiny_path):
    from fedtune.deploy.node import data_config
    from fedtune.model import load_tokenizer

    cfg = user_config(people_file(tmp_path), federation={"clients": 2})
    tok = load_tokenizer(tiny_path)
    train, _ = client_examples(cfg, 0, tok)
    records, _ = client_data(cfg, 0)
    assert train.users == list(records["patient"]) and len(train.users) == len(train)
    paths = export_clients(cfg, tmp_path / "out")
    rows = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert all("patient" in r for r in rows)
    deployed, _ = client_examples(data_config(cfg, str(paths[1])), 0, tok)
    assert deployed.users == client_examples(cfg, 1, tok)[0].users


@pytest.mark.parametrize("override, message", [
    ({}, None),
    ({"r4": ""}, r"record 5 has an empty patient \(data.user_field\)"),
    ({"r0": None}, r"record 1 has an empty patient"),
])
def test_empty_or_null_person_ids_are_refused_naming_the_record(tmp_path, override, message):
    cfg = user_config(people_file(tmp_path, **override))
    if message is None:
        client_data(cfg, 0)
        return
    with pytest.raises(FedtuneError, match=message):
        client_data(cfg, 0)


def test_a_missing_person_column_is_refused_naming_it(tmp_path):
    cfg = user_config(people_file(tmp_path), data={"user_field": "patient_id"})
    with pytest.raises(FedtuneError, match=r"has no column 'patient_id' \(data.user_field\).*set data.user_field"):
        client_data(cfg, 0)


def test_a_person_whose_records_all_drop_at_tokenization_is_refused(tmp_path, tiny_path):
    from fedtune.model import load_tokenizer

    rows = [{"prompt": "x" * (400 if p == 3 else 5), "completion": " y", "patient": f"p{p}", "ward": "w"}
            for p in range(12) for _ in range(2)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = user_config(str(path), federation={"clients": 1}, data={"eval_fraction": 0.1})
    train, _ = client_data(cfg, 0)
    assert "p3" in set(train["patient"])  # trained on, then every record of p3 is too long
    with pytest.raises(FedtuneError, match=r"person 'p3' \(patient\) has no training record left after tokenization"):
        client_examples(cfg, 0, load_tokenizer(tiny_path))


def test_a_split_column_that_splits_a_person_is_refused(tmp_path):
    path = tmp_path / "split.jsonl"
    rows = [{"text": f"n{i}", "patient": f"p{i // 2}", "split": "heldout" if i in (0, 5) else "train"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = user_config(str(path), data={"partition": "iid"}, federation={"clients": 1})
    with pytest.raises(FedtuneError, match=r"person 'p0' \(patient\) has records marked both train and heldout"):
        client_data(cfg, 0)


@pytest.mark.parametrize("change, message", [
    ({"privacy.unit": "user"}, r'privacy.unit = "user" needs data.user_field'),
    ({"privacy.records_per_user": 0}, r"privacy.records_per_user must be >= 1"),
    ({"privacy.unit": "person"}, r"privacy.unit must be one of record, user"),
    ({"privacy.unit": "user", "data.user_field": "p", "federation.mode": "centralized"}, r"is per client"),
])
def test_bad_user_unit_settings_are_refused(change, message):
    with pytest.raises(FedtuneError, match=message):
        config.load(None, change)


@pytest.mark.parametrize("extra, message", [
    (["--set", 'data.user_field="patient_id"'], "has no column 'patient_id' (data.user_field)"),
    ([], "record 5 has an empty patient (data.user_field)"),
    (["--set", "privacy.records_per_user=0"], "privacy.records_per_user must be >= 1"),
])
def test_bad_person_input_is_one_line_exit_2_and_trains_nothing(tmp_path, extra, message):
    from tests.test_cli import TINY, run_cli

    data = people_file(tmp_path, r4="")
    out = tmp_path / "runs"
    res = run_cli("simulate", TINY, "--data", data, "--set", "data.partition_by=ward", "--set", "privacy.unit=user",
                  "--set", 'data.user_field="patient"', *extra, "--output", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fedtune:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_deployed_clients_person_column_is_checked_at_start(fed, capsys):  # noqa: F811
    """The operator's client.user_field: a column the data file lacks, or a record without a
    person, stops `fedtune client start` with one line naming it, before any SuperNode runs."""
    from tests.deploy.test_deploy import _error, _rewrite

    root, _, client = fed
    (root / "data" / "clinic-a.jsonl").write_text('{"text": "a", "patient": "p1"}\n{"text": "b", "patient": null}\n')
    _rewrite(root / "client.toml", "client", {**client, "user_field": "patient"})
    assert "record 2 has an empty patient (client.user_field)" in _error(capsys, ["client", "start", str(root / "client.toml")])
    _rewrite(root / "client.toml", "client", {**client, "user_field": "patient_id"})
    assert "has no column 'patient_id' (client.user_field)" in _error(capsys, ["client", "start", str(root / "client.toml")])
