"""The server's Message-API strategy: FedAvg over LoRA adapters.

Flower's FedAvg does the sampling and the example-weighted average; this subclass adds
what adapters from privacy-bound clients need: budget refusals are told apart from
failures, malformed updates (wrong keys or shapes, NaN, absurd values, bad weights) are
rejected with the client named, and every client's outcome is recorded. In ``local``
mode (the local-only baseline) nothing is averaged: each client keeps its own adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune import names
from fedtune.privacy.client_level import update_norm

MAX_ABS_VALUE = 1e4  # larger adapter weights are a broken or hostile update, not training
MAX_METRICS = 64  # a reply's metrics: fedtune's clients send about a dozen


@dataclass
class Outcome:
    """What one client did in one phase of a round."""

    node: int
    client: str
    status: str  # ok | refused | failed | rejected
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    ledger_head: str = ""  # hash of the client's ledger entry for this round's spend


def log_refusal(client: str, server_round: int, reason: str) -> None:
    """The server log's line for a client that refused a round (its budget, its rules)."""
    log(WARNING, "fedtune: client %s refused round %d: %s", client, server_round, reason)


def _client_name(msg: Message, seen: dict[int, str] | None = None) -> str:
    """The name a client reports (never a path outside the run folder); for an error reply
    (no content), the name it reported before."""
    node = msg.metadata.src_node_id
    known = (seen or {}).get(node, f"node-{node}")
    if not msg.has_error() and "client" in msg.content.config_records:
        return names.reported(msg.content["client"].get("name", known), node)
    return known


def check_update(content: RecordDict, template: dict[str, tuple[int, ...]]) -> str:
    """'' if ``content`` is a well-formed adapter update, else what is wrong with it."""
    if list(content.array_records) != ["arrays"]:
        return f"expected one ArrayRecord 'arrays', got {list(content.array_records)}"
    arrays = content["arrays"]
    if set(arrays) != set(template):
        missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
        return f"adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for key, shape in template.items():
        value = arrays[key].numpy()
        if tuple(value.shape) != shape:
            return f"{key} has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype.kind != "f":
            return f"{key} has dtype {value.dtype}, expected floating point"
        if not np.isfinite(value).all():
            return f"{key} contains NaN or infinite values"
        if np.abs(value).max(initial=0.0) > MAX_ABS_VALUE:
            return f"{key} has values beyond ±{MAX_ABS_VALUE:g}"
    metrics = content.metric_records.get("metrics")
    if metrics is not None and len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, more than the {MAX_METRICS} a client may report"
    weight = metrics.get("num-examples") if metrics is not None else None
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"num-examples must be a positive number (got {weight!r})"
    return ""


class AdapterFedAvg(FedAvg):
    def __init__(self, *, num_clients: int, clients_per_round: int, template: dict[str, tuple[int, ...]], local: bool = False):
        super().__init__(
            fraction_train=clients_per_round / num_clients, fraction_evaluate=1.0,
            min_train_nodes=clients_per_round, min_evaluate_nodes=num_clients, min_available_nodes=num_clients,
        )
        self.template = template
        self.local = local
        self.local_arrays: dict[int, ArrayRecord] = {}  # local mode: each node's own adapter
        self.outcomes: list[Outcome] = []  # of the last aggregate_* call
        self.names: dict[int, str] = {}  # node id -> client name, as clients report it

    # ---- local-only baseline: every node gets its own adapter back --------------------
    def _personal(self, messages: Iterable[Message], message_type: str) -> list[Message]:
        out = []
        for m in messages:
            arrays = self.local_arrays.get(m.metadata.dst_node_id, m.content["arrays"])
            content = RecordDict({"arrays": arrays, "config": m.content["config"]})
            out.append(Message(content=content, message_type=message_type, dst_node_id=m.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._personal(messages, MessageType.TRAIN) if self.local else messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._personal(messages, MessageType.EVALUATE) if self.local else messages

    # ---- aggregation ---------------------------------------------------------------
    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The well-formed updates among ``replies``, by client name; records every client's outcome.

        In a fixed order, so the float sums of the average do not depend on which reply came
        first (or on the order a restarted server sampled the clients in)."""
        self.outcomes, accepted = [], []
        for msg in sorted(replies, key=lambda m: (_client_name(m), m.metadata.src_node_id)):
            node, name = msg.metadata.src_node_id, _client_name(msg, self.names)
            if msg.has_error():
                self.outcomes.append(Outcome(node, name, "failed", reason=_first_line(msg.error.reason)))
                continue
            self.names[node] = name
            metrics = dict(msg.content.metric_records.get("metrics", {}))
            if metrics.get("refused"):
                reason = str(msg.content["client"].get("reason", "refused"))
                self.outcomes.append(Outcome(node, name, "refused", metrics, reason))
                log_refusal(name, server_round, reason)
                continue
            problem = check_update(msg.content, self.template)
            if problem:
                self.outcomes.append(Outcome(node, name, "rejected", metrics, problem))
                log(WARNING, "rejected the update of %s in round %d: %s", name, server_round, problem)
                continue
            head = str(msg.content["client"].get("ledger-head", "")) if "client" in msg.content.config_records else ""
            self.outcomes.append(Outcome(node, name, "ok", metrics, ledger_head=head))
            # Only the weight goes on to Flower's average: a client's extra metric keys cannot fail the round.
            msg.content["metrics"] = MetricRecord({"num-examples": metrics["num-examples"]})
            accepted.append(msg)
        for o in self.outcomes:
            if o.status == "failed":
                log(WARNING, "%s failed in round %d: %s", o.client, server_round, o.reason)
        # Float sums depend on their order: sum by client name, not by arrival, so the same
        # updates always give the same average (in simulation and in deployment alike).
        return sorted(accepted, key=lambda m: (_client_name(m), m.metadata.src_node_id))

    def reject(self, msg: Message, server_round: int, problem: str) -> None:
        """Turn an accepted client's outcome into a rejection."""
        for o in self.outcomes:
            if o.node == msg.metadata.src_node_id and o.status == "ok":
                o.status, o.reason = "rejected", problem
                log(WARNING, "rejected the update of %s in round %d: %s", o.client, server_round, problem)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen(server_round, replies)
        if not accepted:
            return None, None
        if self.local:
            for msg in accepted:
                self.local_arrays[msg.metadata.src_node_id] = msg.content["arrays"]
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.outcomes = []
        for msg in replies:
            node, name = msg.metadata.src_node_id, _client_name(msg, self.names)
            if msg.has_error():
                self.outcomes.append(Outcome(node, name, "failed", reason=_first_line(msg.error.reason)))
                log(WARNING, "%s failed to evaluate in round %d: %s", name, server_round, self.outcomes[-1].reason)
            else:
                self.names[node] = name
                self.outcomes.append(Outcome(node, name, "ok", dict(msg.content["metrics"])))
        ok = [o.metrics for o in self.outcomes if o.status == "ok" and "eval-tokens" in o.metrics]  # not withheld
        tokens = sum(m["eval-tokens"] for m in ok)
        if not tokens:
            return None
        loss = sum(m["eval-loss-sum"] for m in ok) / tokens
        return MetricRecord({"eval-loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval-tokens": tokens})


def _first_line(text: str | None) -> str:
    """Flower wraps client exceptions in long tracebacks; keep the meaningful line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Message:" in ln:
            return ln.split("Message:", 1)[1].strip()[:300]
    return (lines[-1] if lines else "unknown error")[:300]


class ClientDPFedAvg(AdapterFedAvg):
    """DP-FedAvg (client-level DP): Poisson-sampled clients, each update clipped to C
    (checked here), Gaussian noise on the sum, a fixed denominator qN, equal weights."""

    def __init__(self, *, num_clients: int, template: dict[str, tuple[int, ...]], plan, sampler):
        super().__init__(num_clients=num_clients, clients_per_round=num_clients, template=template)
        self.plan, self.sampler = plan, sampler
        self.sampled: list[int] = []
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        self.sampled = self.sampler.sample(list(grid.get_node_ids()), self.plan.sample_rate)
        log(INFO, "client-level DP: %d of %d clients sampled (q=%g)", len(self.sampled),
            len(list(grid.get_node_ids())), self.plan.sample_rate)
        config["server-round"] = server_round
        config["client-clip-norm"] = self.plan.clip_norm
        return self._construct_messages(RecordDict({"arrays": arrays, "config": config}), self.sampled, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen(server_round, replies)
        old = {k: v.numpy() for k, v in self._global.items()}
        deltas = []
        for msg in accepted:
            new = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            norm = update_norm(new, old)
            for o in self.outcomes:
                if o.node == msg.metadata.src_node_id:
                    o.metrics["update-norm"] = norm
            if norm > self.plan.clip_norm * (1 + 1e-4):
                self.reject(msg, server_round, f"update norm {norm:.4g} exceeds the clip norm {self.plan.clip_norm:g}")
                continue
            deltas.append({k: new[k].astype(np.float64) - old[k] for k in old})
        # Every round releases a noisy average, even with no update: the accountant counts it.
        average = self.sampler.noisy_average(deltas, self.template, self.plan,
                                             expected_clients=self.plan.sample_rate * self.plan.dataset_size)
        return ArrayRecord({k: Array((old[k] + average[k]).astype(np.float32)) for k in old}), None
