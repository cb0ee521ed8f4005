"""The round floor: a round in which too few clients trained fails the run, loudly.

``federation.min_clients`` is the fewest clients that must train in a round. Its default
(0) is every client selected for the round: a user who starts a run with four clients
reads its result as what four clients trained, so a client that died (an exception, an
out-of-memory kill of its worker) must stop the run with its name and reason, not
shrink the average silently. A federation that expects dropouts (deployment) lowers it.

A client that refused the round under its own privacy budget did not fail: it is told
apart (its refusal is in the logs, its ledger and the audit) and the floor is lowered by
the refusals, so a run whose clients run out of budget still ends normally.
"""

from __future__ import annotations

from typing import Iterable

FAILED = ("failed", "rejected")


class RoundFailed(RuntimeError):
    """Too few clients trained in a round; the message names each one that did not and why."""


def problems(outcomes: Iterable) -> list[str]:
    """``client (status): reason`` for each client that failed or was rejected."""
    return [f"{o.client} ({o.status}): {o.reason or 'no reason given'}" for o in outcomes if o.status in FAILED]


def check_floor(min_clients: int, round_: int, outcomes: list) -> None:
    """Raise RoundFailed if fewer clients trained in ``round_`` than the floor allows."""
    selected = len(outcomes)
    refused = sum(o.status == "refused" for o in outcomes)
    trained = sum(o.status == "ok" for o in outcomes)
    need = min(min_clients or selected, selected - refused)
    if trained >= need:
        return
    raise RoundFailed(
        f"round {round_}: {trained} of {selected} selected clients trained, {need} needed "
        f"(federation.min_clients={min_clients}, 0 = all selected); did not train: {'; '.join(problems(outcomes))}. "
        "Fix what failed (e.g. lower train.memory_budget_mb or train.batch_size on out-of-memory), or lower "
        "federation.min_clients to let the run go on without them"
    )


def failure_reason(doing: str, exc: BaseException) -> str:
    """One line for a client's failure (out of memory included): what it was doing and why."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{doing} failed: {type(exc).__name__}" + (f": {first}" if first else "")


def known_names(rows: Iterable[dict]) -> dict[int, str]:
    """node id -> client name from a run's earlier metrics rows: a resumed server can name a
    client that fails before it answered this server (an error reply carries no name)."""
    return {int(r["node"]): r["client"] for r in rows
            if "node" in r and r.get("client") and not str(r["client"]).startswith("node-")}
