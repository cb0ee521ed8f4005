"""The neighbour graph's seed, drawn so that the server cannot steer it: a commit-reveal coin
toss between the server and the round's clients (Bell et al. CCS 2020 assume the graph is
random and not the adversary's choice; this is how fedtune gets there without a beacon).

  identify  the server sends commit(server seed), fixed before it sees any client's reply;
            each client answers with commit(its fresh 32-byte nonce)
  graph     the server fixes the list of admitted clients' nonce commitments and shows each
            client its digest; only then does the client reveal its nonce
  advertise the setup carries the server's seed, every nonce and
            graph_seed = draw(server seed, nonces); each client checks the seed against the
            commitment it got at identify, the nonces against the digest it was shown (so
            every nonce against its commitment), its own nonce, and the graph seed, and
            refuses the round on any mismatch

The server commits before it sees a nonce and cannot change its seed; a client (even one
the server controls) commits before it sees another's nonce. So the graph is uniformly
random as long as one honest client's nonce is in it, which each honest client checks for
itself. Every client that committed must reveal, or the round aborts: the server cannot
pick which revealed nonces count. What it still can do is abort and try again next round
(one fresh draw per aborted round, each visible in its log and ledger). A server that tells
clients different graphs (other commitments, seeds or nonces) gives them different setups;
the setup digest is in every signature (identity.py), so neighbours' signatures fail at the
share stage and no quorum can sign one survivor set.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fedtune.secagg.protocol import SecAggError

DOMAIN = b"fedtune-secagg-graph/1"
NONCE_BYTES = 32


def commit(value: bytes) -> bytes:
    """SHA-256 commitment to a 32-byte random value (hiding: the value has 256 bits of entropy)."""
    return hashlib.sha256(DOMAIN + b"|commit|" + value).digest()


def draw(server_seed: bytes, nonces: Mapping[int, bytes]) -> bytes:
    """The graph seed: SHA-256 of the server's seed and every client's nonce, in id order."""
    h = hashlib.sha256(DOMAIN + b"|seed|" + server_seed)
    for cid in sorted(nonces):
        h.update(int(cid).to_bytes(8, "big") + nonces[cid])
    return h.digest()


def opens(commitment: object, value: object) -> bool:
    return isinstance(commitment, bytes) and isinstance(value, bytes) and len(value) == NONCE_BYTES and \
        hmac.compare_digest(commit(value), commitment)


def digest(commits: Mapping[int, bytes]) -> bytes:
    """What a client is shown at stage 'graph': SHA-256 of every (id, nonce commitment), in id order
    (32 bytes instead of the whole list; the nonces at advertise must hash back to it)."""
    h = hashlib.sha256(DOMAIN + b"|commits|")
    for cid in sorted(commits):
        h.update(int(cid).to_bytes(8, "big") + commits[cid])
    return h.digest()


def check_setup(me: int, setup: Mapping, server_commit: bytes, commits_digest: bytes, nonce: bytes) -> None:
    """The client's check at advertise of the graph seed in ``setup`` (which carries
    ``server_seed``, ``nonces``, ``graph_seed`` and ``client_ids``): raises SecAggError naming
    the stage and the party at fault (the server: it assembles every message)."""
    where = f"client {me}: stage 'advertise'"
    server_seed, nonces = setup.get("server_seed"), setup.get("nonces")
    if not opens(server_commit, server_seed):
        raise SecAggError(f"{where}: the server's revealed graph seed does not match the commitment it sent at "
                          "stage 'identify'; refusing the round")
    if not isinstance(nonces, Mapping) or not all(isinstance(v, bytes) for v in nonces.values()) or \
            set(int(c) for c in setup.get("client_ids") or []) != set(nonces):
        raise SecAggError(f"{where}: the server's setup names other clients than it has graph nonces for; refusing")
    if not hmac.compare_digest(digest({c: commit(v) for c, v in nonces.items()}), commits_digest):
        raise SecAggError(f"{where}: the graph nonces in the server's setup are not the ones committed to before "
                          "stage 'graph' (the server altered, added or dropped one); refusing the round")
    if nonces.get(me) != nonce:
        raise SecAggError(f"{where}: the server's setup does not carry this client's own graph nonce; refusing")
    if setup.get("graph_seed") != draw(server_seed, nonces):  # type: ignore[arg-type]
        raise SecAggError(f"{where}: the server's graph seed is not the one drawn from its revealed seed and the "
                          "clients' nonces; refusing the round")
