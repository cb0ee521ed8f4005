"""SecAgg+ (Bell et al., CCS 2020): parameters, stages, errors and the masks, shared by
the client (client.py) and server (server.py) state machines.

Each client i holds a vector x_i of integers mod 2^m. It sends
    y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) * PRG(s_ij)   (mod 2^m)
where b_i is a fresh random self-mask seed, s_ij is agreed by X25519 with neighbour j
(sign +1 if i < j, else -1, so pairwise masks cancel in the sum) and N(i) is i's set of
neighbours in a k-regular graph (graph.py). Every client t-of-|N(i)| Shamir-shares b_i and
its mask private key among its neighbours. After collecting the y_i of the survivors, the
server asks each neighbour for b-shares of survivors and mask-key shares of clients that
dropped after sharing (never both for one client), rebuilds those secrets, removes the
self masks and the dropped clients' leftover pairwise masks, and obtains sum_i x_i.

Stages, each one server -> clients -> server message round trip:
  advertise  server sends the setup; each client replies with its two public keys
  share      server sends each client its neighbours' keys; it replies with encrypted
             shares (and commitments to them) for each neighbour
  collect    server forwards the shares addressed to each client; it replies with y_i
  unmask     server names each client's surviving and dropped neighbours; it replies
             with the corresponding shares
A client that does not reply in a stage is dropped from then on. Messages are dicts of
ints, bytes, lists of ints, dicts {client id: bytes} and numpy arrays.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.errors import FedtuneError
from fedtune.secagg import crypto, identity
from fedtune.secagg.encoding import MAX_FIELD_BITS, field_dtype, unpack
from fedtune.secagg.graph import neighbour_graph

MAX_CLIENT_ID = (1 << 64) - 1
SHARE_PLAINTEXT_BYTES = 4 + 2 * crypto.SHARE_BYTES  # index, b-share, mask-key share
SHARE_CIPHERTEXT_BYTES = crypto.NONCE_BYTES + SHARE_PLAINTEXT_BYTES + crypto.TAG_BYTES
COMMITMENT_BYTES = 64  # sha256 of the b-share, then of the mask-key share
KIND_B = b"b"
KIND_SK = b"sk"
TAGGED = "tag"  # the associated data's stage field of a neighbour's tag (crypto.tag), no stage's ciphertext


class Stage(enum.StrEnum):
    ADVERTISE = "advertise"
    SHARE = "share"
    COLLECT = "collect"
    CONSISTENCY = "consistency"  # malicious-server mode: each survivor signs the survivor set it was told
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class SecAggError(FedtuneError):
    """A message that breaks the protocol; the text names the client and the problem."""


class SecAggAborted(SecAggError):
    """The round cannot finish securely; no aggregate is produced."""


@dataclass(frozen=True)
class SecAggParams:
    """field_bits: m, vectors are mod 2^m. length: values per vector. degree: neighbours per
    client (k; the full graph when k >= n - 1). threshold: shares needed to rebuild a secret
    (t; default a majority of the neighbours, floor(k/2) + 1). round: binds keys and
    ciphertexts to this round. min_inputs: the fewest real inputs (clients that trained, not
    refusals or dropouts) a released sum may contain; below it the round aborts. colluders: c,
    the clients the server may control that the round still tolerates (raises the default t to
    floor((k + c)/2) + 1 and the quorum to floor((n + c)/2) + 1; docs/secure-aggregation.md)."""

    field_bits: int
    length: int
    degree: int = 8
    threshold: int | None = None
    round: int = 0
    min_inputs: int = 2  # fewest real inputs (not refusals, not dropouts) a released sum may hold
    colluders: int = 0  # corrupted clients tolerated besides a malicious server

    def __post_init__(self) -> None:
        if not 1 <= self.field_bits <= MAX_FIELD_BITS:
            raise FedtuneError(f"secure aggregation: field bits must be 1..{MAX_FIELD_BITS}, not {self.field_bits}")
        if self.length < 1:
            raise FedtuneError(f"secure aggregation: vector length must be positive, not {self.length}")
        if self.degree < 1:
            raise FedtuneError(f"secure aggregation: neighbour degree must be positive, not {self.degree}")
        if self.threshold is not None:
            self._check_threshold(self.threshold, self.degree)
        if self.min_inputs < 2:
            raise FedtuneError(f"secure aggregation: min_inputs must be at least 2, not {self.min_inputs}: a sum "
                               "of one input is that input")
        if not 0 <= self.colluders <= MAX_CLIENT_ID:
            raise FedtuneError(f"secure aggregation: colluders must be >= 0, not {self.colluders}")
        if not 0 <= self.round <= MAX_CLIENT_ID:
            raise FedtuneError(f"secure aggregation: round must be a non-negative 64-bit integer, not {self.round}")

    def degree_for(self, n: int) -> int:
        return min(self.degree, n - 1)

    def threshold_for(self, n: int) -> int:
        """t for n clients, checked: t <= k (rebuildable) and t > k/2 (a server cannot get both
        kinds of share of one client by telling its neighbours different stories)."""
        k = self.degree_for(n)
        t = self.threshold if self.threshold is not None else colluder_threshold(k, self.colluders)
        self._check_threshold(t, k)
        return t

    @staticmethod
    def _check_threshold(t: int, k: int) -> None:
        if not 1 <= t <= k:
            raise FedtuneError(f"secure aggregation: threshold {t} must be between 1 and the {k} neighbours "
                               "each client has")
        if 2 * t <= k:
            raise FedtuneError(f"secure aggregation: threshold {t} must exceed half of the {k} neighbours "
                               f"(at least {k // 2 + 1}) for security")


@dataclass(frozen=True)
class SecAggSetup:
    """Everything public about a round: parameters, participants and the graph seed. With a
    ``roster`` (client id -> identity public key, DER) the round is secure against a malicious
    server: keys, inputs and the survivor set are signed (identity.py) and checked."""

    params: SecAggParams
    client_ids: tuple[int, ...]
    graph_seed: bytes = field(default_factory=lambda: os.urandom(32))
    roster: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = self.client_ids
        for c in ids:
            if not isinstance(c, int | np.integer) or not 0 <= c <= MAX_CLIENT_ID:
                raise FedtuneError(f"secure aggregation: client id {c!r} is not a 64-bit unsigned integer")
        if len(set(ids)) != len(ids):
            dup = sorted({c for c in ids if ids.count(c) > 1})
            raise FedtuneError(f"secure aggregation: client id {dup[0]} appears more than once")
        if len(ids) < 2:
            raise FedtuneError(f"secure aggregation needs at least 2 clients, not {len(ids)}")
        if len(self.graph_seed) != 32:
            raise FedtuneError("secure aggregation: the graph seed must be 32 bytes")
        object.__setattr__(self, "client_ids", tuple(sorted(int(c) for c in ids)))
        if self.roster:
            roster = {int(c): bytes(k) for c, k in self.roster.items()}
            if set(roster) != set(self.client_ids):
                raise FedtuneError("secure aggregation: the identity roster must name exactly the round's clients")
            if not all(identity.check_public(k) for k in roster.values()) or len(set(roster.values())) != len(roster):
                raise FedtuneError("secure aggregation: the identity roster has a malformed or repeated public key")
            object.__setattr__(self, "roster", roster)
        self.params.threshold_for(len(ids))
        self.neighbours  # validates the degree

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def degree(self) -> int:
        return self.params.degree_for(self.n)

    @property
    def threshold(self) -> int:
        return self.params.threshold_for(self.n)

    @property
    def quorum(self) -> int:
        """Signatures on one survivor set a client needs before it reveals shares: more than
        half of the round's clients (two different sets cannot both get that many honest
        signers) and at least t; with c colluders, two such sets share more than c signers
        (floor((n + c)/2) + 1), so one of them is honest and signed one set only."""
        return max(self.threshold, colluder_quorum(self.n, self.params.colluders))

    @cached_property
    def digest(self) -> bytes:
        return identity.setup_digest(self.to_message())

    @cached_property
    def neighbours(self) -> dict[int, frozenset[int]]:
        return neighbour_graph(self.client_ids, self.params.degree, self.graph_seed)

    def to_message(self) -> dict[str, Any]:
        p = self.params
        extra = {"roster": dict(self.roster)} if self.roster else {}
        extra |= {"colluders": p.colluders} if p.colluders else {}  # absent at 0: older setups' digest
        return {**extra, "round": p.round, "field_bits": p.field_bits, "length": p.length, "degree": self.degree,
                "threshold": self.threshold, "min_inputs": p.min_inputs, "client_ids": list(self.client_ids),
                "graph_seed": self.graph_seed}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> SecAggSetup:
        try:
            params = SecAggParams(field_bits=int(msg["field_bits"]), length=int(msg["length"]),
                                  degree=int(msg["degree"]), threshold=int(msg["threshold"]),
                                  round=int(msg["round"]), min_inputs=int(msg["min_inputs"]),
                                  colluders=int(msg.get("colluders") or 0))
            roster = {int(c): bytes(k) for c, k in (msg.get("roster") or {}).items()}
            return cls(params, tuple(int(c) for c in msg["client_ids"]), bytes(msg["graph_seed"]), roster)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SecAggError(f"secure aggregation: malformed setup message ({e!r})") from None


def colluder_threshold(k: int, c: int) -> int:
    """The least t such that c colluding neighbours plus honest ones split between two stories
    cannot rebuild both secrets of one client: 2t - c > k."""
    return (k + c) // 2 + 1


def colluder_quorum(n: int, c: int) -> int:
    """The least quorum such that two quorums among n clients share more than c: 2q - n > c."""
    return (n + c) // 2 + 1


def colluder_shortfall(setup: SecAggSetup, c: int) -> str:
    """'' if ``setup`` tolerates c colluding clients (its threshold, and the quorum its server
    collects, are high enough), else what falls short and the fix."""
    n, k, t = setup.n, setup.degree, setup.threshold
    need_t, need_q = colluder_threshold(k, c), colluder_quorum(n, c)
    if need_t > k:
        return (f"tolerating {c} colluding clients needs t >= {need_t} of each client's {k} neighbours, more than "
                f"it has with {n} clients; lower secagg.colluders below {k} or add clients")
    if t < need_t or setup.params.colluders < c:
        return (f"the server's setup (t={t} of {k} neighbours, quorum {setup.quorum} of {n}, colluders="
                f"{setup.params.colluders}) is below what tolerating {c} colluding clients needs (t >= {need_t}, "
                f"quorum >= {need_q}); set secagg.colluders = {c} (and secagg.threshold = 0 or >= {need_t}) in the run")
    return ""


def sign(me: int, peer: int) -> int:
    """The sign with which ``me`` adds its pairwise mask with ``peer``."""
    return 1 if me < peer else -1


def self_mask(setup: SecAggSetup, owner: int, b: bytes) -> np.ndarray:
    seed = crypto.derive_seed(b, crypto.INFO_SELF_MASK, setup.params.round, owner)
    return crypto.expand(seed, setup.params.length, setup.params.field_bits)


def pair_mask(setup: SecAggSetup, me: int, private: X25519PrivateKey, peer: int, peer_public: bytes) -> np.ndarray:
    """PRG(s_ij), the same from either side: s_ij = HKDF(X25519(sk_me, pk_peer))."""
    seed = crypto.agree(private, peer_public, crypto.INFO_PAIR_MASK, setup.params.round, me, peer)
    return crypto.expand(seed, setup.params.length, setup.params.field_bits)


def neighbour_bits(setup: SecAggSetup, owner: int, chosen: Any) -> bytes:
    """Which of ``owner``'s neighbours (in id order) are in ``chosen``: one bit each."""
    bits = bytearray((len(setup.neighbours[owner]) + 7) // 8)
    for i, j in enumerate(sorted(setup.neighbours[owner])):
        if j in chosen:
            bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def from_bits(setup: SecAggSetup, owner: int, bits: Any) -> set[int]:
    """The neighbours of ``owner`` that neighbour_bits marked (none for a malformed value)."""
    nbrs = sorted(setup.neighbours[owner])
    if not isinstance(bits, bytes) or len(bits) != (len(nbrs) + 7) // 8:
        return set()
    return {j for i, j in enumerate(nbrs) if bits[i // 8] >> (i % 8) & 1}


def field_mask(setup: SecAggSetup) -> np.generic:
    dtype = field_dtype(setup.params.field_bits)
    return dtype.type((1 << setup.params.field_bits) - 1)


def as_message(value: Any, client: int) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SecAggError(f"client {client}: expected a message dict, not {type(value).__name__}")
    return value


def id_map(value: Any, what: str, client: int) -> dict[int, Any]:
    """A {client id: value} dict from a message, keys as ints."""
    if not isinstance(value, Mapping):
        raise SecAggError(f"client {client}: '{what}' must be a dict of client ids, not {type(value).__name__}")
    try:
        return {int(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        raise SecAggError(f"client {client}: '{what}' has a key that is not a client id") from None


def paired_maps(msg: Any, a: str, b: str, client: int, what: str) -> tuple[dict[int, Any], dict[int, Any]]:
    """Two {client id: value} dicts of a message that must cover the same clients."""
    msg = as_message(msg, client)
    first, second = id_map(msg.get(a), a, client), id_map(msg.get(b), b, client)
    if first.keys() != second.keys():
        raise SecAggError(f"client {client}: the server sent {what} different clients")
    return first, second


def id_list(value: Any, what: str, client: int) -> list[int]:
    try:
        return [int(c) for c in value]
    except (TypeError, ValueError):
        raise SecAggError(f"client {client}: '{what}' must be a list of client ids") from None


def field_vector(value: Any, m: int, length: int, cid: int) -> np.ndarray:
    """A masked input, packed bytes or an integer array, as field elements; checked."""
    if isinstance(value, bytes):
        try:
            return unpack(value, m, length)
        except FedtuneError as e:
            raise SecAggError(f"client {cid} sent a malformed masked input: {e}") from None
    x = np.asarray(value) if isinstance(value, np.ndarray) else None
    if x is None or x.dtype.kind not in "ui" or x.shape != (length,):
        desc = f"shape {x.shape} of {x.dtype}" if x is not None else type(value).__name__
        raise SecAggError(f"client {cid} sent a masked input of {desc}, not {length} integers")
    if x.size and (x.min() < 0 or int(x.max()) >> m):
        raise SecAggError(f"client {cid} sent masked values outside [0, 2^{m})")
    return x.astype(field_dtype(m))
