"""SecAgg+ on Flower's Message API: the server's training round and the client's stages.

Each protocol stage is one round trip of TRAIN messages through ``Grid.send_and_receive``;
the message config names it under ``secagg-stage``:

  identify     -> the node's name and identity public key (roster.py; deployment: only
               a name's registered key is admitted)
  advertise    setup (parameters, clients, graph seed, roster, encoding) -> two public
               keys, signed with the identity key
  share        the neighbours' signed public keys -> encrypted shares for each neighbour
  collect      the global adapter and the shares addressed to this client -> the client
               trains (spending from its ledger first), encodes [w·Δ, w] in fixed point
               and sends it masked, with a signed "real input or refusal"
  consistency  the survivor set and their signed declarations -> the set, signed
  unmask       which neighbours survived or dropped, and the survivors' signatures ->
               the shares the server needs (only if a quorum signed the same set)

The server learns Σ w_i·Δ_i and Σ w_i of the clients whose inputs are in the sum, and
adds Σ w_i·Δ_i / Σ w_i to the global adapter. It never sees one client's update or its
example count. A client's protocol secrets stay in its own node state between stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from fedtune.errors import FedtuneError
from fedtune.secagg import identity
from fedtune.secagg.client import SecAggClient
from fedtune.privacy.distributed import DDGPlan
from fedtune.secagg.encoding import DistributedGaussian, FixedPoint, WeightedFixedPoint
from fedtune.secagg.roster import node_identity
from fedtune.secagg.protocol import SecAggAborted, SecAggError, SecAggParams, Stage
from fedtune.secagg.server import SecAggServer

STAGE = "secagg-stage"
STATE = "fedtune-secagg"  # the client's round secrets, in its Context.state
ENCODING = "secagg-encoding"
MASKED = "masked"
IDENTIFY = "identify"  # before the protocol: each node names itself and its identity key (roster.py)


# ---- protocol messages <-> Flower ConfigRecords ------------------------------------------
# Client ids are Flower node ids (unsigned 64-bit), beyond ConfigRecord's signed ints: they
# travel as strings. {id: bytes} maps travel as two parallel lists; an empty map or list
# as a marker (Flower cannot count the bytes of an empty list).
def to_record(msg: dict[str, Any], **extra: Any) -> ConfigRecord:
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if isinstance(value, (dict, list, tuple)) and not value:
            out[f"{key}.empty"] = "dict" if isinstance(value, dict) else "list"
        elif isinstance(value, dict):
            out[f"{key}.ids"] = [str(k) for k in value]
            out[f"{key}.values"] = [bytes(v) for v in value.values()]
        elif isinstance(value, (list, tuple)):
            out[f"{key}.list"] = [str(v) for v in value]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[f"{key}.int"] = str(int(value))
        else:
            out[key] = value
    return ConfigRecord({**out, **extra})


def from_record(record: ConfigRecord) -> dict[str, Any]:
    msg: dict[str, Any] = {}
    try:
        for key, value in record.items():
            name, _, kind = key.rpartition(".")
            if kind == "ids":
                values = record[f"{name}.values"]
                if len(values) != len(value):
                    raise ValueError(f"'{name}' has {len(value)} ids but {len(values)} values")
                msg[name] = {int(k): bytes(v) for k, v in zip(value, values)}
            elif kind == "list":
                msg[name] = [int(v) for v in value]
            elif kind == "int":
                msg[name] = int(value)
            elif kind == "empty":
                msg[name] = {} if value == "dict" else []
            elif kind != "values":
                msg[key] = value
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"secure aggregation: malformed protocol message ({e})") from None
    return msg


@dataclass(frozen=True)
class Encoding:
    """How updates become field elements; public, sent with the setup. With ``ddg`` set
    (client-level DP under secure aggregation) each client adds its own noise."""

    bits: int
    clip: float
    max_weight: float
    n_max: int
    ddg: DDGPlan | None = None

    def coder(self) -> WeightedFixedPoint | DistributedGaussian:
        if self.ddg is not None:
            return DistributedGaussian(self.ddg)
        return WeightedFixedPoint(FixedPoint(self.clip, self.bits, self.n_max), self.max_weight)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Encoding:
        try:
            d = json.loads(text)
            ddg = DDGPlan.from_dict(d["ddg"]) if d.get("ddg") else None
            return cls(int(d["bits"]), float(d["clip"]), float(d["max_weight"]), int(d["n_max"]), ddg)
        except (KeyError, TypeError, ValueError, FedtuneError) as e:
            raise SecAggError(f"secure aggregation: malformed encoding ({e})") from None


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).reshape(-1) for k in keys])


# ---- the server's round ---------------------------------------------------------------
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
    for reply in grid.send_and_receive(messages, timeout=timeout):
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
    """Sends one protocol stage to nodes and records drops, upload and time in ``out``."""

    def __init__(self, grid, timeout: float, server_round: int, out: SecureRound):
        self.grid, self.timeout, self.round, self.out = grid, timeout, server_round, out

    def config(self, name: str, msg: dict[str, Any], **extra: Any) -> ConfigRecord:
        return to_record(msg, **{STAGE: str(name), "server-round": self.round, **extra})

    def send(self, name: str, requests: dict[int, RecordDict]) -> dict[int, Message]:
        t0 = time.perf_counter()
        ok, failed = _send(self.grid, requests, self.timeout)
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


def _identify(stages: _Stages, nodes: list[int], admit: Callable[[int, str, bytes], str]) -> dict[int, bytes]:
    """The round's roster: node -> identity public key, for the nodes ``admit`` accepts under
    the name they give (deployment: that name's registered key). Names go to ``out.names``."""
    roster = {}
    for node, body in stages.ask(IDENTIFY, {n: {} for n in nodes}).items():
        name, public = str(body.get("name", "")), body.get("identity")
        why = "" if isinstance(public, bytes) and identity.check_public(public) else f"node {node} sent no identity key"
        why = why or admit(node, name, public)
        if why:
            stages.out.lost.setdefault(node, why)
            log(WARNING, "secure aggregation: stage 'identify': %s; not admitted to the round", why)
            continue
        roster[node], stages.out.names[node] = public, name
    return roster


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
                 admit: Callable[[int, str, bytes], str] | None = None) -> SecureRound:
    """One training round of ``nodes`` under SecAgg+ secure against a malicious server;
    never raises for a client's fault.

    ``admit(node, name, public key)`` vets each node's identity (deployment: the name's
    registered key; roster.registered_check). ``before_unmask(included)`` runs once the
    inputs in the sum are fixed and signed, before anything is unmasked; a non-empty answer
    aborts the round (distributed DP: too few clients' noise, or over budget; its spend is
    written there, durably, before the release)."""
    keys = list(arrays.keys())
    old = {k: arrays[k].numpy() for k in keys}
    coder = encoding.coder()
    params = SecAggParams(field_bits=coder.field_bits, length=coder.length(sum(v.size for v in old.values())),
                          degree=degree, threshold=threshold or None, round=server_round, min_inputs=min_inputs)
    out = SecureRound(arrays=None, included=[])
    stages = _Stages(grid, timeout, server_round, out)
    try:
        roster = _identify(stages, nodes, admit or (lambda node, name, public: ""))
        _turn_away(roster, encoding.ddg.max_clients if encoding.ddg is not None else encoding.n_max, out)
        server = SecAggServer(params, sorted(roster), roster=roster)
        result = _protocol(server, stages, arrays, encoding, before_unmask)
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
              before_unmask: Callable[[list[int]], str] | None):
    """advertise, share, collect, consistency, unmask: the SecAggResult, or SecAggAborted."""
    setup = {n: server.advertise_request() for n in server.setup.client_ids}
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
            inputs[n] = {MASKED: r.content[MASKED][MASKED].numpy().tobytes(), "real": said.get("real"),
                         "decl": said.get("decl")}
        else:
            inputs[n] = {}  # rejected by the server: no masked input
    server.receive_collect(inputs)
    server.receive_consistency(stages.ask(Stage.CONSISTENCY, server.consistency_requests()))
    reason = before_unmask(sorted(server.active)) if before_unmask is not None else ""
    if reason:
        raise SecAggAborted(reason)
    return server.receive_unmask(stages.ask(Stage.UNMASK, server.unmask_requests()))


# ---- the client's side ------------------------------------------------------------------
@dataclass
class LocalUpdate:
    """What local training gave: the new adapter (None if the client refused) and what it
    may reveal in the clear (metrics) or keep inside the sum (weight)."""

    state: dict[str, np.ndarray] | None
    weight: float
    metrics: dict[str, Any]
    client: dict[str, Any]
    seed: bytes | None = None  # tests only (privacy.seed): the encoding's rounding and noise; None = OS entropy


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
                 who: Callable[[], str] | None = None) -> Message:
    """Answer one SecAgg+ stage. ``train`` runs the local round (ledger first) for collect;
    ``check`` vets the server's encoding at setup (raising to refuse the round);
    ``min_inputs()`` is this client's own floor on real inputs per sum (a setup with a lower
    one is refused); ``who()`` its name. Its identity key: roster.node_identity."""
    config = msg.content["config"]
    key = node_identity(context)
    if str(config.get(STAGE)) == IDENTIFY:
        return _reply(msg, {"name": who() if who is not None else f"node-{context.node_id}",
                            "identity": identity.public_bytes(key)})
    try:
        stage = Stage(str(config[STAGE]))
    except ValueError:
        raise SecAggError(f"secure aggregation: unknown stage {config[STAGE]!r}") from None
    if stage is Stage.ADVERTISE:
        return _advertise(msg, context, key, check, min_inputs)
    client = _load(context, stage, key)
    if stage is Stage.COLLECT:
        return _collect(msg, context, client, train)
    if stage is Stage.SHARE:
        reply = client.share_keys(from_record(config))
    elif stage is Stage.CONSISTENCY:
        reply = client.consistency(from_record(config))
    elif stage is Stage.UNMASK:
        reply = client.unmask(from_record(config))
        del context.state[STATE]
        return _reply(msg, reply)
    else:
        raise SecAggError(f"secure aggregation: stage '{stage}' is not one a client answers")
    _save(context, client)
    return _reply(msg, reply)


def _advertise(msg: Message, context: Context, key: identity.SigningKey, check: Callable[[Encoding], None] | None,
               min_inputs: Callable[[], int] | None) -> Message:
    config = msg.content["config"]
    body = from_record(config)
    client = SecAggClient(context.node_id, {k: body.get(k) for k in (
        "round", "field_bits", "length", "degree", "threshold", "min_inputs", "client_ids", "graph_seed", "roster")}, key)
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
    reply = client.masked_input(coder.encode(delta, weight, seed=update.seed), real=update.state is not None)
    seconds = time.perf_counter() - t0  # encoding (and noise) plus masking: this client's own cost
    _save(context, client)
    packed = np.frombuffer(reply[MASKED], dtype=np.uint8)
    metrics = {**update.metrics, "upload-bytes": int(packed.size), "secagg-seconds": seconds}
    return Message(RecordDict({MASKED: ArrayRecord({MASKED: Array(packed)}), "metrics": MetricRecord(metrics),
                               "reply": to_record({k: reply[k] for k in ("real", "decl") if k in reply}),
                               "client": ConfigRecord(update.client)}), reply_to=msg)
