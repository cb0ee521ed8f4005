"""Client data: load (a built-in data set of fedtune.sources or the user's file), partition across
clients, hold out an evaluation split per client, tokenize and batch.

Every record becomes ``prompt`` + ``completion``; the loss covers completion tokens only
(a plain ``text`` field is a completion with an empty prompt). Partitions and splits are
deterministic in ``run.seed``, so every process computes the same ones. A file with a
``split`` column (``train`` / ``heldout``) fixes each record's side itself: the client keeps
its records in file order, with no shuffle and no ``data.eval_fraction`` split, which is how
a deployed client reproduces a simulated client's records exactly (``export_clients``).

``datasets`` and ``flwr_datasets`` (with pandas, matplotlib, seaborn) are imported where
records are loaded and split, not here: training and evaluation use only the tokenized
examples, and a deployed client's model messages start faster without them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune import user_data
from fedtune.config import Config, DataSection, RunSection
from fedtune.errors import FedtuneError
from fedtune.runfolder import atomic_write_text
from fedtune.sources import BUILTIN_DATA, RATINGS, builtin_rows, drugreview_prompt

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

SPLIT_FIELD = "split"  # optional column: each record's side, one of SPLITS
SPLITS = ("train", "heldout")
_ROW = "__fedtune_row"  # the record's position in the file, to restore file order after partitioning
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# ---- loading --------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_records(source: str, text_field: str, prompt_field: str, completion_field: str) -> Dataset:
    """All records as a Dataset with ``prompt`` and ``completion`` columns (plus the rest)."""
    if source in BUILTIN_DATA:
        from datasets import Dataset

        return Dataset.from_list(builtin_rows(source))
    path = Path(source).expanduser()
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FedtuneError(
            f"data.source {source!r} is neither a built-in data set ({', '.join(BUILTIN_DATA)}) "
            f"nor a file ending in {', '.join(_FORMATS)}"
        )
    if not path.is_file():
        raise FedtuneError(f"data file {path} not found; check data.source (or --data)")
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for malformed files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FedtuneError(f"data file {path} could not be read as {fmt} ({first}); fix the file") from None
    cols = set(ds.column_names)
    if text_field in cols:
        ds = ds.map(lambda r: {"prompt": "", "completion": r[text_field]})
    elif prompt_field in cols and completion_field in cols:
        if (prompt_field, completion_field) != ("prompt", "completion"):
            ds = ds.map(lambda r: {"prompt": r[prompt_field], "completion": r[completion_field]})
    else:
        raise FedtuneError(
            f"data file {path} has columns {sorted(cols)} but needs '{text_field}', or "
            f"'{prompt_field}' and '{completion_field}'; rename columns or set data.text_field"
        )
    bad = [i for i, r in enumerate(ds) if not isinstance(r["completion"], str) or not isinstance(r["prompt"], str)]
    if bad:
        raise FedtuneError(f"data file {path}: record {bad[0] + 1} has a missing or non-text value; fix or drop it")
    if len(ds) == 0:
        raise FedtuneError(f"data file {path} has no records")
    if SPLIT_FIELD in cols:
        _check_split(ds[SPLIT_FIELD], path)
    return ds


def _check_split(values: list, path: Path) -> None:
    for i, v in enumerate(values):
        if v not in SPLITS:
            raise FedtuneError(f"data file {path}: record {i + 1} has {SPLIT_FIELD} = {v!r}; use 'train' or "
                               f"'heldout' (or drop the {SPLIT_FIELD} column to hold out data.eval_fraction)")
    for side in SPLITS:
        if side not in values:
            raise FedtuneError(f"data file {path}: no record has {SPLIT_FIELD} = '{side}'; mark at least one "
                               f"(or drop the {SPLIT_FIELD} column to hold out data.eval_fraction)")


# ---- partitioning ----------------------------------------------------------------------
class BalancedGroupPartitioner:
    """Whole groups (all records sharing a value of ``partition_by``) per client.

    The natural non-IID split: each clinic holds whole conditions. Groups are dealt
    largest first to the client with the fewest records, so sizes stay balanced.
    (The interface of flwr_datasets' partitioners: set ``dataset``, then ``load_partition``.)
    """

    def __init__(self, num_partitions: int, partition_by: str) -> None:
        self.dataset: Dataset | None = None
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._assignment: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _assign(self) -> list[list[int]]:
        if self._assignment is None:
            groups: dict[str, list[int]] = {}
            for i, value in enumerate(self.dataset[self._partition_by]):
                groups.setdefault(str(value), []).append(i)
            parts: list[list[int]] = [[] for _ in range(self._num_partitions)]
            for _, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                min(parts, key=len).extend(rows)
            self._assignment = [sorted(p) for p in parts]
        return self._assignment

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(self._assign()[partition_id])


def _partitioner(cfg, num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    d = cfg.data
    if d.partition == "iid":
        return IidPartitioner(num_partitions)
    if d.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions, partition_by=d.partition_by, alpha=d.dirichlet_alpha,
            min_partition_size=2, seed=cfg.run.seed,
        )
    return BalancedGroupPartitioner(num_partitions, d.partition_by)


@functools.lru_cache(maxsize=8)
def _client_splits(source, fields, partition, partition_by, alpha, seed, clients, eval_fraction, user_field=""):
    cfg = Config(
        run=RunSection(seed=seed),
        data=DataSection(source=source, partition=partition, partition_by=partition_by, dirichlet_alpha=alpha,
                         text_field=fields[0], prompt_field=fields[1], completion_field=fields[2]),
    )
    ds = load_records(source, *fields)
    if partition in ("natural", "dirichlet") and partition_by not in ds.column_names:
        raise FedtuneError(
            f"data.partition={partition} needs the field '{partition_by}', which the data lacks "
            f"(columns: {sorted(ds.column_names)}); set data.partition_by or use data.partition=iid"
        )
    fixed = SPLIT_FIELD in ds.column_names  # the file says which records are held out
    if fixed:
        ds = ds.add_column(_ROW, list(range(len(ds))))
    users = user_data.user_ids(ds, user_field, f"data {source}") if user_field else None
    units = ds if users is None else user_data.person_level(ds, users, partition_by)  # whole people per client
    if partition == "iid":
        units = units.shuffle(seed=seed)
    partitioner = _partitioner(cfg, clients)
    partitioner.dataset = units
    splits = []
    for pid in range(clients):
        try:
            part = partitioner.load_partition(pid)
            if users is not None:
                part = ds.select(user_data.expand(part, users))
        except ValueError as exc:  # e.g. Dirichlet cannot give every client enough records
            raise FedtuneError(
                f"cannot split {len(ds)} records into {clients} clients with data.partition={partition} "
                f"({str(exc).splitlines()[0][:120]}); use fewer clients or data.partition=iid"
            ) from None
        if len(part) < 2:
            raise FedtuneError(
                f"client {pid}'s partition has {len(part)} record(s): {len(ds)} records cannot fill {clients} "
                f"clients with data.partition={partition}; use fewer clients or data.partition=iid"
            )
        if fixed:
            if users is not None:
                user_data.check_fixed_sides(part, user_field, SPLIT_FIELD, pid)
            splits.append(_fixed_split(part, pid))
            continue
        if users is not None:
            splits.append(user_data.split_by_person(part, user_field, eval_fraction, seed, pid))
            continue
        part = part.shuffle(seed=seed + pid)
        n_eval = min(max(1, round(len(part) * eval_fraction)), len(part) - 1)
        splits.append((part.select(range(n_eval, len(part))), part.select(range(n_eval))))
    return splits


def _fixed_split(part: Dataset, pid: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) as the split column says, each in file order."""
    part = part.sort(_ROW)
    sides = part[SPLIT_FIELD]
    train, heldout = ([i for i, v in enumerate(sides) if v == side] for side in SPLITS)
    if not train or not heldout:
        raise FedtuneError(f"client {pid}'s records have no {SPLIT_FIELD} = '{'heldout' if train else 'train'}' "
                           f"record; mark some in the data file, or use fewer clients")
    return part.select(train).remove_columns(_ROW), part.select(heldout).remove_columns(_ROW)


def _splits(cfg) -> list[tuple[Dataset, Dataset]]:
    """Every client's (train, held-out) records, before the evaluation cap."""
    d = cfg.data
    return _client_splits(
        d.source, (d.text_field, d.prompt_field, d.completion_field), d.partition, d.partition_by,
        d.dirichlet_alpha, cfg.run.seed, cfg.federation.clients, d.eval_fraction, d.user_field.strip(),
    )


def client_data(cfg, client_index: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) records of one client; centralized mode pools every client's."""
    d = cfg.data
    splits = _splits(cfg)
    cap = d.max_eval_examples
    splits = [(tr, ho.select(range(min(cap, len(ho)))) if cap else ho) for tr, ho in splits]
    if cfg.federation.mode == "centralized":  # the same held-out records as the federation's clients
        from datasets import concatenate_datasets

        return (concatenate_datasets([s[0] for s in splits]), concatenate_datasets([s[1] for s in splits]))
    return splits[client_index]


def export_clients(cfg, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write each simulated client's records to ``out_dir/<name>.jsonl`` (prompt, completion,
    split): given to a deployed client, the file yields exactly the simulated client's
    training and held-out records, in the same order. Names default to client-0, client-1, ..."""
    n = cfg.federation.clients
    names = names or [f"client-{i}" for i in range(n)]
    if len(names) != n or len(set(names)) != n:
        raise FedtuneError(f"give {n} distinct client names (one per federation.clients), not {len(names)}: "
                           f"{', '.join(names)}")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise FedtuneError(f"client name {name!r} is not a plain file name; use names such as clinic-a")
    paths = []
    for name, (train, heldout) in zip(names, _splits(cfg)):
        user = cfg.data.user_field.strip()  # the person column travels with the records
        rows = [{"prompt": r["prompt"], "completion": r["completion"], SPLIT_FIELD: side,
                 **({user: r[user]} if user else {})}
                for side, records in zip(SPLITS, (train, heldout)) for r in records]
        path = Path(out_dir) / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths.append(path)
    return paths


def client_examples(cfg, client_index: int, tokenizer, extra_train: list[dict] = ()) -> tuple["TokenizedData", "TokenizedData"]:
    """A client's (train, held-out) examples, tokenized; FedtuneError if either is empty.

    ``extra_train`` (prompt/completion records, e.g. an audit's canaries) join training only.
    """
    train_records, heldout_records = client_data(cfg, client_index)
    field = cfg.data.user_field.strip()
    users = [str(u).strip() for u in train_records[field]] if field else None
    if extra_train:
        train_records = {"prompt": list(train_records["prompt"]) + [r["prompt"] for r in extra_train],
                         "completion": list(train_records["completion"]) + [r["completion"] for r in extra_train]}
        if users is not None:  # a planted record is its own person unless it names one
            users += [str(r.get("user") or f"planted-{i}") for i, r in enumerate(extra_train)]
    train = tokenize(train_records, tokenizer, cfg.model.max_length, users=users)
    if users is not None:
        user_data.check_split_people(train.users, users, client_name(cfg, client_index), field)
    heldout = tokenize(heldout_records, tokenizer, cfg.model.max_length)
    if len(train) == 0 or len(heldout) == 0:
        raise FedtuneError(
            f"{client_name(cfg, client_index)} keeps no training or held-out example after tokenization "
            f"(prompts longer than model.max_length={cfg.model.max_length}); raise model.max_length"
        )
    return train, heldout


def label_choices(cfg, records: Dataset, tokenizer) -> tuple["TokenizedData", list[int], tuple[str, ...]] | None:
    """Labelled data, scored by label likelihood: every record once per candidate label.

    Only the built-in drug reviews have labels (the rating class, which their prompt
    states before the review); None for other data. Returns the variants (record-major,
    one per label, all of a record sharing the same completion tokens so their losses
    compare), the true label index of each kept record, and the labels.
    """
    import torch  # here, not at the top: `fedtune client start` reads data files without torch

    if cfg.data.source != "drugreview":
        return None
    ids, starts, truth = [], [], []
    for r in records:
        prompts = [tokenizer(drugreview_prompt(r["condition"], r["drug"], label), add_special_tokens=False)["input_ids"]
                   for label in RATINGS]
        room = cfg.model.max_length - max(len(p) for p in prompts)
        completion = (tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:room]
        if not completion:
            continue
        truth.append(RATINGS.index(r["rating"]))
        for p in prompts:
            ids.append(torch.tensor(p + completion, dtype=torch.long))
            starts.append(len(p))
    return TokenizedData(ids, starts), truth, RATINGS


def client_name(cfg, client_index: int) -> str:
    return "central" if cfg.federation.mode == "centralized" else f"client-{client_index}"


# ---- tokenization and batching -----------------------------------------------------------
@dataclass
class TokenizedData:
    """Token ids per example and where each completion starts (loss covers the rest)."""

    ids: list[torch.Tensor]
    starts: list[int]
    users: list[str] | None = None  # each example's person (data.user_field), when the data names them

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(records: Dataset, tokenizer, max_length: int, users: list[str] | None = None) -> TokenizedData:
    """Prompt + completion + eos, truncated to ``max_length``; drops examples left with
    no completion token to learn from (``users``, one per record, are kept aligned)."""
    import torch

    ids, starts, kept = [], [], []
    eos = tokenizer.eos_token_id
    for row, (prompt, completion) in enumerate(zip(records["prompt"], records["completion"])):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        seq = (p + c)[:max_length]
        start = len(p)
        if len(seq) - max(start, 1) < 1:
            continue
        ids.append(torch.tensor(seq, dtype=torch.long))
        starts.append(start)
        kept.append(row)
    return TokenizedData(ids, starts, None if users is None else [users[i] for i in kept])


def collate(data: TokenizedData, indices, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 outside each completion (prompt and padding)."""
    import torch

    seqs = [data.ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        n = len(seq)
        input_ids[row, :n] = seq
        attention_mask[row, :n] = 1
        labels[row, data.starts[i]:n] = seq[data.starts[i]:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
