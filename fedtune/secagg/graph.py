"""The SecAgg+ neighbour graph: which clients exchange masks and hold each other's shares.

Deterministic from public inputs (the server's graph seed and the client ids), so every
client can recompute its own neighbourhood and refuse keys from anyone outside it. The
ids are ordered by HMAC-SHA256(seed, id), a permutation the server cannot steer without
changing the seed, and each client is joined to the degree/2 clients on either side of it
on that ring: a degree-regular graph. When degree >= n - 1 every pair is joined.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from fedtune.errors import FedtuneError


def neighbour_graph(client_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    ids = sorted(set(client_ids))
    n = len(ids)
    if degree >= n - 1:
        return {c: frozenset(ids) - {c} for c in ids}
    if degree < 1 or degree % 2:
        raise FedtuneError(f"secure aggregation: neighbour degree {degree} must be even and positive "
                           f"when it is below n - 1 = {n - 1} (it is a ring graph)")
    ring = sorted(ids, key=lambda c: (hmac.new(seed, c.to_bytes(8, "big"), hashlib.sha256).digest(), c))
    half = degree // 2
    return {c: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d) for p, c in enumerate(ring)}
