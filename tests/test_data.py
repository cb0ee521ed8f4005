"""Loading, partitioning, held-out splits, tokenization and batching."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedtune.data import client_data, collate, load_records, tokenize
from fedtune.errors import FedtuneError
from fedtune.model import load_tokenizer
from tests.conftest import tiny_config as _tiny


def tiny_config(**sections):
    """The tiny config with every held-out record kept (no max_eval_examples cap)."""
    data = {"max_eval_examples": 0, **sections.pop("data", {})}
    return _tiny(data=data, **sections)


def test_drug_reviews_split_by_condition_are_disjoint_and_balanced():
    cfg = tiny_config(federation={"clients": 4})
    splits = [client_data(cfg, i) for i in range(4)]
    conditions = [set(tr["condition"]) | set(ho["condition"]) for tr, ho in splits]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not conditions[i] & conditions[j]  # each clinic holds whole conditions
    sizes = [len(tr) + len(ho) for tr, ho in splits]
    assert sum(sizes) == 979 and max(sizes) - min(sizes) <= 5
    assert "Birth Control" in conditions[0]  # the largest condition anchors the first clinic


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_other_partitions_cover_the_data_once(partition):
    cfg = tiny_config(federation={"clients": 3}, data={"partition": partition, "partition_by": "rating"})
    splits = [client_data(cfg, i) for i in range(3)]
    texts = [t for tr, ho in splits for t in list(tr["completion"]) + list(ho["completion"])]
    assert len(texts) == 979 and len(set(texts)) == len(set(list(load_records("drugreview", "text", "prompt", "completion")["completion"])))


def test_held_out_split_is_deterministic_and_disjoint():
    cfg = tiny_config()
    (tr1, ho1), (tr2, ho2) = client_data(cfg, 1), client_data(cfg.replace(federation={"rounds": 5}), 1)
    assert list(ho1["completion"]) == list(ho2["completion"])
    assert list(tr1["completion"]) == list(tr2["completion"])
    assert not set(tr1["completion"]) & set(ho1["completion"])
    assert len(ho1) == round((len(tr1) + len(ho1)) * cfg.data.eval_fraction)


def test_the_evaluation_cap_applies_per_client_and_centralized_pools_the_same_records():
    cfg = tiny_config(data={"max_eval_examples": 5})
    per_client = [client_data(cfg, i)[1] for i in range(cfg.federation.clients)]
    assert [len(h) for h in per_client] == [5] * cfg.federation.clients
    _, pooled = client_data(cfg.replace(federation={"mode": "centralized"}), 0)
    assert sorted(pooled["completion"]) == sorted(c for h in per_client for c in h["completion"])


def test_centralized_pools_every_clients_records():
    cfg = tiny_config(federation={"mode": "centralized"})
    train, heldout = client_data(cfg, 0)
    per_client = [client_data(cfg.replace(federation={"mode": "federated"}), i) for i in range(cfg.federation.clients)]
    assert sorted(heldout["completion"]) == sorted(c for _, ho in per_client for c in ho["completion"])
    assert len(train) == sum(len(tr) for tr, _ in per_client)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("shape", ["text", "prompt"])
def test_user_files_with_text_or_prompt_completion(tmp_path, suffix, shape):
    rows = [({"text": f"note {i}"} if shape == "text" else {"prompt": f"Q{i}?", "completion": f" A{i}."}) | {"site": i % 2}
            for i in range(12)]
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(rows)
    {".jsonl": lambda: path.write_text("\n".join(json.dumps(r) for r in rows)),
     ".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    cfg = tiny_config(data={"source": str(path), "partition_by": "site"}, federation={"clients": 2})
    train, heldout = client_data(cfg, 0)
    assert len(train) + len(heldout) == 6
    assert set(train["prompt"]) == ({""} if shape == "text" else set(train["prompt"]))


def test_a_file_without_the_fields_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(FedtuneError, match=r"columns \['body'\] but needs 'text'"):
        load_records(str(path), "text", "prompt", "completion")


def test_loss_covers_the_completion_only(tiny_path):
    tok = load_tokenizer(tiny_path)
    from datasets import Dataset

    data = tokenize(Dataset.from_list([{"prompt": "Q:", "completion": " yes"}, {"prompt": "", "completion": "hi"}]), tok, 64)
    batch = collate(data, [0, 1], tok.pad_token_id)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels[0, :2].eq(-100).all()  # "Q:" is two byte tokens of prompt
    assert labels[0, 2:7].ne(-100).all()  # " yes" + eos
    assert (labels[1] != -100).sum() == 3 and mask[1].sum() == 3  # "hi" + eos, then padding
    assert labels[mask == 0].eq(-100).all()  # padding never counts, even though pad == a real id here


def test_an_exported_client_file_gives_the_simulated_clients_records_in_order(tmp_path):
    """What a deployed client reads from `fedtune data export`'s file (the whole file, no
    partition) is exactly the simulated client's training and held-out records."""
    from fedtune.data import export_clients
    from fedtune.deploy.node import data_config

    cfg = _tiny(federation={"clients": 3})  # with the evaluation cap of the tiny config
    paths = export_clients(cfg, tmp_path, ["client-0", "client-1", "clinic-c"])
    assert [p.name for p in paths] == ["client-0.jsonl", "client-1.jsonl", "clinic-c.jsonl"]
    for i, path in enumerate(paths):
        sim = client_data(cfg, i)
        deployed = client_data(data_config(cfg.replace(run={"seed": 99}), str(path)), 0)  # no re-split, no shuffle
        for a, b in zip(sim, deployed):
            assert list(a["prompt"]) == list(b["prompt"]) and list(a["completion"]) == list(b["completion"])
    with pytest.raises(FedtuneError, match="give 3 distinct client names"):
        export_clients(cfg, tmp_path, ["a", "a", "b"])


def test_a_split_column_decides_the_held_out_records(tmp_path):
    rows = [{"text": f"note {i}", "split": "heldout" if i % 3 == 0 else "train", "site": i % 2} for i in range(16)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(data={"source": str(path), "partition_by": "site"}, federation={"clients": 2})
    for site in (0, 1):
        train, heldout = client_data(cfg, site)
        mine = [r for r in rows if r["site"] == site]  # the natural partition: whole sites
        assert list(heldout["completion"]) == [r["text"] for r in mine if r["split"] == "heldout"]
        assert list(train["completion"]) == [r["text"] for r in mine if r["split"] == "train"]


@pytest.mark.parametrize("values, message", [
    (["train", "heldout", "test"], r"record 3 has split = 'test'; use 'train' or 'heldout'"),
    (["train", "heldout", None], r"record 3 has split = None"),
    (["train", "train"], r"no record has split = 'heldout'"),
])
def test_bad_split_values_are_refused_naming_the_record(tmp_path, values, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": f"r{i}", **({"split": v} if v else {})}) + "\n"
                            for i, v in enumerate(values)))
    with pytest.raises(FedtuneError, match=message):
        load_records(str(path), "text", "prompt", "completion")
