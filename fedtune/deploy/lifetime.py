"""A deployed client's lifetime ledger: one privacy budget per data set, across every run.

Keyed by the data-set name the operator declares (client.dataset, default the client's
name), not by the run the server names: state/datasets/<name>/lifetime.jsonl, a hash-chained
fedtune ledger. It records the data file's SHA-256 (a changed file keeps the data set's
spend, and the change is recorded) and every round trained on it, by any run, with its
DP-SGD history. The lifetime ε composes all of them with the accountant at the policy's
δ (policy.max_delta); a round that would take it past client.budget is refused before
training. The same bytes under another data-set name are refused: renaming resets nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import epsilon
from fedtune.privacy.ledger import Ledger
from fedtune.runfolder import file_lock

FILE = "lifetime.jsonl"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise FedtuneError(f"cannot read the data file {path} ({exc.strerror}); fix client.data") from None
    return h.hexdigest()


def lifetime_path(state_dir: str | Path, dataset: str) -> Path:
    return Path(state_dir) / "datasets" / dataset / FILE


def accountant_of(accountants: list[str]) -> str:
    """The lifetime accountant: RDP when the policy trusts it (it composes any history), else PRV."""
    return "rdp" if "rdp" in accountants else accountants[0]


@dataclass
class Lifetime:
    ledger: Ledger
    dataset: str
    delta: float  # the δ the lifetime ε is stated at (policy.max_delta)
    accountant: str
    budget: float

    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.ledger.spends()]

    def epsilon(self, extra: list[tuple[float, float, int]] = ()) -> float:
        return epsilon(self.history() + list(extra), self.delta, self.accountant)

    def lock(self):
        """Held from the budget check to the spend: two runs on one data set never both pass the check."""
        return file_lock(self.ledger.path.parent / ".lock")

    def units(self) -> set[str]:
        """The privacy units its rounds were trained at (spends before the user unit: one record)."""
        return {e.get("unit", "record") for e in self.ledger.spends()}

    def check(self, round_history: tuple[float, float, int], unit: str = "record") -> tuple[float, float, str]:
        """(ε before, ε after one more round, '' or the reason to refuse it)."""
        before, after = self.epsilon(), self.epsilon([round_history])
        other = sorted(self.units() - {unit})
        if other:  # one lifetime ε composes rounds of one unit: a record-level round is no bound on a person
            return before, after, (f"lifetime budget of data set {self.dataset!r} was spent at privacy unit "
                                   f"{other[0]!r} and this round is at {unit!r} (client.user_field changed): one "
                                   f"lifetime ε holds for one unit; restore client.user_field")
        if after <= self.budget:
            return before, after, ""
        return before, after, (f"lifetime budget of data set {self.dataset!r}: this round would raise its ε from "
                               f"{before:.3f} to {after:.3f} (δ={self.delta:g}, every run on it), above "
                               f"client.budget = {self.budget:g}")

    def spend(self, run: str, server_round: int | str, plan, run_epsilon: float) -> dict:
        """Record one trained round (durable before the update leaves)."""
        after = self.epsilon([plan.round_history])
        return self.ledger.record_spend(server_round, plan, after, run=run, unit=plan.privacy_unit, run_delta=plan.delta,
                                        run_accountant=plan.accountant, run_epsilon=run_epsilon, delta=self.delta,
                                        accountant=self.accountant, budget=self.budget)

    def refuse(self, run: str, server_round: int | str, reason: str) -> None:
        self.ledger.record_refusal(server_round, reason, run=run)


def _registered(ledger: Ledger) -> str:
    """The data file digest a lifetime ledger last recorded ('' for none)."""
    digests = [e["digest"] for e in ledger.entries() if e["type"] == "dataset"]
    return digests[-1] if digests else ""


def open_lifetime(state_dir: str | Path, dataset: str, data_file: str | Path, budget: float, policy) -> Lifetime:
    """The data set's lifetime ledger, registering the data file's digest (FedtuneError on a
    clash or a damaged ledger: nothing may be trained then)."""
    digest = file_digest(data_file)
    path = lifetime_path(state_dir, dataset)
    for other in sorted(Path(state_dir, "datasets").glob(f"*/{FILE}")):
        name = other.parent.name
        if name != dataset and _registered(Ledger(other)) == digest:
            raise FedtuneError(f"data file {data_file} (sha256 {digest[:12]}) is already data set {name!r}, whose "
                               f"spend goes with it; set client.dataset = \"{name}\" (a new name resets nothing)")
    ledger = Ledger(path)
    known = _registered(ledger)  # FedtuneError naming file:line on a damaged ledger
    if known != digest:
        ledger.record_dataset(dataset, digest, str(data_file), known,
                              "data file changed: the data set keeps its spend" if known else "registered")
    return Lifetime(ledger, dataset, policy.max_delta, accountant_of(policy.accountants), budget)
