"""Records grouped by person (``data.user_field``), for user-level DP (``privacy.unit = "user"``).

A person is every record with the same value of ``data.user_field``. Partitions deal out
whole people (a person's records stay at one client under every partition) and the
held-out split holds out whole people, so no person is both trained on and held out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from datasets import Dataset


def user_ids(ds: Dataset, field: str, where: str, setting: str = "data.user_field") -> list[str]:
    """Each record's person, as text; FedtuneError naming the record for a missing or empty id.
    ``setting`` is the key that named the column (a deployed operator's: client.user_field)."""
    if field not in ds.column_names:
        raise FedtuneError(f"{where} has no column '{field}' ({setting}) to name each record's person "
                           f"(columns: {sorted(ds.column_names)}); set {setting} to the right column")
    ids = []
    for i, value in enumerate(ds[field]):
        text = "" if value is None else str(value).strip()
        if not text:
            raise FedtuneError(f"{where}: record {i + 1} has an empty {field} ({setting}); give every record "
                               "its person's id, or drop the record")
        ids.append(text)
    return ids


def people(ids: list[str]) -> dict[str, list[int]]:
    """Person -> their record indices, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, u in enumerate(ids):
        out.setdefault(u, []).append(i)
    return out


def person_level(ds: Dataset, ids: list[str], partition_by: str) -> Dataset:
    """One row per person: its id and the ``partition_by`` value of its first record."""
    from datasets import Dataset

    groups = people(ids)
    labels = ds[partition_by] if partition_by in ds.column_names else [""] * len(ds)
    return Dataset.from_dict({"person": list(groups), partition_by: [labels[rows[0]] for rows in groups.values()]})


def expand(persons: Dataset, ids: list[str]) -> list[int]:
    """The record indices of the people in ``persons``, in file order."""
    chosen = set(persons["person"])
    return [i for i, u in enumerate(ids) if u in chosen]


def split_by_person(part: Dataset, field: str, eval_fraction: float, seed: int, pid: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) with whole people on each side: ``eval_fraction`` of the client's people held out."""
    import random

    ids = [str(v).strip() for v in part[field]]
    names = sorted(people(ids))
    if len(names) < 2:
        raise FedtuneError(f"client {pid} holds {len(names)} person(s) ({field}); user-level DP needs at least 2 "
                           "(one trained on, one held out); use fewer clients")
    random.Random(f"{seed}|{pid}").shuffle(names)
    n_eval = min(max(1, round(len(names) * eval_fraction)), len(names) - 1)
    held = set(names[:n_eval])
    train = [i for i, u in enumerate(ids) if u not in held]
    heldout = [i for i, u in enumerate(ids) if u in held]
    return part.select(train), part.select(heldout)


def check_fixed_sides(part: Dataset, field: str, split_field: str, pid: int) -> None:
    """A data file's split column must keep each person on one side."""
    side: dict[str, str] = {}
    for i, (u, s) in enumerate(zip(part[field], part[split_field])):
        u = str(u).strip()
        if side.setdefault(u, s) != s:
            raise FedtuneError(f"client {pid}: person {u!r} ({field}) has records marked both train and heldout "
                               f"(record {i + 1} of the client); put each person's records on one side")


def check_split_people(train_users: list[str], before: list[str], who: str, field: str) -> None:
    """Every trained person keeps a record after tokenization; FedtuneError names the first who does not."""
    left = set(train_users)
    for u in dict.fromkeys(before):
        if u not in left:
            raise FedtuneError(f"{who}: person {u!r} ({field}) has no training record left after tokenization "
                               "(every one has no completion token within model.max_length); raise "
                               "model.max_length or drop that person's records")
