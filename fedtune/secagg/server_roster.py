"""The server's side of the malicious-server checks (a roster in the setup), a part of
SecAggServer (server.py): it checks each reply's identity signature, keeps the neighbours'
tags (crypto.tag) to forward unread, and runs the consistency stage.

A tag is for one neighbour: the server can neither make nor check it (it lacks the pair's
key), so a tag it forwards is only evidence to that neighbour. What the server checks itself,
to attribute replies and to abort early, is the signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtune.secagg import crypto, identity
from fedtune.secagg.protocol import Stage


class RosterStages:
    """Mixed into SecAggServer: uses its setup, stage, active set and bookkeeping."""

    def _signed(self, cid: int, kind: str, sig: Any, label: bytes, *fields: Any) -> bool:
        """Without a roster: True. With one: keeps ``sig`` if it is ``cid``'s identity signature
        over the statement; else rejects ``cid`` (a reply naming another client fails here)."""
        roster = self.setup.roster
        if not roster:
            return True
        if not identity.verify(roster[cid], sig, label, self.setup.digest, *fields):
            self._reject(cid, f"client {cid}: stage '{self.stage}': the reply is not signed by client {cid}'s "
                              "identity key")
            return False
        self._sigs[kind][cid] = sig
        return True

    def _keep_tags(self, cid: int, kind: str, tags: Any) -> None:
        """Keeps the well-formed tags ``cid`` addressed to its neighbours (the rest: none, so a
        neighbour that needs one refuses)."""
        if self.setup.roster and isinstance(tags, Mapping):
            self._tags[kind][cid] = {int(j): t for j, t in tags.items() if isinstance(j, int) and
                                     j in self.setup.neighbours[cid] and isinstance(t, bytes) and
                                     len(t) == crypto.TAG_MESSAGE_BYTES}

    def _tag_for(self, kind: str, owner: int, to: int) -> bytes | None:
        return self._tags[kind].get(owner, {}).get(to)

    def consistency_requests(self) -> dict[int, dict[str, Any]]:
        """Every survivor gets the statement (survivors, which are real, which are resends) and its
        surviving neighbours' declarations, each with that neighbour's tag for it: O(degree)."""
        self._expect(Stage.CONSISTENCY)
        survivors, real = sorted(self.active), sorted(self._real & self.active)
        resent, requests = sorted(j for j in real if j in self._bound), {}
        self._statement = (survivors, real, resent)
        for cid in survivors:
            near = sorted(self.setup.neighbours[cid] & self.active)
            tags = {j: t for j in near if (t := self._tag_for("decl", j, cid)) is not None}
            requests[cid] = {"survivors": survivors, "real": real, "resent": resent, "declarations": tags,
                             "masked_with": {j: self._masked_with[j] for j in near},
                             "bound": {j: self._bound[j] for j in near if j in self._bound}}
        return requests

    def receive_consistency(self, replies: Any) -> None:
        """Keeps the survivors' signatures and tags; below the quorum: abort. A non-signer stays in the sum, unasked."""
        self._expect(Stage.CONSISTENCY)
        for cid, msg in self._replies(replies).items():  # (before consistency_requests: no statement, none valid)
            if self._signed(cid, "survivors", msg.get("sig"), identity.SURVIVORS, *self._statement):
                self._keep_tags(cid, "survivors", msg.get("tags"))
        signed = len(self._sigs["survivors"])
        if signed < self.setup.quorum:
            raise self._abort(f"only {signed} survivors signed the survivor set, {self.setup.quorum} needed")
        self.stage = Stage.UNMASK

    def _endorsements(self, cid: int) -> dict[str, dict[int, bytes]]:
        """What ``cid`` needs to see a quorum: its signing neighbours' tags, then other signers'
        signatures for the rest (with itself, a quorum)."""
        signers, need = self._sigs["survivors"], self.setup.quorum - 1
        tags = dict([(j, t) for j in sorted(self.setup.neighbours[cid]) if j in signers and
                     (t := self._tag_for("survivors", j, cid)) is not None][:need])
        others = sorted((j, s) for j, s in signers.items() if j != cid and j not in tags)
        return {"tags": tags, "signatures": dict(others[:need - len(tags)])}
