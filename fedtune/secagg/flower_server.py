"""The server's side of SecAgg+ on Flower's Message API: one secure training round.

Each stage is one round trip of TRAIN messages (fedtune.exchange: Flower's grid); the message
config names it under ``secagg-stage`` (the stages: flower.py). The server learns
Σ w_i·Δ_i and Σ w_i of the clients whose inputs are in the sum, never one client's update
or example count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedtune import exchange
from fedtune.errors import FedtuneError
from fedtune.secagg import coin, identity
from fedtune.secagg.roster import KEYS_ENV
from fedtune.secagg.protocol import SecAggAborted, SecAggError, SecAggParams, Stage
from fedtune.secagg.server import SecAggServer
from fedtune.secagg.wire import ENCODING, GRAPH, IDENTIFY, MASKED, STAGE, Encoding, from_record, to_record

Admit = Callable[[int, str, bytes, bytes], str]  # node, name, identity key, its certificate


@dataclass
class SecureRound:
    """What one securely aggregated round produced."""

    arrays: ArrayRecord | None  # the new global adapter; None when nothing was aggregated
    included: list[int]  # nodes whose masked inputs are in the sum
    real: list[int] = field(default_factory=list)  # of those, the nodes that trained (not refusals)
    total_weight: float = 0.0  # Σ w_i (examples) of the included clients
    replies: dict[int, Message] = field(default_factory=dict)  # each node's collect reply
    lost: dict[int, str] = field(default_factory=dict)  # node -> why it is not in the sum
    aborted: str = ""  # non-empty: the round could not finish; nothing was aggregated
    upload_bytes: dict[int, int] = field(default_factory=dict)  # per node, all stages
    names: dict[int, str] = field(default_factory=dict)  # node -> the name its identity key was admitted under
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, server wall time


def _send(grid, requests: dict[int, RecordDict], timeout: float) -> tuple[dict[int, Message], dict[int, str]]:
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node, content in requests.items()]
    ok, failed = {}, {}
    for reply in exchange.send_and_receive(grid, messages, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = (reply.error.reason or "error").strip().splitlines()[-1][:300]
        else:
            ok[node] = reply
    for node in requests:
        if node not in ok and node not in failed:
            failed[node] = f"no reply within {timeout:g} s"
    return ok, failed


def _bodies(ok: dict[int, Message], lost: dict[int, str]) -> dict[int, dict[str, Any]]:
    """The protocol replies; one that cannot be read counts as the node dropping out."""
    bodies = {}
    for node, reply in ok.items():
        try:
            if "reply" not in reply.content.config_records:
                raise SecAggError("the reply has no 'reply' record")
            bodies[node] = from_record(reply.content["reply"])
        except SecAggError as e:
            lost.setdefault(node, f"malformed reply: {e}")
            log(WARNING, "secure aggregation: node %d sent a malformed reply: %s", node, e)
    return bodies


def _bytes_of(msg: Message) -> int:
    c = msg.content
    return sum(r.count_bytes() for r in c.array_records.values()) + sum(r.count_bytes() for r in c.config_records.values())


class _Stages:
    """Sends one protocol stage to nodes and records drops, upload and time in ``out``.
    Collect (training) waits up to ``timeout``; the key stages, which train nothing, up to
    ``stage_timeout`` (a client dead since collect costs that, not Flower's 60 s heartbeat lapse)."""

    def __init__(self, grid, timeout: float, server_round: int, out: SecureRound, stage_timeout: float | None = None):
        self.grid, self.timeout, self.round, self.out = grid, timeout, server_round, out
        self.stage_timeout = timeout if stage_timeout is None else min(timeout, stage_timeout)

    def config(self, name: str, msg: dict[str, Any], **extra: Any) -> ConfigRecord:
        return to_record(msg, **{STAGE: str(name), "server-round": self.round, **extra})

    def send(self, name: str, requests: dict[int, RecordDict]) -> dict[int, Message]:
        t0 = time.perf_counter()
        ok, failed = _send(self.grid, requests, self.timeout if name == Stage.COLLECT else self.stage_timeout)
        self.out.seconds[str(name)] = time.perf_counter() - t0
        for node, reason in failed.items():
            self.out.lost.setdefault(node, f"dropped in stage '{name}': {reason}")
            log(WARNING, "secure aggregation: node %d dropped in stage '%s': %s", node, name, reason)
        for node, reply in ok.items():
            self.out.upload_bytes[node] = self.out.upload_bytes.get(node, 0) + _bytes_of(reply)
        return ok

    def ask(self, name: str, messages: dict[int, dict[str, Any]], **content: Any) -> dict[int, dict[str, Any]]:
        """One stage of protocol messages; the replies' bodies (a malformed one: a dropout)."""
        ok = self.send(name, {n: RecordDict({"config": self.config(name, m), **content}) for n, m in messages.items()})
        return _bodies(ok, self.out.lost)


def _identify(stages: _Stages, nodes: list[int], admit: Admit | None,
              server_commit: bytes) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The round's roster (node -> identity public key) and each node's commitment to its graph
    nonce, for the nodes ``admit`` accepts under the name they give (deployment: that name's
    registered key). Names go to ``out.names``. Without ``admit`` (no keys folder) a node that
    holds a registered key (a deployment) fails the round: names would not be bound."""
    roster, commits = {}, {}
    for node, body in stages.ask(IDENTIFY, {n: {"graph_commit": server_commit} for n in nodes}).items():
        name, public = str(body.get("name", "")), body.get("identity")
        if admit is None and body.get("registered"):
            raise SecAggAborted(f"secure aggregation: stage 'identify': node {node} ({name!r}) holds a registered key "
                                f"(a deployment), but this ServerApp has no {KEYS_ENV} folder to bind names to keys; the round "
                                "fails (start the server with `fedtune server start`)")
        why = "" if isinstance(public, bytes) and identity.check_public(public) else f"node {node} sent no identity key"
        why = why or ("" if isinstance(body.get("nonce_commit"), bytes) and len(body["nonce_commit"]) == 32
                      else f"node {node} sent no commitment to a graph nonce")
        cert = body.get("cert", b"")
        why = why or (admit(node, name, public, cert if isinstance(cert, bytes) else b"") if admit is not None else "")
        if why:
            stages.out.lost.setdefault(node, why)
            log(WARNING, "secure aggregation: stage 'identify': %s; not admitted to the round", why)
            continue
        roster[node], commits[node], stages.out.names[node] = public, body["nonce_commit"], name
    return roster, commits


def _draw_graph(stages: _Stages, commits: dict[int, bytes], server_seed: bytes) -> tuple[bytes, dict[int, bytes]]:
    """Stage 'graph': every admitted node reveals its nonce; one that does not aborts the round
    (the server may not choose whose nonces count). The graph seed and the nonces."""
    shown = coin.digest(commits)
    replies = stages.ask(GRAPH, {n: {"commits_digest": shown} for n in commits})
    nonces = {n: b.get("nonce") for n, b in replies.items()}
    missing = sorted(n for n in commits if not coin.opens(commits[n], nonces.get(n)))
    if missing:
        raise SecAggAborted(f"secure aggregation aborted in stage '{GRAPH}': node {missing[0]} did not reveal the "
                            "nonce it committed to, so the graph cannot be drawn fairly")
    return coin.draw(server_seed, nonces), nonces  # type: ignore[arg-type]


def _turn_away(roster: dict[int, bytes], cap: int, out: SecureRound) -> None:
    """The field holds sums of at most ``cap`` inputs: nodes beyond it (by id) are turned away
    before the round, so extra connected nodes cannot wrap the sum."""
    for node in sorted(roster)[cap:]:
        del roster[node]
        out.lost[node] = f"turned away: the field holds sums of at most {cap} clients"
        log(WARNING, "secure aggregation: node %d %s", node, out.lost[node])


def secure_train(grid, nodes: list[int], server_round: int, arrays: ArrayRecord, encoding: Encoding,
                 degree: int, threshold: int, timeout: float,
                 before_unmask: Callable[[list[int]], str] | None = None, min_inputs: int = 3,
                 admit: Admit | None = None, stage_timeout: float | None = None, colluders: int = 0) -> SecureRound:
    """One training round of ``nodes`` under SecAgg+ secure against a malicious server;
    never raises for a client's fault.

    ``admit(node, name, public key, certificate)`` vets each node's identity (deployment: the name's
    registered key; roster.registered_check; None: no keys folder, a simulation). ``before_unmask(included)`` runs once the
    inputs in the sum are fixed and signed, before anything is unmasked; a non-empty answer
    aborts the round (distributed DP: too few clients' noise, or over budget; its spend is
    written there, durably, before the release)."""
    keys = list(arrays.keys())
    old = {k: arrays[k].numpy() for k in keys}
    coder = encoding.coder()
    params = SecAggParams(field_bits=coder.field_bits, length=coder.length(sum(v.size for v in old.values())),
                          degree=degree, threshold=threshold or None, round=server_round, min_inputs=min_inputs,
                          colluders=colluders)
    out = SecureRound(arrays=None, included=[])
    stages = _Stages(grid, timeout, server_round, out, stage_timeout)
    try:
        server_seed = os.urandom(32)  # committed to before any node replies (coin.py)
        roster, commits = _identify(stages, nodes, admit, coin.commit(server_seed))
        _turn_away(roster, encoding.ddg.max_clients if encoding.ddg is not None else encoding.n_max, out)
        graph_seed, nonces = _draw_graph(stages, {n: commits[n] for n in roster}, server_seed)
        server = SecAggServer(params, sorted(roster), graph_seed=graph_seed, roster=roster)
        reveal = {"server_seed": server_seed, "nonces": nonces}
        result = _protocol(server, stages, arrays, encoding, before_unmask, reveal)
    except SecAggAborted as e:
        out.aborted = str(e)
        log(WARNING, "%s; round %d aggregates nothing", e, server_round)
        return out
    except FedtuneError as e:  # too few nodes admitted, or our own bookkeeping broke: still nothing partial
        out.aborted = f"secure aggregation failed: {e}"
        log(WARNING, "%s; round %d aggregates nothing", out.aborted, server_round)
        return out
    for node, reason in server.rejected.items():
        out.lost.setdefault(node, reason)
    out.included, out.real = list(result.clients), list(result.real)
    t0 = time.perf_counter()
    weighted, total_weight = coder.decode(result.total, len(result.clients))
    out.total_weight = total_weight
    if total_weight >= 0.5:  # at least one example behind the sum (refusing clients send weight 0)
        delta = weighted / total_weight
        new, start = {}, 0
        for k in keys:
            n = old[k].size
            new[k] = Array((old[k] + delta[start:start + n].reshape(old[k].shape)).astype(np.float32))
            start += n
        out.arrays = ArrayRecord(new)
    out.seconds["decode"] = time.perf_counter() - t0
    log(INFO, "secure aggregation: %d of %d clients in the sum, %d of them real inputs (total weight %.0f)",
        len(out.included), len(nodes), len(out.real), total_weight)
    return out


def _protocol(server: SecAggServer, stages: _Stages, arrays: ArrayRecord, encoding: Encoding,
              before_unmask: Callable[[list[int]], str] | None, reveal: dict[str, Any]):
    """advertise, share, collect, consistency, unmask: the SecAggResult, or SecAggAborted."""
    setup = {n: {**server.advertise_request(), **reveal} for n in server.setup.client_ids}
    ok = stages.send(Stage.ADVERTISE, {n: RecordDict({"config": stages.config(Stage.ADVERTISE, m, **{
        ENCODING: encoding.to_json()})}) for n, m in setup.items()})
    server.receive_advertise(_bodies(ok, stages.out.lost))
    server.receive_share(stages.ask(Stage.SHARE, server.share_requests()))
    ok = stages.send(Stage.COLLECT, {n: RecordDict({"config": stages.config(Stage.COLLECT, m), "arrays": arrays})
                                     for n, m in server.collect_requests().items()})
    stages.out.replies = ok
    inputs = {}
    for n, r in ok.items():
        if MASKED in r.content.array_records and MASKED in r.content[MASKED]:
            said = from_record(r.content["reply"]) if "reply" in r.content.config_records else {}
            inputs[n] = {MASKED: r.content[MASKED][MASKED].numpy().tobytes(),
                         **{k: said[k] for k in ("real", "decl", "bound", "masked_with", "tags") if k in said}}
        else:
            inputs[n] = {}  # rejected by the server: no masked input
    server.receive_collect(inputs)
    server.receive_consistency(stages.ask(Stage.CONSISTENCY, server.consistency_requests()))
    reason = before_unmask(sorted(server.active)) if before_unmask is not None else ""
    if reason:
        raise SecAggAborted(reason)
    return server.receive_unmask(stages.ask(Stage.UNMASK, server.unmask_requests()))

