"""Fixed-point encoding of float updates into the SecAgg field Z_{2^m}, and bit packing.

A value x is clipped to [-R, R] and mapped affinely onto [0, 2^bits - 1]; the fractional
part is rounded stochastically (up with probability equal to the fraction), so the
encoding is unbiased: E[decode(encode(x))] = clip(x). The field has m = bits +
ceil(log2(n_max)) bits, so the sum of up to n_max encodings, each < 2^bits, cannot wrap
mod 2^m and decodes exactly as sum * step - k * R for k summands. The rounding error
of a decoded sum of k values is below k * step per coordinate, step = 2R / (2^bits - 1).

Rounding randomness comes from the ChaCha20 PRG (crypto.expand) under a fresh
os.urandom seed, not from numpy's RNG; only a test (privacy.seed) passes a seed of its own.

Weighted aggregation (WeightedFixedPoint): a client with weight w <= W sends
[(w/W) * clip(x), w/W]; the server learns only the sums sum_i w_i x_i and sum_i w_i
(after multiplying back by the public W), never a single client's weight.

pack/unpack store m-bit field elements at exactly m bits each (little-endian bit order):
8 values fill m bytes, so packing works column by column over groups of 8 (vectorized).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from fedtune.errors import FedtuneError
from fedtune.privacy.distributed import DDGPlan, Uniform, add_ddg_noise
from fedtune.secagg.crypto import expand

MAX_BITS = 48  # precision per value: float64 holds the scaled value and a 32-bit rounding fraction
MAX_FIELD_BITS = 56  # a packed value plus its 7-bit offset in a byte fits in a uint64


def field_dtype(field_bits: int) -> np.dtype:
    """The unsigned dtype that holds field elements (arithmetic wraps mod 2^32 / 2^64, then is masked)."""
    return np.dtype(np.uint32) if field_bits <= 32 else np.dtype(np.uint64)


def _stochastic_round(q: np.ndarray, top: int, seed: bytes | None = None) -> np.ndarray:
    """Unbiased rounding of q in [0, top] to integers in [0, top]."""
    u = expand(seed or os.urandom(32), q.size, 32).astype(np.float64) * 2.0 ** -32
    return np.clip(np.floor(q.reshape(-1) + u), 0, top)


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise FedtuneError(f"secure aggregation: the {what} has NaN or infinite values")
    return x


@dataclass(frozen=True)
class FixedPoint:
    """Values clipped to [-clip, clip], ``bits`` of precision, sums of up to ``n_max`` clients."""

    clip: float
    bits: int = 16
    n_max: int = 1000

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise FedtuneError(f"secure aggregation: clip range must be a positive number, not {self.clip}")
        if not 1 <= self.bits <= MAX_BITS:
            raise FedtuneError(f"secure aggregation: bits per value must be 1..{MAX_BITS}, not {self.bits}")
        if self.n_max < 1:
            raise FedtuneError(f"secure aggregation: n_max must be at least 1, not {self.n_max}")
        if self.field_bits > MAX_FIELD_BITS:
            raise FedtuneError(f"secure aggregation: {self.bits} bits for {self.n_max} clients needs a "
                               f"{self.field_bits}-bit field; at most {MAX_FIELD_BITS} is supported")

    @property
    def levels(self) -> int:
        """The largest encoded value, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """The float value of one integer unit."""
        return 2 * self.clip / self.levels

    @property
    def field_bits(self) -> int:
        """m: n_max encodings sum to at most n_max * (2^bits - 1) < 2^m."""
        return self.bits + (self.n_max - 1).bit_length()

    @property
    def dtype(self) -> np.dtype:
        return field_dtype(self.field_bits)

    def encode(self, x: np.ndarray, seed: bytes | None = None) -> np.ndarray:
        """Integers in [0, 2^bits - 1] (flattened); values outside [-clip, clip] are clipped."""
        x = _finite(x, "update")
        q = (np.clip(x, -self.clip, self.clip) + self.clip) * (self.levels / (2 * self.clip))
        return _stochastic_round(q, self.levels, seed).astype(self.dtype)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """Floats from the sum of ``count`` encodings (as returned by the aggregation, mod 2^m)."""
        self._check_count(count)
        return np.asarray(total, dtype=np.float64) * self.step - count * self.clip

    def error_bound(self, count: int) -> float:
        """|decoded sum - sum of clipped values| < this, per coordinate (rounding only)."""
        return count * self.step

    def _check_count(self, count: int) -> None:
        if not 0 <= count <= self.n_max:
            raise FedtuneError(f"secure aggregation: cannot decode a sum of {count} clients; the field "
                               f"holds sums of at most n_max={self.n_max}")


@dataclass(frozen=True)
class WeightedFixedPoint:
    """Encodes [(w/W) * clip(x), w/W] so the server learns sum w_i x_i and sum w_i only."""

    fixed_point: FixedPoint
    max_weight: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.max_weight) and self.max_weight > 0):
            raise FedtuneError(f"secure aggregation: max_weight must be a positive number, not {self.max_weight}")

    @property
    def field_bits(self) -> int:
        return self.fixed_point.field_bits

    def length(self, size: int) -> int:
        """Vector length for an update of ``size`` values: the values and the weight."""
        return size + 1

    def encode(self, update: np.ndarray, weight: float, seed: bytes | None = None) -> np.ndarray:
        fp = self.fixed_point
        if not (np.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise FedtuneError(f"secure aggregation: weight {weight} is outside [0, max_weight={self.max_weight}]")
        scale = weight / self.max_weight
        x = np.clip(_finite(update, "update").reshape(-1), -fp.clip, fp.clip) * scale
        out = np.empty(x.size + 1, dtype=fp.dtype)
        out[:-1] = fp.encode(x, seed)
        weight_seed = hashlib.sha256(seed + b"weight").digest() if seed else None  # its own stream
        out[-1] = _stochastic_round(np.array([scale * fp.levels]), fp.levels, weight_seed)[0]
        return out

    def decode(self, total: np.ndarray, count: int) -> tuple[np.ndarray, float]:
        """(sum_i w_i * clip(x_i), sum_i w_i) from the aggregated vector of ``count`` clients."""
        fp = self.fixed_point
        weighted = fp.decode_sum(total[:-1], count) * self.max_weight
        return weighted, float(total[-1]) / fp.levels * self.max_weight

    def error_bound(self, count: int) -> tuple[float, float]:
        """Rounding error bounds of (each weighted-sum coordinate, total weight)."""
        fp = self.fixed_point
        return fp.error_bound(count) * self.max_weight, count / fp.levels * self.max_weight


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """``values`` (each < 2^bits) at exactly ``bits`` bits each, little-endian bit order."""
    _check_bits(bits)
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind not in "ui":
        raise FedtuneError(f"secure aggregation: can only pack integers, not {v.dtype}")
    if v.size and (v.min() < 0 or int(v.max()) >> bits):
        raise FedtuneError(f"secure aggregation: values to pack must lie in [0, 2^{bits})")
    n = v.size
    if bits % 8 == 0:  # whole bytes: keep the low bytes of each little-endian uint64
        return v.astype("<u8").view(np.uint8).reshape(n, 8)[:, : bits // 8].tobytes()
    groups = -(-n // 8)
    grid = np.zeros(groups * 8, dtype=np.uint64)
    grid[:n] = v
    grid = grid.reshape(groups, 8)
    out = np.zeros((groups, bits), dtype=np.uint8)  # 8 values of `bits` bits = `bits` bytes
    for r in range(8):
        first, shift = divmod(r * bits, 8)
        col = grid[:, r] << np.uint64(shift)
        for j in range((shift + bits + 7) // 8):
            out[:, first + j] |= (col >> np.uint64(8 * j)).astype(np.uint8)  # astype keeps the low byte
    return out.tobytes()[: packed_size(n, bits)]


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of pack: ``count`` values in the field dtype. Raises FedtuneError on a wrong
    length or non-zero padding bits."""
    _check_bits(bits)
    if len(data) != packed_size(count, bits):
        raise FedtuneError(f"secure aggregation: {len(data)} bytes do not hold {count} values of {bits} "
                           f"bits ({packed_size(count, bits)} bytes)")
    dtype = field_dtype(bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits % 8 == 0:
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, : bits // 8] = raw.reshape(count, bits // 8)
        return wide.view("<u8").reshape(count).astype(dtype)
    groups = -(-count // 8)
    buf = np.zeros(groups * bits, dtype=np.uint8)
    buf[: raw.size] = raw
    buf = buf.reshape(groups, bits)
    grid = np.empty((groups, 8), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for r in range(8):
        first, shift = divmod(r * bits, 8)
        col = np.zeros(groups, dtype=np.uint64)
        for j in range((shift + bits + 7) // 8):
            col |= buf[:, first + j].astype(np.uint64) << np.uint64(8 * j)
        grid[:, r] = (col >> np.uint64(shift)) & mask
    flat = grid.reshape(-1)
    if flat[count:].any():
        raise FedtuneError("secure aggregation: packed data has non-zero padding bits")
    return flat[:count].astype(dtype)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_FIELD_BITS:
        raise FedtuneError(f"secure aggregation: packing supports 1..{MAX_FIELD_BITS} bits, not {bits}")


@dataclass(frozen=True)
class DistributedGaussian:
    """Distributed DP: a client sends its clipped, rounded update plus its own discrete
    Gaussian noise (fedtune.privacy.distributed), mod 2^m. All clients weigh the same and
    the server divides the sum by the plan's fixed denominator."""

    plan: DDGPlan

    @property
    def field_bits(self) -> int:
        return self.plan.field_bits

    def length(self, size: int) -> int:
        return size

    def encode(self, update: np.ndarray, weight: float, seed: bytes | None = None) -> np.ndarray:
        """``weight`` is not sent: every client counts once (a refusing client sends a zero update)."""
        ints = add_ddg_noise(update, self.plan, Uniform(seed) if seed else None)
        return (ints & np.int64((1 << self.field_bits) - 1)).astype(field_dtype(self.field_bits))

    def decode(self, total: np.ndarray, count: int) -> tuple[np.ndarray, float]:
        """(γ · the centred sum, the fixed denominator)."""
        m = self.field_bits
        v = np.asarray(total).astype(np.int64)
        v[v >= (1 << (m - 1))] -= np.int64(1 << m)
        return v.astype(np.float64) * self.plan.gamma, self.plan.denominator
