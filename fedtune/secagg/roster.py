"""Whose identity key signs a client's SecAgg+ messages, and how the server binds node ids
to registered names before a secure round.

Deployment: the client's own authentication key (``fedtune keys``; client.toml's ``key``,
passed to the ClientApp as node config ``identity-key``), whose ``.pub`` the server holds
in its keys folder (``FEDTUNE_CLIENT_KEYS``, set by ``fedtune server start``). A node that
names itself is admitted to the round's roster only with that name's registered key, so
one registered client cannot speak for another.

Simulation: a per-client Ed25519 key created for the run and kept in the node's state; the
server admits what the nodes present (a simulation trusts its own key setup).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Context

from fedtune.secagg import identity
from fedtune.secagg.protocol import SecAggError

KEYS_ENV = "FEDTUNE_CLIENT_KEYS"  # the server's folder of registered <name>.pub keys
STATE = "fedtune-secagg-identity"


def load_private(path: str | Path) -> identity.SigningKey:
    data = Path(path).expanduser().read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, identity.SigningKey):
        raise SecAggError(f"secure aggregation: {path} is not an EC or Ed25519 signing key")
    return key


def node_identity(context: Context) -> identity.SigningKey:
    """This node's signing key: its authentication key in deployment, else one for the run."""
    path = context.node_config.get("identity-key")
    if path and Path(str(path)).expanduser().is_file():  # absent: an --insecure test deployment
        return load_private(str(path))
    record = context.state.config_records.get(STATE)
    if record is not None:
        return serialization.load_der_private_key(bytes(record["der"]), password=None)  # type: ignore[return-value]
    key = identity.generate()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    context.state[STATE] = ConfigRecord({"der": der})
    return key


def registered_check(folder: str | None = None):
    """``check(node, name, public)`` -> "" or why the node is not admitted: with a keys folder
    (deployment) the public key must be the one registered under that name."""
    folder = folder if folder is not None else os.environ.get(KEYS_ENV, "")
    if not folder:
        return lambda node, name, public: ""

    def check(node: int, name: str, public: bytes) -> str:
        path = Path(folder) / f"{name}.pub"
        if "/" in name or name.startswith(".") or not path.is_file():
            return f"node {node} names itself {name!r}, which has no registered key in {folder}"
        registered = serialization.load_ssh_public_key(path.read_bytes())
        der = registered.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if der != public:
            return f"node {node} names itself {name!r} but does not hold that client's registered key"
        return ""

    return check
