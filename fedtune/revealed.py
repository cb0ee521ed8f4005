"""What a client sends the server in the clear, and why each number may leave.

The DP accountant assumes add/remove-one adjacency: neighbouring data sets differ by one
record, so the number of records N is itself private. Under DP:

- without secure aggregation the server sees each client's noised adapter (covered) and,
  in the clear, the numbers below (``REVEALED_UNDER_DP``): they are listed as revealed, and
  several of them (the example count, q, ε) give N away. Only secure aggregation hides N.
- per-client training and held-out losses are computed from the private data, not from
  the noised release, and are covered by nothing: off by default, sent only with
  ``privacy.reveal_losses = true`` (the audit then lists them as revealed);
- under secure aggregation the example count is inside the masked sum, and only
  ``REVEALED_UNDER_SECAGG`` travels in the clear: nothing that depends on N or on the data
  (no ε, whose value for a fixed plan identifies N; no q, σ, steps or timings). The server's
  audit then relies on the clients' ledgers for ε.
"""

from __future__ import annotations

from fedtune.receipts import SERVER_FIELDS

REVEALED_UNDER_DP = ("refused", "resent", "num-examples", "epsilon", "steps", "noise-multiplier", "sample-rate",
                     "train-seconds", "threads")
LOSSES = ("train-loss",)  # train metrics sent only with privacy.reveal_losses
REVEALED_UNDER_SECAGG = ("refused", "resent", "threads")


def train_metrics(metrics: dict, *, dp: bool, secure: bool, reveal_losses: bool) -> dict:
    """The part of a client's train metrics that may leave it."""
    if secure:
        allowed = REVEALED_UNDER_SECAGG
    elif dp:
        allowed = REVEALED_UNDER_DP + (LOSSES if reveal_losses else ())
    else:
        return dict(metrics)  # no DP: no guarantee to keep
    return {k: metrics[k] for k in allowed if k in metrics}


def evaluation_allowed(cfg) -> bool:
    """Whether a client reports its held-out loss of a global adapter (its private data's loss)."""
    return not cfg.privacy.dp or cfg.privacy.reveal_losses


NOT_COVERED = ("the numbers listed as revealed in the client's train replies (example count, ε, q, σ, steps, "
               "timings; none under secure aggregation), and per-client losses when privacy.reveal_losses is on")


SERVER_COMPUTED = frozenset({"update-norm", "secagg-upload-bytes"})  # measured by the server, not sent
# Independent of the data (so of any one record): the rest depends on N or on the records
# and is covered by no DP guarantee (losses), or gives N away (counts, q, σ, ε, timings).
DATA_INDEPENDENT = frozenset({"refused", "resent", "threads", "upload-bytes", "eval-withheld"})


def in_the_clear(rows: list[dict]) -> list[dict]:
    """What clients sent the server in the clear, from its metrics rows: one entry per
    phase and metric, with the clients that sent it and whether it is independent of the data."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r.get("phase") in ("train", "evaluate") and r.get("status") in ("ok", "refused"):
            for k in set(r) - SERVER_FIELDS - SERVER_COMPUTED:
                seen.setdefault((r["phase"], k), set()).add(r["client"])
    return [{"phase": p, "metric": m, "clients": sorted(c), "data_independent": m in DATA_INDEPENDENT}
            for (p, m), c in sorted(seen.items())]
