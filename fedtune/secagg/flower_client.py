"""The client's side of SecAgg+ on Flower's Message API: one handler per stage (flower.py).

A client's protocol secrets stay in its own node state (Context.state) between stages.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from logging import WARNING
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedtune.secagg import coin, identity
from fedtune.secagg.client import SecAggClient
from fedtune.secagg.protocol import SecAggError, Stage
from fedtune.secagg.roster import certificate, node_identity, registered
from fedtune.secagg.wire import ENCODING, GRAPH, IDENTIFY, MASKED, STAGE, STATE, Encoding, flatten, from_record, to_record

COIN = "fedtune-secagg-coin"  # the graph seed's coin toss, between identify and advertise (coin.py)
SETUP_KEYS = ("round", "field_bits", "length", "degree", "threshold", "min_inputs", "client_ids", "graph_seed", "roster",
              "colluders")


@dataclass
class LocalUpdate:
    """What local training gave: the new adapter (None if the client refused) and what it
    may reveal in the clear (metrics) or keep inside the sum (weight)."""

    state: dict[str, np.ndarray] | None
    weight: float
    metrics: dict[str, Any]
    client: dict[str, Any]
    seed: bytes | None = None  # tests only (privacy.seed): the encoding's rounding and noise; None = OS entropy
    bound: bytes = b""  # a resend: the digest of the input set its first sum had (identity.input_set)


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE] = ConfigRecord({"blob": client.to_bytes()})


def _load(context: Context, stage: Stage, key: identity.SigningKey) -> SecAggClient:
    record = context.state.config_records.get(STATE)
    if record is None:
        raise SecAggError(f"secure aggregation: stage '{stage}' arrived but this client holds no round state "
                          "(it missed the advertise stage)")
    return SecAggClient.from_bytes(record["blob"], key)


def _reply(msg: Message, body: dict[str, Any]) -> Message:
    return Message(RecordDict({"reply": to_record(body)}), reply_to=msg)


def handle_stage(msg: Message, context: Context, train: Callable[[Message], LocalUpdate | Message],
                 check: Callable[[Encoding], None] | None = None,
                 min_inputs: Callable[[], int] | None = None,
                 who: Callable[[], str] | None = None,
                 bind: Callable[[int, bytes], None] | None = None,
                 keep: Callable[[], Path | None] | None = None, colluders: Callable[[], int] | None = None) -> Message:
    """Answer one SecAgg+ stage. ``train`` runs the local round (ledger first) for collect;
    ``check`` vets the server's encoding at setup (raising to refuse the round);
    ``min_inputs()`` is this client's own floor on real inputs per sum (a setup with a lower
    one is refused); ``who()`` its name; ``bind(round, input set)`` records, before this
    client signs it, the input set its update goes into (a resend must match it; raising
    refuses); ``colluders()`` the corrupted clients this client's round must tolerate (a setup
    that cannot is refused). Its identity key: roster.node_identity (simulation: kept in the file ``keep()``)."""
    config = msg.content["config"]
    key = node_identity(context, keep() if keep is not None else None)
    if str(config.get(STAGE)) in (IDENTIFY, GRAPH):
        return _coin_stage(msg, context, key, who)
    try:
        stage = Stage(str(config[STAGE]))
    except ValueError:
        raise SecAggError(f"secure aggregation: unknown stage {config[STAGE]!r}") from None
    if stage is Stage.ADVERTISE:
        return _advertise(msg, context, key, check, min_inputs, colluders() if colluders is not None else 0)
    client = _load(context, stage, key)
    if stage is Stage.COLLECT:
        return _collect(msg, context, client, train)
    if stage is Stage.SHARE:
        reply = client.share_keys(from_record(config))
    elif stage is Stage.CONSISTENCY:
        reply = client.consistency(from_record(config))
        if bind is not None:  # durable before the signature leaves
            bind(client.setup.params.round, client.input_set)
    elif stage is Stage.UNMASK:
        reply = client.unmask(from_record(config))
        del context.state[STATE]
        return _reply(msg, reply)
    else:
        raise SecAggError(f"secure aggregation: stage '{stage}' is not one a client answers")
    _save(context, client)
    return _reply(msg, reply)


def _coin_stage(msg: Message, context: Context, key: identity.SigningKey, who: Callable[[], str] | None) -> Message:
    """identify: name, identity key (deployment: with its certificate) and a commitment to a
    fresh graph nonce; graph: the nonce, once the server fixed the commitments' digest."""
    body = from_record(msg.content["config"])
    if str(msg.content["config"][STAGE]) == IDENTIFY:
        server_commit = body.get("graph_commit")
        if not isinstance(server_commit, bytes) or len(server_commit) != 32:
            raise SecAggError("secure aggregation: stage 'identify': the server did not commit to its graph seed "
                              "(the graph would be its choice); refusing the round")
        nonce = os.urandom(coin.NONCE_BYTES)
        context.state[COIN] = ConfigRecord({"json": json.dumps({"server": server_commit.hex(), "nonce": nonce.hex()})})
        public = identity.public_bytes(key)
        reply = {"name": who() if who is not None else f"node-{context.node_id}", "identity": public,
                 "registered": int(registered(context)), "nonce_commit": coin.commit(nonce)}
        return _reply(msg, {**reply, "cert": certificate(context, public)} if reply["registered"] else reply)
    state = _coin(context, GRAPH)
    shown = body.get("commits_digest")
    if not isinstance(shown, bytes) or len(shown) != 32:
        raise SecAggError(f"client {context.node_id}: stage 'graph': the server fixed no list of nonce commitments; "
                          "refusing the round")
    state["commits"] = shown.hex()
    context.state[COIN] = ConfigRecord({"json": json.dumps(state)})
    return _reply(msg, {"nonce": bytes.fromhex(state["nonce"])})


def _coin(context: Context, stage: str) -> dict[str, Any]:
    record = context.state.config_records.get(COIN)
    if record is None:
        raise SecAggError(f"secure aggregation: stage '{stage}' arrived but this client holds no graph commitment "
                          "(it missed stage 'identify'); refusing the round")
    return json.loads(str(record["json"]))


def _check_graph(context: Context, setup: dict[str, Any]) -> None:
    """The setup's graph seed is the coin toss's (coin.check_setup), or the round is refused."""
    state = _coin(context, "advertise")
    if "commits" not in state:
        raise SecAggError(f"client {context.node_id}: stage 'advertise' arrived before stage 'graph'; refusing the round")
    del context.state[COIN]  # one setup per coin toss
    coin.check_setup(context.node_id, setup, bytes.fromhex(state["server"]), bytes.fromhex(state["commits"]),
                     bytes.fromhex(state["nonce"]))


def _advertise(msg: Message, context: Context, key: identity.SigningKey, check: Callable[[Encoding], None] | None,
               min_inputs: Callable[[], int] | None, colluders: int = 0) -> Message:
    config = msg.content["config"]
    body = from_record(config)
    client = SecAggClient(context.node_id, {k: body.get(k) for k in SETUP_KEYS}, key, colluders)
    if not client.setup.roster:
        raise SecAggError("secure aggregation: stage 'advertise': the server's setup has no identity roster (the "
                          "checks against a lying server would be off); refusing the round")
    if min_inputs is not None and client.setup.params.min_inputs < min_inputs():
        raise SecAggError(f"secure aggregation: the server asks for sums of at least "
                          f"{client.setup.params.min_inputs} real inputs, this client's secagg.min_inputs is "
                          f"{min_inputs()}; refusing the round")
    encoding = Encoding.from_json(str(config.get(ENCODING, "")))  # readable, or a SecAggError now
    if check is not None:
        check(encoding)
    cap = encoding.ddg.max_clients if encoding.ddg is not None else encoding.n_max
    if client.setup.n > cap or client.setup.params.field_bits != encoding.coder().field_bits:
        raise SecAggError(f"secure aggregation: stage 'advertise': the server's round of {client.setup.n} clients "
                          f"does not fit its field (sums of at most {cap}, {encoding.coder().field_bits} bits); "
                          "refusing the round")
    _check_graph(context, body)  # last: the setup's own checks name their problem first
    reply = client.advertise_keys()
    _save(context, client)
    context.state[ENCODING] = ConfigRecord({"json": str(config[ENCODING])})
    return _reply(msg, reply)


def _collect(msg: Message, context: Context, client: SecAggClient,
             train: Callable[[Message], LocalUpdate | Message]) -> Message:
    client.receive_shares(from_record(msg.content["config"]))  # a tampered share stops us before we spend
    update = train(msg)
    if isinstance(update, Message):  # training failed: an error reply, we drop out
        return update
    global_arrays = msg.content["arrays"]
    keys = list(global_arrays.keys())
    encoding = Encoding.from_json(context.state.config_records[ENCODING]["json"])
    coder = encoding.coder()
    if update.state is None:  # refused: a zero update (weight 0; under distributed DP plus its noise)
        delta, weight = np.zeros(sum(int(np.prod(global_arrays[k].shape)) for k in keys)), 0.0
    else:
        delta = flatten(update.state, keys) - flatten({k: global_arrays[k].numpy() for k in keys}, keys)
        weight = update.weight
        clipped = int((np.abs(delta) > coder.fixed_point.clip).sum()) if encoding.ddg is None else 0
        if clipped:
            log(WARNING, "secure aggregation: %d of %d update values exceed secagg.clip=%g and were clipped; "
                "raise secagg.clip", clipped, delta.size, coder.fixed_point.clip)
    t0 = time.perf_counter()
    reply = client.masked_input(coder.encode(delta, weight, seed=update.seed), real=update.state is not None,
                                bound=update.bound)
    seconds = time.perf_counter() - t0  # encoding (and noise) plus masking: this client's own cost
    _save(context, client)
    packed = np.frombuffer(reply[MASKED], dtype=np.uint8)
    metrics = {**update.metrics, "upload-bytes": int(packed.size), "secagg-seconds": seconds}
    return Message(RecordDict({MASKED: ArrayRecord({MASKED: Array(packed)}), "metrics": MetricRecord(metrics),
                               "reply": to_record({k: reply[k] for k in ("real", "decl", "bound", "masked_with", "tags") if k in reply}),
                               "client": ConfigRecord(update.client)}), reply_to=msg)
