"""The server's own record of every update it received, for `fedtune audit --verify`.

Each round the server appends one hash-chained, fsync'ed receipt per client whose update
went into the aggregate (``server/receipts.jsonl``, the same chain format as a ledger):
the client's name, node and the ledger head it reported for the spend that paid for the
update. The audit then checks the other direction too: every received update has its
spend in that client's ledger. A deleted last spend line, a missing ledger or a reply
without a head is a named failure, not a silent gap.

Server fields always win in metrics rows: a client reporting a metric named ``round``
(or any other field the server writes) cannot move its row; the collision is kept in the
receipt and fails the verification.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from fedtune.privacy.ledger import Ledger
from fedtune.runfolder import now

# What the server writes itself into a metrics row (train, evaluate and round rows).
SERVER_FIELDS = frozenset({"round", "phase", "client", "node", "status", "reason", "ledger_head", "adapter", "time",
                           "metric_collisions"})


def receipts_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "server" / "receipts.jsonl"


def collisions(metrics: dict) -> list[str]:
    return sorted(k for k in metrics if k in SERVER_FIELDS)


def row(fields: dict, metrics: dict) -> dict:
    """A metrics row: the client's metrics under the server's fields (which always win)."""
    clash = collisions(metrics)
    if clash:
        log(WARNING, "fedtune: %s sent metrics %s named like server fields; the server's values are kept",
            fields.get("client", "?"), clash)
        return {**metrics, **fields, "metric_collisions": clash}
    return {**metrics, **fields}


def record(run_dir: str | Path, round_: int, outcomes) -> None:
    """One receipt per update the server accepted this round, durable before it is used."""
    book = Ledger(receipts_path(run_dir))
    for o in outcomes:
        if o.status == "ok":
            book.append({"type": "receipt", "round": round_, "client": o.client, "node": o.node,
                         "ledger_head": o.ledger_head, "metric_collisions": collisions(o.metrics), "time": now()})


def verify(run_dir: str | Path, ledgers: dict[str, list[dict]], trained: bool) -> list[str]:
    """Every received update against the ledgers at hand: one problem per gap, naming
    client and round. ``trained``: metrics.jsonl shows accepted updates."""
    path = receipts_path(run_dir)
    if not path.exists():
        return [f"{path}: missing; the server's record of received updates is gone, so no spend can be "
                "checked against it"] if trained else []
    problems = []
    for e in Ledger(path).entries():  # FedtuneError naming file:line on a broken chain
        if e["type"] != "receipt":
            continue
        who = f"{path}:{e['seq']}: {e['client']} round {e['round']}"
        if e["metric_collisions"]:
            problems.append(f"{who}: the client sent metrics named like server fields {e['metric_collisions']}")
        if not e["ledger_head"]:
            problems.append(f"{who}: the update arrived without a ledger head; its spend cannot be checked")
        elif e["client"] not in ledgers:
            problems.append(f"{who}: the server received an update but the client's ledger is missing "
                            f"(clients/{e['client']}/ledger.jsonl)")
        elif not any(x["type"] == "spend" and x["hash"] == e["ledger_head"] for x in ledgers[e["client"]]):
            problems.append(f"{who}: the server received an update but the client's ledger has no spend with its "
                            "head (the ledger was truncated or rewritten)")
    return problems
