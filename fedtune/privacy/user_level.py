"""DP-SGD with one person as the unit (``privacy.unit = "user"``), inside one client.

A person is every record with the same ``data.user_field`` at this client. Each step:

1. Poisson sampling over the client's people: each joins with probability q = expected
   people per step (train.batch_size) / number of people (Opacus' own sampler, over people);
2. each sampled person contributes up to ``records_per_user`` of its records, drawn at
   random each step; its contribution is the MEAN of those records' per-sample gradients
   (Opacus' ``grad_sample`` rows, grouped by person), so it does not grow with its records;
3. Opacus' ``DPOptimizer`` then treats each person's row as one sample: clips it to C,
   sums, adds N(0, σ²C²) once and divides by the expected number of people.

So adding or removing one person changes one clipped row of norm <= C: the Poisson-
subsampled Gaussian mechanism over people, accounted with N = the number of people
(the plan's dataset_size). The record-level path never enters this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from fedtune.errors import FedtuneError
from fedtune.user_data import people

if TYPE_CHECKING:  # torch is imported where a step needs it: the client imports this module for its SecAgg+ key stages
    import torch

RECORD_UNIT = "one training record (example) of this client's data; neighbouring data sets differ by adding or removing one record"


def unit_text(field: str) -> str:
    """The ledger's, audit's and summary's words for the user unit."""
    return (f"one person: every record with the same {field} at this client; neighbouring data sets differ by adding "
            f"or removing all of one person's records (a person also at other clients is protected at each by "
            f"that client's own ε: group privacy across clients)")


def unit_of(cfg) -> str:
    return unit_text(cfg.data.user_field.strip()) if cfg.privacy.unit == "user" else RECORD_UNIT


def dataset_units(cfg, data) -> int:
    """What the plan counts: people under the user unit, else records."""
    if cfg.privacy.unit != "user":
        return len(data)
    if data.users is None:
        raise FedtuneError("privacy.unit = \"user\" but the client's examples name no person; set data.user_field")
    return len(set(data.users))


class PersonSampler:
    """Steps of people (Poisson over people), each with up to ``per_person`` of its records."""

    def __init__(self, users: list[str], per_person: int, sample_rate: float) -> None:
        self.groups = list(people(users).values())
        self.per_person = per_person
        self.sample_rate = sample_rate

    def steps(self, steps: int, generator: torch.Generator) -> Iterator[list[list[int]]]:
        import torch
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(num_samples=len(self.groups), sample_rate=self.sample_rate,
                                                generator=generator, steps=steps)
        for chosen in sampler:
            out = []
            for person in chosen.tolist() if torch.is_tensor(chosen) else chosen:
                rows = self.groups[int(person)]
                if len(rows) > self.per_person:  # a fresh random subset of its records every step
                    pick = torch.randperm(len(rows), generator=generator)[:self.per_person].tolist()
                    rows = [rows[i] for i in sorted(pick)]
                out.append(rows)
            yield out

    @staticmethod
    def pieces(groups: list[list[int]], physical_batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
        """Record indices per forward pass (whole people per piece) and each piece's people's sizes."""
        pieces, sizes = [[]], [[]]
        for rows in groups:
            if pieces[-1] and physical_batch_size and len(pieces[-1]) + len(rows) > physical_batch_size:
                pieces.append([])
                sizes.append([])
            pieces[-1].extend(rows)
            sizes[-1].append(len(rows))
        return pieces, sizes


def person_sampler(data, records_per_user: int, sample_rate: float) -> PersonSampler:
    if data.users is None:
        raise FedtuneError("the plan's unit is one person but the examples name no person; set data.user_field")
    return PersonSampler(data.users, records_per_user, sample_rate)


def combine_per_person(params, sizes: list[int]) -> None:
    """Each parameter's ``grad_sample``: one row per record -> one row per person, the mean of
    its records' rows (consecutive rows, ``sizes`` of them per person). Opacus then clips
    and noises the person's row as one sample."""
    import torch

    if not sizes:
        return  # an empty step: the placeholder row carries no gradient
    counts = torch.tensor(sizes)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):
            gs = torch.cat(gs, dim=0)
        if gs.shape[0] != len(owner):
            raise AssertionError(f"{gs.shape[0]} per-sample rows for {len(owner)} records")
        summed = torch.zeros((len(sizes), *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
        summed.index_add_(0, owner.to(gs.device), gs)
        p.grad_sample = summed / counts.to(gs.device, gs.dtype).view(-1, *([1] * (gs.dim() - 1)))


def check_same_unit(plan, cfg, ledger, server_round) -> None:
    """A ledger planned for one unit is never spent under another (a run config that changed it):
    the refusal goes into the ledger, then to the server as the error's reason."""
    if plan.privacy_unit != cfg.privacy.unit:
        reason = (f"ledger {ledger.path} was planned for privacy.unit = {plan.privacy_unit!r} but the run asks for "
                  f"{cfg.privacy.unit!r}; refusing: keep the unit fixed during a run (or start a new run)")
        ledger.record_refusal(server_round, reason)
        raise FedtuneError(reason)


def check_user_plan(plan: dict) -> list[str]:
    """`fedtune audit --verify` on a user-unit plan: the unit it names and the per-person bound it used."""
    problems = []
    if not str(plan.get("unit", "")).startswith("one person: every record with the same "):
        problems.append(f"the plan is for the user unit but names its unit as {plan.get('unit')!r}")
    if int(plan.get("records_per_user", 0)) < 1:
        problems.append(f"the plan is for the user unit but records_per_user = {plan.get('records_per_user')!r}")
    if plan.get("dp") and not 0 < plan["sample_rate"] <= 1:
        problems.append(f"the plan's sample rate over people q = {plan['sample_rate']!r} is not in (0, 1]")
    return problems


def operator_unit(cfg, node) -> dict:
    """A deployed client's unit is its operator's: client.user_field set = one person, always;
    unset = one record, and a run asking for the user unit is refused (its add/remove-a-person
    guarantee does not give one record ε when a person has several)."""
    if node.user_field:
        return {"unit": "user"}
    if cfg.privacy.unit == "user":
        raise FedtuneError(f"{node.name} refuses privacy.unit = \"user\": its operator chose no person column; "
                           "set client.user_field in client.toml to protect people, or run at privacy.unit = \"record\"")
    return {}
