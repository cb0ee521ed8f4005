"""Cryptographic building blocks of SecAgg+, all from vetted libraries.

* X25519 key agreement (``cryptography``): each client holds two fresh key pairs per
  round, one to encrypt Shamir shares to its neighbours and one for pairwise masks.
* HKDF-SHA256 turns a raw X25519 secret into a key; the ``info`` label names its use
  (encryption key vs. mask seed), the round and the (unordered) pair of clients, so the
  same exchange never yields the same key for two purposes, rounds or pairs.
* ChaCha20-Poly1305 AEAD encrypts shares; the associated data binds sender, receiver,
  round and stage, so a ciphertext cannot be replayed to another pair or round. The same
  pairwise key, over an empty plaintext, authenticates a statement from one neighbour to the
  other (``tag``): a MAC only that pair can make or check.
* Shamir t-of-n secret sharing over GF(2^128) (pycryptodome) shares 32-byte secrets as
  two independent 16-byte halves with the same indices 1..n.
* The mask PRG is the ChaCha20 keystream under a 32-byte seed (nonce zero: every seed
  is derived fresh for one round and one use).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.prg import expand  # noqa: F401 (the mask PRG, shared with the DP noise sampler)

DOMAIN = b"fedtune-secagg/v1"
KEY_BYTES = 32  # X25519 keys, seeds, secrets
NONCE_BYTES = 12  # ChaCha20-Poly1305 nonce, prepended to each ciphertext
TAG_BYTES = 16
TAG_MESSAGE_BYTES = NONCE_BYTES + TAG_BYTES  # tag(): an AEAD of nothing
SHARE_BYTES = 32  # one share of a 32-byte secret: two 16-byte GF(2^128) shares

# HKDF labels; each use of a key agreement gets its own.
INFO_ENCRYPTION = b"encryption-key"
INFO_PAIR_MASK = b"pairwise-mask-seed"
INFO_SELF_MASK = b"self-mask-seed"


class CryptoError(ValueError):
    """A key, ciphertext or share that fails a check (wrapped by the protocol with who sent it)."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the raw 32-byte encoding."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        private = X25519PrivateKey.generate()
        return cls(private, public_bytes(private))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        private = private_from_bytes(raw)
        return cls(private, public_bytes(private))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 private key has {KEY_BYTES} bytes, not {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def _label(use: bytes, round_: int, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return DOMAIN + b"|" + use + struct.pack(">QQQ", round_, lo, hi)


def agree(private: X25519PrivateKey, peer_public: bytes, use: bytes, round_: int, me: int, peer: int) -> bytes:
    """32-byte key for ``use`` shared by clients ``me`` and ``peer`` in ``round_``."""
    if len(peer_public) != KEY_BYTES:
        raise CryptoError(f"an X25519 public key has {KEY_BYTES} bytes, not {len(peer_public)}")
    try:
        raw = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # a low-order point gives the all-zero secret
        raise CryptoError(f"unusable X25519 public key ({e})") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=_label(use, round_, me, peer)).derive(raw)


def check_public_key(raw: bytes) -> None:
    """Raises CryptoError unless ``raw`` is a usable X25519 public key (32 bytes, not low order)."""
    agree(X25519PrivateKey.generate(), raw, b"check", 0, 0, 0)


def derive_seed(secret: bytes, use: bytes, round_: int, owner: int) -> bytes:
    """A 32-byte PRG seed from a client's own secret (e.g. the self-mask seed b)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=_label(use, round_, owner, owner)).derive(secret)


def associated_data(stage: str, round_: int, sender: int, receiver: int) -> bytes:
    """What a ciphertext is bound to: it decrypts only for this stage, round and pair."""
    return DOMAIN + b"|" + stage.encode() + struct.pack(">QQQ", round_, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt(key: bytes, blob: bytes, ad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag:
        raise CryptoError("ciphertext failed authentication") from None


def tag(key: bytes, ad: bytes) -> bytes:
    """An authentication tag on ``ad`` (nonce + Poly1305 tag, 28 bytes): the AEAD of an empty
    plaintext under a key two clients agreed on, so only they can make it."""
    return encrypt(key, b"", ad)


def tagged(key: bytes, blob: object, ad: bytes) -> bool:
    """True only for a tag() on exactly ``ad`` under ``key``."""
    if not isinstance(blob, bytes) or len(blob) != TAG_MESSAGE_BYTES:
        return False
    try:
        return decrypt(key, blob, ad) == b""
    except CryptoError:
        return False


def share_secret(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir ``threshold``-of-``count`` shares (index 1..count, 32 bytes each) of a 32-byte secret."""
    if len(secret) != KEY_BYTES:
        raise CryptoError(f"secrets shared here have {KEY_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= count:
        raise CryptoError(f"cannot make {threshold}-of-{count} shares")
    lo = Shamir.split(threshold, count, secret[:16])
    hi = Shamir.split(threshold, count, secret[16:])
    return [(i, a + b) for (i, a), (_, b) in zip(lo, hi, strict=True)]


def combine_shares(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from exactly ``threshold`` shares with distinct indices (no integrity check:
    verify the result, or the shares, separately)."""
    if any(len(s) != SHARE_BYTES for _, s in shares):
        raise CryptoError(f"a share has {SHARE_BYTES} bytes")
    try:
        lo = Shamir.combine([(i, s[:16]) for i, s in shares])
        hi = Shamir.combine([(i, s[16:]) for i, s in shares])
    except ValueError as e:  # duplicate indices
        raise CryptoError(str(e)) from None
    return lo + hi


def commit_share(kind: bytes, round_: int, owner: int, holder: int, index: int, share: bytes) -> bytes:
    """SHA-256 commitment to one share, bound to who made it and who holds it. Hiding because
    each share has >= 128 bits of entropy unknown to the server; lets the holder check what it
    received and the server check what is revealed to it."""
    return hashlib.sha256(DOMAIN + b"|share|" + kind + struct.pack(">QQQI", round_, owner, holder, index)
                          + share).digest()
