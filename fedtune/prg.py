"""The ChaCha20 PRG: uniform integers from the keystream under a 32-byte seed (nonce
zero: each seed is derived fresh for one use). SecAgg+ draws its masks from it and the
distributed discrete Gaussian its noise; neither package owns it, so neither imports the
other for it."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


class PRGError(ValueError):
    """A seed of the wrong length or an impossible width (a programming error)."""


def expand(seed: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform integers mod 2**bits (uint32 when bits <= 32, else uint64) from the
    ChaCha20 keystream under ``seed``. Each seed must be used for one purpose only."""
    if len(seed) != SEED_BYTES:
        raise PRGError(f"a PRG seed has {SEED_BYTES} bytes, not {len(seed)}")
    if not 1 <= bits <= 64:
        raise PRGError(f"cannot draw {bits}-bit values")
    dtype = np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
    nbytes = n * dtype.itemsize
    zeros = bytes(nbytes)
    out = bytearray(nbytes + 64)  # update_into wants room for a block more than it writes
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    encryptor.update_into(zeros, out)
    values = np.frombuffer(out, dtype=dtype, count=n)
    if bits < dtype.itemsize * 8:
        values &= dtype.type((1 << bits) - 1)
    return values
