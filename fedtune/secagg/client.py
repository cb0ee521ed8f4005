"""The SecAgg+ client: one object per client per round, driven stage by stage.

    client = SecAggClient(my_id, setup)            # setup: SecAggSetup or its message
    reply = client.advertise_keys()                # {"pk_enc": bytes, "pk_mask": bytes}
    reply = client.share_keys(msg)                 # msg {"pk_enc": {j: bytes}, "pk_mask": {j: bytes}}
                                                   # -> {"ciphertexts": {j: bytes}, "commitments": {j: bytes}}
    client.receive_shares(msg)                     # msg {"ciphertexts": {j: bytes}, "commitments": {j: bytes}}
    reply = client.masked_input(vector, real)      # -> {"masked": bytes (m bits per value), "real": 0 | 1}
                                                   # (+ "decl", "masked_with", "tags": {j: tag} with a roster)
    reply = client.consistency(msg)                # with a roster only: msg {"survivors", "real", "resent": [j],
                                                   #   "declarations": {j: tag}, "masked_with", "bound": {j: bytes}}
                                                   # -> {"sig": (survivors, real, resent), signed, "tags": {j: tag}}
    reply = client.unmask(msg)                     # msg {"survivors", "dropped": [j], "tags", "signatures": {j: ..}}
                                                   # -> {"b_shares": {j: bytes}, "sk_shares": {j: bytes}}

Key pairs and the self-mask seed are fresh per object, so revealing a dropped client's mask key
exposes nothing beyond this round. The client refuses keys from non-neighbours, repeated public
keys, ciphertexts or shares that fail their checks (naming the sender), and ever revealing both
shares of one neighbour. Any error leaves it aborted. With a roster (malicious-server mode) it
also signs, with its identity key, the keys it advertises, whether its input is real and the
survivor set it is told, and tags the last two for each neighbour (crypto.tag, their share-stage
key: far cheaper to check than a signature). It refuses keys its neighbours did not sign, a
survivor set with fewer than min_inputs real inputs or with a surviving neighbour whose tagged
declaration disagrees, and reveals shares only after a quorum of survivors endorsed the very
statement it signed, it masked with every surviving neighbour (at least t of them) and the
server's request matches that set; with its own ``colluders`` c > 0, it refuses at advertise a
setup whose t or quorum c corrupted clients could split. Every refusal names the stage and the
party (the argument: docs/secure-aggregation.md).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.secagg import crypto, identity
from fedtune.secagg.encoding import field_dtype, pack
from fedtune.secagg.protocol import (
    COMMITMENT_BYTES, KIND_B, KIND_SK, SHARE_PLAINTEXT_BYTES, TAGGED, SecAggAborted, SecAggError, SecAggSetup,
    Stage, as_message, colluder_quorum, colluder_shortfall, field_mask, from_bits, id_list, id_map, neighbour_bits,
    pair_mask, paired_maps, self_mask, sign)


@dataclass(frozen=True)
class HeldShare:
    """What a neighbour (the owner) entrusted to this client."""

    index: int
    b_share: bytes
    sk_share: bytes


class SecAggClient:
    def __init__(self, client_id: int, setup: SecAggSetup | dict[str, Any],
                 identity_key: identity.SigningKey | None = None, colluders: int = 0):
        self.setup = setup if isinstance(setup, SecAggSetup) else SecAggSetup.from_message(setup)
        self.id = int(client_id)
        if self.id not in self.setup.neighbours:
            raise SecAggError(f"client {self.id}: not among the round's clients")
        self._identity, self.colluders = identity_key, int(colluders)  # c: this client's own, not the server's
        self._check_identity()
        self._statement: tuple[list[int], ...] = ([], [], [])  # (survivors, real, resent) it signed
        self._declared: tuple[int, bytes, bytes] = (0, b"", b"")  # its own (real, bound, masked_with)
        self.input_set = b""  # identity.input_set of that set, with who is real
        self.stage = Stage.ADVERTISE
        self._enc = crypto.KeyPair.generate()
        self._mask = crypto.KeyPair.generate()
        self._b = os.urandom(crypto.KEY_BYTES)
        self._enc_keys: dict[int, bytes] = {}  # AEAD key shared with each neighbour that got our keys
        self._pk_mask: dict[int, bytes] = {}
        self._held: dict[int, HeldShare] = {}  # owner -> shares it sent us

    def _check_identity(self) -> None:
        roster = self.setup.roster
        if roster and (self._identity is None or identity.public_bytes(self._identity) != roster[self.id]):
            raise SecAggError(f"client {self.id}: stage 'advertise': the server's roster does not hold this client's "
                              "identity key; refusing the round")
        if self.colluders and (short := colluder_shortfall(self.setup, self.colluders)):
            raise SecAggError(f"client {self.id}: stage 'advertise': {short}; refusing the round, nothing revealed")

    def _sign(self, label: bytes, *fields: bytes | int | list[int]) -> bytes:
        assert self._identity is not None
        return identity.sign(self._identity, label, self.setup.digest, *fields)

    def _signed_by(self, peer: int, signature: Any, label: bytes, *fields: bytes | int | list[int]) -> bool:
        return identity.verify(self.setup.roster[peer], signature, label, self.setup.digest, *fields)

    def _tag(self, peer: int, data: bytes) -> bytes:
        """A tag on statement ``data`` from this client to ``peer`` (their share-stage key)."""
        ad = crypto.associated_data(TAGGED, self.setup.params.round, self.id, peer) + data
        return crypto.tag(self._enc_keys[peer], ad)

    def _tagged_by(self, peer: int, tag: Any, data: bytes) -> bool:
        """``tag`` is ``peer``'s on ``data``, addressed to this client (not one of its own reflected)."""
        key = self._enc_keys.get(peer)
        ad = crypto.associated_data(TAGGED, self.setup.params.round, peer, self.id) + data
        return key is not None and crypto.tagged(key, tag, ad)

    @property
    def neighbours(self) -> frozenset[int]:
        return self.setup.neighbours[self.id]

    def _enter(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise SecAggError(f"client {self.id}: asked for stage '{stage}' while in stage '{self.stage}'")

    def _fail(self, error: SecAggError) -> SecAggError:
        self.stage = Stage.ABORTED
        self._b = b""
        self._held.clear()
        return error

    # -- advertise --------------------------------------------------------------------
    def advertise_keys(self) -> dict[str, bytes]:
        self._enter(Stage.ADVERTISE)
        self.stage = Stage.SHARE
        reply = {"pk_enc": self._enc.public, "pk_mask": self._mask.public}
        if self.setup.roster:
            reply["sig"] = self._sign(identity.ADVERTISE, self.id, self._enc.public, self._mask.public)
        return reply

    def share_keys(self, msg: dict[str, Any]) -> dict[str, dict[int, bytes]]:
        self._enter(Stage.SHARE)
        try:
            return self._share_keys(msg)
        except SecAggError as e:
            raise self._fail(e) from None

    def _share_keys(self, msg: dict[str, Any]) -> dict[str, dict[int, bytes]]:
        me, p, t = self.id, self.setup.params, self.setup.threshold
        pk_enc, pk_mask = paired_maps(msg, "pk_enc", "pk_mask", me, "encryption and mask keys for")
        for j in pk_enc:
            if j not in self.neighbours:
                raise SecAggError(f"client {me}: the server sent keys of client {j}, which is not a neighbour")
            if not (isinstance(pk_enc[j], bytes) and isinstance(pk_mask[j], bytes)):
                raise SecAggError(f"client {me}: the public keys of client {j} are not bytes")
        keys = [self._enc.public, self._mask.public] + [k for j in pk_enc for k in (pk_enc[j], pk_mask[j])]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"client {me}: the neighbours' public keys are not all distinct")
        if len(pk_enc) < t:
            raise SecAggAborted(f"client {me}: only {len(pk_enc)} neighbours advertised keys, {t} needed")
        if self.setup.roster:
            sigs = id_map(msg.get("sigs"), "sigs", me)
            for j in sorted(pk_enc):
                if not self._signed_by(j, sigs.get(j), identity.ADVERTISE, j, pk_enc[j], pk_mask[j]):
                    raise SecAggError(f"client {me}: stage 'share': the keys the server gave for client {j} are not "
                                      "signed by its identity key; refusing the round")

        holders = sorted(pk_enc)
        b_shares = crypto.share_secret(self._b, t, len(holders))
        sk_shares = crypto.share_secret(self._mask.private_bytes(), t, len(holders))
        ciphertexts, commitments = {}, {}
        for holder, (index, b_share), (_, sk_share) in zip(holders, b_shares, sk_shares, strict=True):
            try:
                key = crypto.agree(self._enc.private, pk_enc[holder], crypto.INFO_ENCRYPTION, p.round, me, holder)
                crypto.check_public_key(pk_mask[holder])
            except crypto.CryptoError as e:
                raise SecAggError(f"client {me}: the public key of client {holder} is unusable: {e}") from None
            self._enc_keys[holder] = key
            self._pk_mask[holder] = pk_mask[holder]
            plaintext = struct.pack(">I", index) + b_share + sk_share
            ad = crypto.associated_data(Stage.SHARE, p.round, me, holder)
            ciphertexts[holder] = crypto.encrypt(key, plaintext, ad)
            commitments[holder] = (crypto.commit_share(KIND_B, p.round, me, holder, index, b_share)
                                   + crypto.commit_share(KIND_SK, p.round, me, holder, index, sk_share))
        self.stage = Stage.COLLECT
        return {"ciphertexts": ciphertexts, "commitments": commitments}

    def receive_shares(self, msg: dict[str, Any]) -> None:
        self._enter(Stage.COLLECT)
        if self._held:
            raise SecAggError(f"client {self.id}: shares already received this round")
        try:
            self._receive_shares(msg)
        except SecAggError as e:
            raise self._fail(e) from None

    def _receive_shares(self, msg: dict[str, Any]) -> None:
        me, p, t = self.id, self.setup.params, self.setup.threshold
        ciphertexts, commitments = paired_maps(msg, "ciphertexts", "commitments", me, "ciphertexts and commitments from")
        held = {}
        for owner, blob in ciphertexts.items():
            if owner not in self._enc_keys:
                raise SecAggError(f"client {me}: got shares from client {owner}, to whom it sent no keys")
            try:
                plain = crypto.decrypt(self._enc_keys[owner], bytes(blob),
                                       crypto.associated_data(Stage.SHARE, p.round, owner, me))
            except (crypto.CryptoError, TypeError):
                raise SecAggError(f"client {me}: the share ciphertext from client {owner} failed "
                                  "authentication") from None
            if len(plain) != SHARE_PLAINTEXT_BYTES:
                raise SecAggError(f"client {me}: the shares from client {owner} have the wrong size")
            (index,) = struct.unpack(">I", plain[:4])
            b_share, sk_share = plain[4:4 + crypto.SHARE_BYTES], plain[4 + crypto.SHARE_BYTES:]
            expected = (crypto.commit_share(KIND_B, p.round, owner, me, index, b_share)
                        + crypto.commit_share(KIND_SK, p.round, owner, me, index, sk_share))
            if len(commitments[owner]) != COMMITMENT_BYTES or bytes(commitments[owner]) != expected:
                raise SecAggError(f"client {me}: the shares from client {owner} do not match its commitments")
            held[owner] = HeldShare(index, b_share, sk_share)
        if len(held) < t:
            raise SecAggAborted(f"client {me}: only {len(held)} neighbours sent shares, {t} needed")
        self._held = held

    def masked_input(self, vector: np.ndarray, real: bool = True, bound: bytes = b"") -> dict[str, Any]:
        """y = x + PRG(b) + sum_j sign * PRG(s_ij) mod 2^m, j over the neighbours that sent shares.

        ``real`` is False for a client that refused to train: it masks a zero update (or, under
        distributed DP, only its noise) and says so, so the server can count the real inputs
        against min_inputs before it unmasks anything. A refusal is public anyway (the
        server logs and records it); what the others trained stays inside the sum."""
        self._enter(Stage.COLLECT)
        if not self._held:
            raise SecAggError(f"client {self.id}: masked_input before receive_shares")
        m, length = self.setup.params.field_bits, self.setup.params.length
        x = np.asarray(vector)
        if x.shape != (length,) or x.dtype.kind not in "ui":
            raise SecAggError(f"client {self.id}: the input must be {length} integers, not shape {x.shape} "
                              f"of {x.dtype}")
        if x.size and (x.min() < 0 or int(x.max()) >> m):
            raise SecAggError(f"client {self.id}: input values must lie in [0, 2^{m})")
        y = x.astype(field_dtype(m))
        y += self_mask(self.setup, self.id, self._b)
        for j in sorted(self._held):
            mask = pair_mask(self.setup, self.id, self._mask.private, j, self._pk_mask[j])
            if sign(self.id, j) > 0:
                y += mask
            else:
                y -= mask
        y &= field_mask(self.setup)
        reply: dict[str, Any] = {"masked": pack(y, m), "real": int(bool(real))}
        if self.setup.roster:  # declared: real or not, a resend's first input set, the neighbours it masked with
            reply["masked_with"] = neighbour_bits(self.setup, self.id, self._held)
            self._declared = (int(bool(real)), bytes(bound), reply["masked_with"])
            reply["decl"] = self._sign(identity.INPUT, self.id, *self._declared)  # for the server
            data = identity.statement(identity.INPUT, self.setup.digest, self.id, *self._declared)
            reply["tags"] = {j: self._tag(j, data) for j in sorted(self._enc_keys)}  # for its neighbours
            if bound:
                reply["bound"] = bytes(bound)
        self.stage = Stage.CONSISTENCY if self.setup.roster else Stage.UNMASK
        return reply

    # -- consistency (malicious-server mode) --------------------------------------------
    def consistency(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Sign the statement (survivors, real inputs, resends) the server names, and tag it for
        each surviving neighbour, once the statement agrees with this client's own declaration
        and the server shows its surviving neighbours' (the inputs whose self-mask shares it may
        reveal), each tagged by that neighbour, and at least min_inputs survivors are real."""
        self._enter(Stage.CONSISTENCY)
        me, p = self.id, self.setup.params
        msg = as_message(msg, me)
        survivors = sorted(set(id_list(msg.get("survivors", []), "survivors", me)))
        real = set(id_list(msg.get("real", []), "real", me))
        resent = set(id_list(msg.get("resent", []), "resent", me))
        decl = id_map(msg.get("declarations", {}), "declarations", me)
        bound = id_map(msg.get("bound", {}), "bound", me)
        masked_with = id_map(msg.get("masked_with", {}), "masked_with", me)
        if me not in survivors or not set(survivors) <= set(self.setup.client_ids) or not resent <= real or \
                not real <= set(survivors):
            raise self._fail(SecAggError(f"client {me}: stage 'consistency': the server's survivor set is not one "
                                         "of this round's (it omits this client or names strangers); refusing"))
        own_real, bound[me], masked_with[me] = self._declared  # its own: what it declared, not what it is told
        checked = sorted((self.neighbours & set(survivors)) | {me})
        for j in checked:
            data = identity.statement(identity.INPUT, self.setup.digest, j, int(j in real), bound.get(j, b""),
                                      masked_with.get(j, b""))
            if not (self._tagged_by(j, decl.get(j), data) if j != me else own_real == int(me in real)):
                raise self._fail(SecAggError(f"client {me}: stage 'consistency': client {j}'s declaration of its "
                                             "input is missing, disagrees with the statement or is not "
                                             f"authenticated by client {j}; refusing"))
            self._check_masked(j, set(survivors), from_bits(self.setup, j, masked_with.get(j)))
        if len(real) < p.min_inputs:
            raise self._fail(SecAggAborted(f"client {me}: stage 'consistency': only {len(real)} real inputs in the "
                                           f"sum, min_inputs={p.min_inputs}; revealing nothing"))
        self.input_set = identity.input_set(dict(self.setup.roster), survivors, real)
        self._check_bound(bound, real, resent, checked)
        self._statement = (survivors, sorted(real), sorted(resent))
        self.stage = Stage.UNMASK
        data = identity.statement(identity.SURVIVORS, self.setup.digest, *self._statement)
        return {"sig": self._sign(identity.SURVIVORS, *self._statement),
                "tags": {j: self._tag(j, data) for j in checked if j != me}}

    def _check_masked(self, j: int, survivors: set[int], masked: set[int]) -> None:
        """Client j (itself or a neighbour whose self-mask shares it holds) masked with every
        surviving neighbour and has at least t of them: then no sum but the whole survivor set's
        can be unmasked (docs/secure-aggregation.md, the argument)."""
        near = self.setup.neighbours[j] & survivors
        if len(near) < self.setup.threshold or not near <= masked:
            why = (f"only {len(near)} of its neighbours survived, t={self.setup.threshold} needed"
                   if len(near) < self.setup.threshold else
                   f"it did not mask with its surviving neighbour {min(near - masked)} (its shares never reached it)")
            raise self._fail(SecAggError(f"client {self.id}: stage 'consistency': client {j}: {why}, so shares "
                                         "could unmask a part of the survivor set; revealing nothing"))

    def _check_bound(self, bound: dict[int, Any], real: set[int], resent: set[int], checked: list[int]) -> None:
        """One release, one sum: the statement names the resends; if there is one, every real input
        is a resend bound to this very input set (the same sum again). This client checks that
        claim for itself and its surviving neighbours (their declarations: resent or not, to which
        set); each survivor's neighbours do the same for it before revealing its self-mask shares."""
        off = sorted(resent ^ real) if resent else []
        off += [j for j in checked if j in real and ((j in resent) != bool(bound.get(j)) or
                                                     (j in resent and bound[j] != self.input_set))]
        if off:
            raise self._fail(SecAggError(
                f"client {self.id}: stage 'consistency': client {off[0]}'s input is not a resend bound to this very "
                "input set, while others in it were first masked into a sum over this set (a second, different "
                "sum would reveal a difference of updates); revealing nothing"))

    def _check_quorum(self, msg: Any, survivors: list[int], dropped: list[int]) -> None:
        """Malicious-server mode, before revealing: a quorum of survivors endorsed the statement this
        client signed (so every revealing honest client holds the same one), and the request names
        exactly its share-holding neighbours inside / outside that set. A neighbour endorses with
        its tag, any other survivor with its signature: an honest client makes both at once, on
        its one statement, so either counts it once."""
        me, signed = self.id, self._statement[0]
        quorum = max(self.setup.quorum, colluder_quorum(self.setup.n, self.colluders))  # its own c, not the server's
        sigs = id_map(msg.get("signatures", {}), "signatures", me)
        tags = id_map(msg.get("tags", {}), "tags", me)
        data = identity.statement(identity.SURVIVORS, self.setup.digest, *self._statement)
        valid = [me] + [j for j in sorted(self.neighbours & set(signed) & set(tags)) if self._tagged_by(j, tags[j], data)]
        for j in signed:  # a quorum is enough: signatures only for what the tags leave
            if j not in valid and len(valid) < quorum and \
                    identity.verify_statement(self.setup.roster[j], sigs.get(j), data):
                valid.append(j)
        if len(valid) < quorum:
            bad = sorted(set(sigs) - set(valid))
            raise self._fail(SecAggError(
                f"client {me}: stage 'unmask': only {len(valid)} survivors signed the survivor set this client was "
                f"told, {quorum} needed (server or clients {bad[:5]} disagree); revealing nothing"))
        inside = sorted(j for j in self._held if j in signed)
        outside = sorted(j for j in self._held if j not in signed)
        if sorted(survivors) != inside or sorted(dropped) != outside:
            raise self._fail(SecAggError(f"client {me}: stage 'unmask': the server asks for shares that disagree "
                                         "with the signed survivor set; revealing nothing"))

    # -- unmask -----------------------------------------------------------------------
    def unmask(self, msg: dict[str, Any]) -> dict[str, dict[int, bytes]]:
        """b-shares of surviving neighbours, mask-key shares of dropped ones; refuses to
        ever give both for one neighbour (that would unmask its input)."""
        self._enter(Stage.UNMASK)
        me = self.id
        msg = as_message(msg, me)
        survivors = id_list(msg.get("survivors", []), "survivors", me)
        dropped = id_list(msg.get("dropped", []), "dropped", me)
        for j in sorted(set(survivors) & set(dropped)):
            raise self._fail(SecAggError(f"client {me}: asked to reveal both the self-mask share and the "
                                         f"mask-key share of client {j}; refusing"))
        for j in survivors + dropped:
            if j not in self._held:
                raise self._fail(SecAggError(f"client {me}: asked for shares of client {j}, which it does not hold"))
        if self.setup.roster:
            self._check_quorum(msg, survivors, dropped)
        self.stage = Stage.DONE  # one unmask per round: no later request can ask for the other share
        return {"b_shares": {j: self._held[j].b_share for j in survivors},
                "sk_shares": {j: self._held[j].sk_share for j in dropped}}

    # -- between stages ---------------------------------------------------------------
    # A Flower ClientApp may handle each stage in another process: the client's secrets
    # travel in its own node state (Context.state, on the data holder's machine), never
    # in a message.
    def to_bytes(self) -> bytes:
        hx = bytes.hex
        state = {
            "setup": {**self.setup.to_message(), "graph_seed": hx(self.setup.graph_seed),
                      "roster": {str(j): hx(k) for j, k in self.setup.roster.items()}},
            "id": self.id, "colluders": self.colluders, "statement": self._statement,
            "declared": [self._declared[0], hx(self._declared[1]), hx(self._declared[2])],
            "stage": str(self.stage), "enc": hx(self._enc.private_bytes()), "mask": hx(self._mask.private_bytes()),
            "b": hx(self._b), "enc_keys": {str(j): hx(k) for j, k in self._enc_keys.items()},
            "pk_mask": {str(j): hx(k) for j, k in self._pk_mask.items()},
            "held": {str(j): [h.index, hx(h.b_share), hx(h.sk_share)] for j, h in self._held.items()},
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, identity_key: identity.SigningKey | None = None) -> SecAggClient:
        try:
            s = json.loads(blob)
            un = bytes.fromhex
            roster = {int(j): un(k) for j, k in s["setup"]["roster"].items()}
            setup = SecAggSetup.from_message({**s["setup"], "graph_seed": un(s["setup"]["graph_seed"]), "roster": roster})
            client = cls.__new__(cls)
            client.setup, client.id, client.stage = setup, int(s["id"]), Stage(s["stage"])
            client._identity, client.colluders = identity_key, int(s.get("colluders", 0))
            client._statement = tuple([int(j) for j in part] for part in s["statement"])
            client._declared = (int(s["declared"][0]), un(s["declared"][1]), un(s["declared"][2]))
            client._check_identity()
            client._enc = crypto.KeyPair.from_private_bytes(un(s["enc"]))
            client._mask = crypto.KeyPair.from_private_bytes(un(s["mask"]))
            client._b = un(s["b"])
            client._enc_keys = {int(j): un(k) for j, k in s["enc_keys"].items()}
            client._pk_mask = {int(j): un(k) for j, k in s["pk_mask"].items()}
            client._held = {int(j): HeldShare(int(i), un(b), un(sk)) for j, (i, b, sk) in s["held"].items()}
            return client
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggError(f"secure aggregation: the client's saved round state is unreadable ({e!r})") from None
