"""Identity signatures for SecAgg+ against a malicious server (Bonawitz et al. CCS 2017,
Bell et al. CCS 2020): each client signs, with a key bound to its identity, the keys it
advertises, whether its masked input is a real update, and the survivor set it was told.

A signed statement binds a label, the round's setup digest (so nothing carries over to
another round or run) and its fields, each length-prefixed. Keys are ``cryptography``'s
Ed25519 (simulation: one pair per client per run) or ECDSA over P-256/384/521 with SHA-384
(one per client per run) and, in deployment, ECDSA over P-256/384/521 with SHA-384: the
SuperNode's authentication key from `fedtune keys` certifies the Ed25519 one (roster.py);
public keys travel as DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from nacl.exceptions import CryptoError as NaclError
from nacl.signing import VerifyKey

DOMAIN = b"fedtune-secagg-identity/1"
ADVERTISE = b"advertise"  # (id, pk_enc, pk_mask)
INPUT = b"input"  # (id, real, bound: a resend's first input set, or b"")
SURVIVORS = b"survivors"  # (sorted survivor ids)
CERTIFY = b"certify"  # (the identity key), by a deployed client's registered key; digest b""

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def generate() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_bytes(key: SigningKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def setup_digest(setup_message: dict[str, Any]) -> bytes:
    """SHA-256 of the setup as sent (ids, parameters, graph seed, roster): what every signature binds."""
    def plain(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return int(v) if isinstance(v, int) else v
    return hashlib.sha256(json.dumps(plain(setup_message), sort_keys=True).encode()).digest()


def input_set(roster: dict[int, bytes], survivors: list[int], real: set[int]) -> bytes:
    """SHA-256 of an input set as who is in it, by identity key (stable across a server's
    restart, unlike node ids), and whether each input is real: equal sets of the same
    resent updates give the same sum."""
    h = hashlib.sha256(DOMAIN + b"|input-set")
    for key, flag in sorted((roster[j], j in real) for j in survivors):
        h.update(len(key).to_bytes(4, "big") + key + bytes([flag]))
    return h.digest()


def statement(label: bytes, digest: bytes, *fields: bytes | int | list[int]) -> bytes:
    """The bytes a signature covers (build once to check many signatures on one statement)."""
    out = [DOMAIN, label, digest]
    for f in fields:
        if isinstance(f, int):
            f = f.to_bytes(8, "big")
        elif isinstance(f, list):
            f = struct.pack(f">{len(f)}Q", *sorted(int(x) for x in f))
        out.append(f)
    return b"".join(len(p).to_bytes(4, "big") + p for p in out)


def sign(key: SigningKey, label: bytes, digest: bytes, *fields: bytes | int | list[int]) -> bytes:
    data = statement(label, digest, *fields)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA384()))


@functools.lru_cache(maxsize=4096)
def _public_key(der: bytes) -> Any:
    """A DER public key, parsed once (a roster's keys are checked many times a round). Ed25519
    keys verify with libsodium (PyNaCl): the same signatures, checked at least as strictly (it
    also refuses small-order keys and R), in about half of OpenSSL's time here, and a client
    checks dozens a round (docs/secure-aggregation.md, cost)."""
    key = serialization.load_der_public_key(der)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return VerifyKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return key


def verify(public: bytes, signature: Any, label: bytes, digest: bytes, *fields: bytes | int | list[int]) -> bool:
    """True only for a valid signature by ``public`` over exactly this statement."""
    return isinstance(signature, bytes) and verify_statement(public, signature, statement(label, digest, *fields))


def verify_statement(public: bytes, signature: Any, data: bytes) -> bool:
    """verify() for a statement built with statement()."""
    if not isinstance(signature, bytes):
        return False
    try:
        key = _public_key(bytes(public))
        if isinstance(key, VerifyKey):
            key.verify(data, signature)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        else:
            return False
    except (InvalidSignature, NaclError, ValueError, TypeError):
        return False
    return True


def check_public(public: Any) -> bool:
    """A DER public key this module can verify with."""
    try:
        key = _public_key(bytes(public))
    except (ValueError, TypeError):
        return False
    return isinstance(key, (VerifyKey, ec.EllipticCurvePublicKey))
