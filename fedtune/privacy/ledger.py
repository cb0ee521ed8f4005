"""A client's privacy ledger: an append-only JSON-lines file on the client's own disk.

Each line is one entry (the plan, a spend, a refusal) carrying ``seq``, the hash of
the previous entry and its own hash (SHA-256 of its canonical JSON), so an edited,
reordered or deleted line breaks the chain. Appends are flushed and fsync'ed before
``append`` returns: a spend is on disk before the update it pays for leaves the client.

Entries are written through one API (``record_plan``, ``record_spend``, ``record_refusal``,
``record_resend``, ``record_abort``), used by the client, the server, a deployed client's
lifetime ledger and personalization, so every ledger has one schema.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import FedtuneError
from fedtune.runfolder import now

if TYPE_CHECKING:
    from fedtune.privacy.budget import Plan

GENESIS = "0" * 64
FORMAT = "fedtune-ledger/1"


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- reading ------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """All entries, checked: valid JSON, unbroken hash chain. FedtuneError names the line."""
        if not self.path.exists():
            return []
        entries: list[dict[str, Any]] = []
        prev = GENESIS
        with open(self.path, "rb") as fh:
            data = fh.read()
        if data and not data.endswith(b"\n"):
            line_no = data.count(b"\n") + 1
            raise FedtuneError(
                f"{self.path}:{line_no}: ledger line is truncated (an interrupted write?); "
                "restore the ledger from a backup: fedtune will not guess what was spent"
            )
        for line_no, raw in enumerate(data.splitlines(), start=1):
            where = f"{self.path}:{line_no}"
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise FedtuneError(f"{where}: ledger line is not valid JSON; restore the ledger from a backup") from None
            if not isinstance(entry, dict) or "hash" not in entry or "prev_hash" not in entry:
                raise FedtuneError(f"{where}: ledger line lacks its hash fields; restore the ledger from a backup")
            if entry.get("seq") != line_no:
                raise FedtuneError(f"{where}: ledger entry has seq {entry.get('seq')!r}, expected {line_no} (lines moved or removed)")
            if entry["prev_hash"] != prev:
                raise FedtuneError(f"{where}: ledger hash chain is broken (an earlier line was changed or removed)")
            if entry_hash(entry) != entry["hash"]:
                raise FedtuneError(f"{where}: ledger entry does not match its hash (the line was edited)")
            prev = entry["hash"]
            entries.append(entry)
        return entries

    def plan(self) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e["type"] == "plan"), None)

    def spends(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["type"] == "spend"]

    def history(self) -> list[tuple[float, float, int]]:
        """The DP-SGD history (σ, q, steps) of every recorded spend."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.spends()]

    # ---- writing ------------------------------------------------------------------
    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Chain, write and fsync one entry (holding a lock on the file); returns it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            existing = self.entries()
            entry = {"format": FORMAT, **entry, "seq": len(existing) + 1,
                     "prev_hash": existing[-1]["hash"] if existing else GENESIS}
            entry["hash"] = entry_hash(entry)
            data = (json.dumps(entry, sort_keys=True, allow_nan=True) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if new_file:  # make the new directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return entry

    # ---- the entries -----------------------------------------------------------------
    def record_plan(self, plan: Plan, **about: Any) -> dict[str, Any]:
        """The plan, fixed before the first round; ``about``: who, unit, what it covers."""
        return self.append({**plan.to_entry(), **about, "time": now()})

    def record_spend(self, round_: int | str, plan: Plan, epsilon: float, **fields: Any) -> dict[str, Any]:
        """One paid round: the plan's step parameters unless ``fields`` says otherwise; durable on return."""
        return self.append({"type": "spend", "round": round_, "steps": plan.steps_per_round,
                            "sample_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
                            "clip_norm": plan.clip_norm, "delta": plan.delta, "accountant": plan.accountant,
                            "epsilon": epsilon, **fields, "time": now()})

    def record_refusal(self, round_: int | str, reason: str, **fields: Any) -> dict[str, Any]:
        """A round not trained (budget, policy); ``fields``: ε spent so far, ε if trained, budget."""
        return self.append({"type": "refusal", "round": round_, **fields, "reason": reason, "time": now()})

    def record_resend(self, round_: int, spend: str) -> dict[str, Any]:
        """A paid round's update sent again (no new spend): ``spend`` is its spend entry's hash."""
        return self.append({"type": "resend", "round": round_, "spend": spend, "time": now()})

    def record_dataset(self, dataset: str, digest: str, data_file: str, previous: str, note: str) -> dict[str, Any]:
        """A deployed client's lifetime ledger: the data file (its digest) the data set's spend goes with."""
        return self.append({"type": "dataset", "dataset": dataset, "digest": digest, "data_file": data_file,
                            "previous": previous, "time": now(), "note": note})

    def record_abort(self, round_: int, reason: str) -> dict[str, Any]:
        """A secure round that released nothing."""
        return self.append({"type": "abort", "round": round_, "reason": reason, "time": now()})
