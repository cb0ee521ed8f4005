"""Whose identity key signs a client's SecAgg+ messages, and how the server binds node ids
to registered names before a secure round.

Every client signs with an Ed25519 identity key of its own for the run, kept in its run
folder (the same key after a server's restart, so a resend's input set is recognised).

Deployment: that key is certified by the client's authentication key (``fedtune keys``;
client.toml's ``key``, passed to the ClientApp as node config ``identity-key``), whose
``.pub`` the server holds in its keys folder (``FEDTUNE_CLIENT_KEYS``, set by ``fedtune
server start``). A node is admitted to the round's roster only under a name whose registered
key certified the identity key it presents, so one registered client cannot speak for
another. (Ed25519 checks are ~7x faster than the P-384 ones every client runs per peer.)

Simulation: the server admits what the nodes present (a simulation trusts its own key setup).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Context

from fedtune.runfolder import atomic_write_bytes
from fedtune.secagg import identity
from fedtune.secagg.protocol import SecAggError

KEYS_ENV = "FEDTUNE_CLIENT_KEYS"  # the server's folder of registered <name>.pub keys
STATE = "fedtune-secagg-identity"
CERT = "fedtune-secagg-certificate"  # the registered key's signature on the identity key, once per run


def load_private(path: str | Path) -> identity.SigningKey:
    data = Path(path).expanduser().read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, identity.SigningKey):
        raise SecAggError(f"secure aggregation: {path} is not an EC or Ed25519 signing key")
    return key


def registered(context: Context) -> bool:
    """Whether this node signs with its registered authentication key (a deployment)."""
    path = context.node_config.get("identity-key")
    return bool(path) and Path(str(path)).expanduser().is_file()  # absent: an --insecure test deployment


def node_identity(context: Context, keep: Path | None = None) -> identity.SigningKey:
    """This node's identity key for the run: held in the node state and kept in the file
    ``keep`` (the client's run folder), created on first use."""
    record = context.state.config_records.get(STATE)
    if record is not None:
        return serialization.load_der_private_key(bytes(record["der"]), password=None)  # type: ignore[return-value]
    if keep is not None and keep.is_file():
        key = serialization.load_pem_private_key(keep.read_bytes(), password=None)
    else:
        key = identity.generate()
        if keep is not None:
            atomic_write_bytes(keep, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), mode=0o600)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    context.state[STATE] = ConfigRecord({"der": der})
    return key  # type: ignore[return-value]


def certificate(context: Context, public: bytes) -> bytes:
    """Deployment: the registered authentication key's signature on this identity key, made once
    per run and kept in the node state (a P-384 signature per round would cost more than the
    round's other signatures together); else b""."""
    if not registered(context):
        return b""
    record = context.state.config_records.get(CERT)
    if record is not None and bytes(record["public"]) == public:
        return bytes(record["cert"])
    cert = identity.sign(load_private(str(context.node_config["identity-key"])), identity.CERTIFY, b"", public)
    context.state[CERT] = ConfigRecord({"public": public, "cert": cert})
    return cert


def registered_check(folder: str | None = None) -> Callable[[int, str, bytes, bytes], str] | None:
    """``check(node, name, public, cert)`` -> "" or why the node is not admitted: ``cert`` must
    be the signature, by the key registered under that name in the keys folder (deployment),
    on the identity key ``public``. None without a folder: a simulation, where a node with a
    registered key fails the round (flower_server._identify), never a silent fallback to
    self-reported names."""
    folder = folder if folder is not None else os.environ.get(KEYS_ENV, "")
    if not folder:
        return None

    def check(node: int, name: str, public: bytes, cert: bytes) -> str:
        path = Path(folder) / f"{name}.pub"
        if "/" in name or name.startswith(".") or not path.is_file():
            return f"node {node} names itself {name!r}, which has no registered key in {folder}"
        registered = serialization.load_ssh_public_key(path.read_bytes())
        der = registered.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not identity.verify(der, cert, identity.CERTIFY, b"", public):
            return f"node {node} names itself {name!r} but its identity key is not certified by that client's " \
                   "registered key"
        return ""

    return check
