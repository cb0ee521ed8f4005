"""The SecAgg+ server: collects each stage's replies, drops whoever does not answer,
checks the thresholds of Bell et al. and, at the end, removes the masks.

    server = SecAggServer(params, client_ids)
    broadcast(server.advertise_request());  server.receive_advertise(replies)
    send(server.share_requests());          server.receive_share(replies)
    send(server.collect_requests());        server.receive_collect(replies)
    send(server.consistency_requests());    server.receive_consistency(replies)   # with a roster only
    send(server.unmask_requests());         result = server.receive_unmask(replies)

``replies`` is {client id: message} or (client id, message) pairs (so duplicates show). A
reply from an unknown or dropped client, or one that breaks the protocol, rejects its sender
(recorded in ``rejected``, naming it); the round goes on while the thresholds hold:

* every stage keeps at least max(t, 2) clients;
* the masked inputs include at least min_inputs real ones (a refusing client says it
  masked no update), checked before any share is asked for;
* every client that shares keeps at least t neighbours (they hold its shares);
* every surviving client's self-mask seed, and the mask key of every dropped client
  whose pairwise masks are in a survivor's input, get t valid shares.

Otherwise the round aborts with SecAggAborted: nothing collected is kept, no partial sum
returned. Revealed shares are checked against their owner's commitments from the share stage.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.errors import FedtuneError
from fedtune.secagg import crypto, identity
from fedtune.secagg.encoding import field_dtype
from fedtune.secagg.protocol import (
    COMMITMENT_BYTES, KIND_B, KIND_SK, SHARE_CIPHERTEXT_BYTES, SecAggAborted, SecAggError, SecAggParams,
    SecAggSetup, Stage, field_mask, field_vector, id_map, pair_mask, self_mask, sign,
)
from fedtune.secagg.server_roster import RosterStages

log = logging.getLogger(__name__)

Replies = Mapping[int, Any] | Iterable[tuple[int, Any]]


@dataclass
class SecAggResult:
    """total: sum mod 2^m of the inputs of ``clients`` (sorted ids). dropped: client ->
    the stage it did not complete. rejected: client -> why its message was refused."""

    total: np.ndarray
    clients: tuple[int, ...]
    dropped: dict[int, Stage] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    real: tuple[int, ...] = ()  # the clients whose input is a real (trained) update


class SecAggServer(RosterStages):
    def __init__(self, params: SecAggParams, client_ids: Iterable[int], graph_seed: bytes | None = None,
                 roster: Mapping[int, bytes] | None = None):
        ids, seed = tuple(client_ids), graph_seed if graph_seed is not None else os.urandom(32)
        self.setup = SecAggSetup(params, ids, seed, dict(roster or {}))
        self.stage = Stage.ADVERTISE
        self.active: set[int] = set(self.setup.client_ids)  # clients still in the round
        self.dropped: dict[int, Stage] = {}
        self.rejected: dict[int, str] = {}
        self._pk_enc: dict[int, bytes] = {}
        self._pk_mask: dict[int, bytes] = {}
        self._holders: dict[int, list[int]] = {}  # owner -> clients its shares went to (sorted: index - 1)
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # owner -> holder -> ciphertext
        self._commitments: dict[int, dict[int, bytes]] = {}
        self._forwarded: dict[int, set[int]] = {}  # holder -> owners whose shares it got (= masked with)
        self._masked: dict[int, np.ndarray] = {}
        self._real: set[int] = set()  # clients whose masked input says it is a real (trained) update
        self._sigs: dict[str, dict[int, bytes]] = {"keys": {}, "decl": {}, "survivors": {}}  # with a roster
        self._tags: dict[str, dict[int, dict[int, bytes]]] = {"decl": {}, "survivors": {}}  # owner -> neighbour -> tag
        self._asked: dict[int, tuple[set[int], set[int]]] = {}  # holder -> (survivors, dropped) asked
        self._bound: dict[int, bytes] = {}  # resends: the input set of their first sum
        self._masked_with: dict[int, bytes] = {}  # each input's declared masking neighbours (protocol.neighbour_bits)
        self._statement: tuple[list[int], ...] = ()  # (survivors, real, resent) the survivors sign

    @property
    def threshold(self) -> int:
        return self.setup.threshold

    # -- bookkeeping ------------------------------------------------------------------
    def _expect(self, stage: Stage) -> None:
        if self.stage is Stage.ABORTED:
            raise SecAggAborted("secure aggregation: the round was aborted")
        if self.stage is not stage:
            raise SecAggError(f"secure aggregation: server asked for stage '{stage}' while in stage '{self.stage}'")

    def _reject(self, client: int, reason: str) -> None:
        self.rejected.setdefault(client, reason)
        log.warning("secure aggregation: %s", reason)

    def _drop(self, client: int) -> None:
        if client in self.active:
            self.active.discard(client)
            self.dropped[client] = self.stage

    def _abort(self, reason: str) -> SecAggAborted:
        stage, self.stage = self.stage, Stage.ABORTED
        self._masked.clear()
        self._ciphertexts.clear()
        return SecAggAborted(f"secure aggregation aborted in stage '{stage}': {reason}")

    def _replies(self, replies: Replies) -> dict[int, Any]:
        """The replies of active clients, once each; the rest are rejected."""
        pairs = list(replies.items() if isinstance(replies, Mapping) else replies)
        counts = Counter(cid for cid, _ in pairs)
        accepted = {}
        for cid, msg in pairs:
            if cid not in self.setup.neighbours:
                self._reject(cid, f"unknown client {cid} replied in stage '{self.stage}'")
            elif counts[cid] > 1:
                self._reject(cid, f"client {cid} replied {counts[cid]} times in stage '{self.stage}'")
            elif cid not in self.active:
                self._reject(cid, f"client {cid} replied in stage '{self.stage}' after being dropped")
            elif not isinstance(msg, Mapping):
                self._reject(cid, f"client {cid} sent a {type(msg).__name__}, not a message dict")
            else:
                accepted[cid] = msg
        return accepted

    def _keep(self, valid: set[int]) -> None:
        """Drop the active clients not in ``valid``, then check the stage has enough clients."""
        for cid in sorted(self.active - valid):
            self._drop(cid)
        need = max(self.threshold, 2)
        if len(self.active) < need:
            raise self._abort(f"only {len(self.active)} clients remain, {need} needed")

    def _prune(self, peers: Mapping[int, Iterable[int]]) -> None:
        """Drop clients left with fewer than t active peers, until none is."""
        while short := [c for c in sorted(self.active) if len(set(peers[c]) & self.active) < self.threshold]:
            for c in short:
                self._drop(c)

    # -- advertise --------------------------------------------------------------------
    def advertise_request(self) -> dict[str, Any]:
        """The setup, the same for every client."""
        self._expect(Stage.ADVERTISE)
        return self.setup.to_message()

    def receive_advertise(self, replies: Replies) -> None:
        self._expect(Stage.ADVERTISE)
        valid = set()
        for cid, msg in self._replies(replies).items():
            try:
                pk_enc, pk_mask = bytes(msg["pk_enc"]), bytes(msg["pk_mask"])
                crypto.check_public_key(pk_enc)
                crypto.check_public_key(pk_mask)
            except (KeyError, TypeError, ValueError) as e:
                self._reject(cid, f"client {cid} advertised malformed public keys ({e})")
                continue
            if not self._signed(cid, "keys", msg.get("sig"), identity.ADVERTISE, cid, pk_enc, pk_mask):
                continue
            self._pk_enc[cid], self._pk_mask[cid] = pk_enc, pk_mask
            valid.add(cid)
        seen = Counter(k for c in valid for k in (self._pk_enc[c], self._pk_mask[c]))
        for cid in sorted(valid):
            if seen[self._pk_enc[cid]] > 1 or seen[self._pk_mask[cid]] > 1 or self._pk_enc[cid] == self._pk_mask[cid]:
                self._reject(cid, f"client {cid} advertised a public key that is not unique")
                valid.discard(cid)
        self._keep(valid)
        self._prune(self.setup.neighbours)
        self._keep(self.active)
        self.stage = Stage.SHARE

    # -- share ------------------------------------------------------------------------
    def share_requests(self) -> dict[int, dict[str, dict[int, bytes]]]:
        """Each active client gets the keys of its active neighbours; its shares go to them."""
        self._expect(Stage.SHARE)
        requests = {}
        for cid in sorted(self.active):
            peers = sorted(self.setup.neighbours[cid] & self.active)
            self._holders[cid] = peers
            requests[cid] = {"pk_enc": {j: self._pk_enc[j] for j in peers},
                             "pk_mask": {j: self._pk_mask[j] for j in peers}}
            if self.setup.roster:
                requests[cid]["sigs"] = {j: self._sigs["keys"][j] for j in peers}
        return requests

    def receive_share(self, replies: Replies) -> None:
        self._expect(Stage.SHARE)
        if not self._holders:
            raise SecAggError("secure aggregation: receive_share before share_requests")
        valid = set()
        for cid, msg in self._replies(replies).items():
            try:
                cts = id_map(msg.get("ciphertexts"), "ciphertexts", cid)
                coms = id_map(msg.get("commitments"), "commitments", cid)
                expected = set(self._holders[cid])
                if cts.keys() != expected or coms.keys() != expected:
                    raise SecAggError(f"client {cid} sent shares to {sorted(cts)} instead of its neighbours "
                                      f"{sorted(expected)}")
                for j in expected:
                    if not isinstance(cts[j], bytes) or len(cts[j]) != SHARE_CIPHERTEXT_BYTES:
                        raise SecAggError(f"client {cid} sent a malformed share ciphertext for client {j}")
                    if not isinstance(coms[j], bytes) or len(coms[j]) != COMMITMENT_BYTES:
                        raise SecAggError(f"client {cid} sent a malformed share commitment for client {j}")
            except SecAggError as e:
                self._reject(cid, str(e))
                continue
            self._ciphertexts[cid], self._commitments[cid] = cts, coms
            valid.add(cid)
        self._keep(valid)
        self._prune(self._holders)
        self._keep(self.active)
        self.stage = Stage.COLLECT

    # -- collect ----------------------------------------------------------------------
    def collect_requests(self) -> dict[int, dict[str, dict[int, bytes]]]:
        """Each active client gets the shares its active neighbours addressed to it."""
        self._expect(Stage.COLLECT)
        requests = {}
        for cid in sorted(self.active):
            owners = sorted(o for o in self._holders[cid] if o in self.active)
            self._forwarded[cid] = set(owners)
            requests[cid] = {"ciphertexts": {o: self._ciphertexts[o][cid] for o in owners},
                             "commitments": {o: self._commitments[o][cid] for o in owners}}
        return requests

    def receive_collect(self, replies: Replies) -> None:
        self._expect(Stage.COLLECT)
        if not self._forwarded:
            raise SecAggError("secure aggregation: receive_collect before collect_requests")
        m, length = self.setup.params.field_bits, self.setup.params.length
        valid = set()
        for cid, msg in self._replies(replies).items():
            try:
                self._masked[cid] = field_vector(msg.get("masked"), m, length, cid)
                if msg.get("real") not in (0, 1):
                    raise SecAggError(f"client {cid} did not say whether its input is real (0 or 1)")
            except FedtuneError as e:
                self._masked.pop(cid, None)
                self._reject(cid, str(e))
                continue
            bound, mw = msg.get("bound", b""), msg.get("masked_with")  # malformed: b"?", fails to verify
            bound, mw = bound if isinstance(bound, bytes) and len(bound) in (0, 32) else b"?", mw if isinstance(mw, bytes) else b"?"
            if not self._signed(cid, "decl", msg.get("decl"), identity.INPUT, cid, int(msg["real"]), bound, mw):
                self._masked.pop(cid, None)
                continue
            self._masked_with[cid] = mw
            self._keep_tags(cid, "decl", msg.get("tags"))
            if bound:
                self._bound[cid] = bound
            if msg["real"]:
                self._real.add(cid)
            valid.add(cid)
        self._keep(valid)
        survivors = self.active
        real = len(self._real & survivors)
        if real < self.setup.params.min_inputs:  # before any share is asked for: nothing can be unmasked
            raise self._abort(f"only {real} real inputs (refusals and dropouts count out) among the "
                              f"{len(survivors)} masked ones, min_inputs={self.setup.params.min_inputs} needed")
        lost = set(self._forwarded) - survivors  # shared, then sent no (valid) input
        for cid in sorted(survivors):
            self._need_holders(cid, "self-mask seed")
        for cid in sorted(lost):
            if any(cid in self._forwarded[s] for s in survivors):
                self._need_holders(cid, "mask key")
        self.stage = Stage.CONSISTENCY if self.setup.roster else Stage.UNMASK

    def _need_holders(self, owner: int, what: str) -> None:
        alive = len(set(self._holders[owner]) & self.active)
        if alive < self.threshold:
            raise self._abort(f"only {alive} holders of client {owner}'s {what} shares remain, "
                              f"{self.threshold} needed")

    # -- unmask -----------------------------------------------------------------------
    def unmask_requests(self) -> dict[int, dict[str, list[int]]]:
        """Each survivor (that signed) is asked for b-shares of surviving, mask-key shares of dropped neighbours."""
        self._expect(Stage.UNMASK)
        requests = {}
        signers = self._sigs["survivors"]
        for cid in sorted(signers if self.setup.roster else self.active):
            survivors = self._forwarded[cid] & self.active
            dropped = self._forwarded[cid] - self.active
            self._asked[cid] = (survivors, dropped)
            requests[cid] = {"survivors": sorted(survivors), "dropped": sorted(dropped)}
            if self.setup.roster:
                requests[cid].update(self._endorsements(cid))
        return requests

    def receive_unmask(self, replies: Replies) -> SecAggResult:
        self._expect(Stage.UNMASK)
        if not self._asked:
            raise SecAggError("secure aggregation: receive_unmask before unmask_requests")
        survivors = set(self.active)
        shares: dict[tuple[int, bytes], list[tuple[int, bytes]]] = {}  # (owner, kind) -> [(index, share)]
        answered = set()
        for cid, msg in self._replies(replies).items():
            try:
                got = self._check_unmask(cid, msg)
            except SecAggError as e:
                self._reject(cid, str(e))
                continue
            answered.add(cid)
            for key, index_share in got:
                shares.setdefault(key, []).append(index_share)
        if len(answered) < self.threshold:
            raise self._abort(f"only {len(answered)} clients revealed shares, {self.threshold} needed")
        for cid in sorted(survivors - answered):
            self.dropped[cid] = Stage.UNMASK  # its input stays in the sum

        p, dtype = self.setup.params, field_dtype(self.setup.params.field_bits)
        total = np.zeros(p.length, dtype=dtype)
        for cid in sorted(survivors):
            b = self._rebuild(shares, cid, KIND_B, "self-mask seed")
            total += self._masked[cid]
            total -= self_mask(self.setup, cid, b)
        lost = set(self._forwarded) - survivors
        for j in sorted(lost):
            neighbours = sorted(s for s in survivors if j in self._forwarded[s])
            if not neighbours:
                continue
            raw = self._rebuild(shares, j, KIND_SK, "mask key")
            private = crypto.private_from_bytes(raw)
            if crypto.public_bytes(private) != self._pk_mask[j]:
                raise self._abort(f"the mask key rebuilt for client {j} does not match its public key")
            for i in neighbours:  # undo the mask i added for j (i added it with sign(i, j))
                mask = pair_mask(self.setup, j, private, i, self._pk_mask[i])
                total = total - mask if sign(i, j) > 0 else total + mask
        total &= field_mask(self.setup)
        self._masked.clear()
        self.stage = Stage.DONE
        return SecAggResult(total, tuple(sorted(survivors)), dict(self.dropped), dict(self.rejected),
                            tuple(sorted(self._real & survivors)))

    def _check_unmask(self, cid: int, msg: Mapping) -> list[tuple[tuple[int, bytes], tuple[int, bytes]]]:
        """[((owner, kind), (index, share))] from one reply, every share matching its commitment."""
        b_shares = id_map(msg.get("b_shares"), "b_shares", cid)
        sk_shares = id_map(msg.get("sk_shares"), "sk_shares", cid)
        survivors, dropped = self._asked.get(cid, (set(), set()))
        if cid not in self._asked or not b_shares.keys() <= survivors or not sk_shares.keys() <= dropped:
            raise SecAggError(f"client {cid} revealed shares it was not asked for")
        p, out = self.setup.params, []
        for kind, revealed in ((KIND_B, b_shares), (KIND_SK, sk_shares)):
            for owner, share in revealed.items():
                index = self._holders[owner].index(cid) + 1
                half = slice(0, 32) if kind == KIND_B else slice(32, 64)
                if not isinstance(share, bytes) or len(share) != crypto.SHARE_BYTES or \
                        crypto.commit_share(kind, p.round, owner, cid, index, share) != \
                        self._commitments[owner][cid][half]:
                    raise SecAggError(f"client {cid} revealed a share of client {owner}'s "
                                      f"{'self-mask seed' if kind == KIND_B else 'mask key'} that does not "
                                      "match the commitment")
                out.append(((owner, kind), (index, share)))
        return out

    def _rebuild(self, shares: dict, owner: int, kind: bytes, what: str) -> bytes:
        got = sorted(shares.get((owner, kind), []))
        if len(got) < self.threshold:
            raise self._abort(f"only {len(got)} valid shares of client {owner}'s {what} arrived, "
                              f"{self.threshold} needed")
        return crypto.combine_shares(got[: self.threshold])
