"""A training round under SecAgg+ with the clients the strategy sampled: the server learns
only their sum (fedtune.secagg.flower), and one outcome per client for the run's records."""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedtune import config as config_mod
from fedtune import names
from fedtune.secagg.flower import Encoding, secure_train
from fedtune.secagg.roster import registered_check
from fedtune.server.strategy import AdapterFedAvg, Outcome, log_refusal


def secure_round(grid: Grid, cfg: config_mod.Config, round_: int, arrays: ArrayRecord, messages, timeout: float,
                 strategy: AdapterFedAvg, ddg=None, before_unmask=None) -> tuple[ArrayRecord | None, list[Outcome], dict]:
    """A training round under SecAgg+ with the clients the strategy sampled."""
    nodes = sorted(m.metadata.dst_node_id for m in messages)
    g = cfg.secagg
    sec = secure_train(grid, nodes, round_, arrays, Encoding(g.bits, g.clip, g.max_weight, n_max=len(nodes), ddg=ddg),
                       g.degree, g.threshold, timeout, before_unmask, min_inputs=g.min_inputs, admit=registered_check(),
                       stage_timeout=cfg.federation.stage_timeout, colluders=g.colluders)
    outcomes = []
    for node in nodes:
        reply = sec.replies.get(node)
        metrics = dict(reply.content["metrics"]) if reply is not None and "metrics" in reply.content.metric_records else {}
        info = dict(reply.content["client"]) if reply is not None and "client" in reply.content.config_records else {}
        name = sec.names.get(node) or names.reported(info.get("name", strategy.names.get(node)), node)  # key-bound first
        strategy.names[node] = name
        if metrics.get("refused"):
            outcome = Outcome(node, name, "refused", metrics, str(info.get("reason", "refused")))
            log_refusal(name, round_, outcome.reason)
        elif sec.aborted:
            outcome = Outcome(node, name, "failed", metrics, sec.aborted)
        elif node in sec.included:
            outcome = Outcome(node, name, "ok", metrics, ledger_head=str(info.get("ledger-head", "")))
        else:
            outcome = Outcome(node, name, "failed", metrics, sec.lost.get(node, "not in the secure sum"))
        outcome.metrics["secagg-upload-bytes"] = sec.upload_bytes.get(node, 0)
        outcomes.append(outcome)
    # Every node that missed a stage or was turned away, by name (also those whose input is in the sum).
    info = {"secagg-included": len(sec.included), "secagg-aborted": sec.aborted,
            "secagg-dropped": sorted(strategy.names.get(n, f"node-{n}") for n in sec.lost),
            **{f"secagg-{k}-seconds": v for k, v in sec.seconds.items()}}
    return sec.arrays, outcomes, info
