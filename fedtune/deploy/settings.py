"""The two deployment config files: server/server.toml and client/client.toml.

The server's file is a fedtune run config (rounds, clients, aggregation, secure
aggregation, client-level DP...) plus a ``[server]`` table for the SuperLink. A client's
file is its operator's alone: its data, its privacy budget, its key, its state folder. It
never leaves the client's machine; the SuperNode hands it to the ClientApp as node config.
Relative paths are relative to the file's folder.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtune import config as config_mod
from fedtune.deploy.policy import Policy
from fedtune.errors import FedtuneError


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FedtuneError(f"{what} {p} not found; start from the template (server/server.toml or client/client.toml)") from None
    except OSError as exc:
        raise FedtuneError(f"cannot read {what} {p} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise FedtuneError(f"{what} {p} is not valid TOML ({exc}); fix the syntax") from None


def _table(data: dict, name: str, cls, where: Path) -> dict[str, Any]:
    body = data.get(name)
    if not isinstance(body, dict):
        raise FedtuneError(f"{where}: needs a [{name}] table; start from the template")
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in body.items():
        if key not in known:
            raise FedtuneError(f"{where}: unknown key {name}.{key} (keys: {', '.join(known)})")
        want = type(getattr(cls(), key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise FedtuneError(f"{where}: {name}.{key} must be a {want.__name__} (got {value!r})")
        out[key] = value
    return out


def _path(base: Path, value: str) -> str:
    return str((base / Path(value).expanduser()).resolve()) if value else ""


def _port(port: int, where: str) -> None:
    if not 1 <= port <= 65535:
        raise FedtuneError(f"{where} must be a TCP port in 1..65535 (got {port})")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"  # interface the SuperLink listens on (0.0.0.0 = all)
    port: int = 9092  # the SuperLink's one port (Fleet, Control and ServerApp APIs)
    names: list = field(default_factory=lambda: ["localhost", "127.0.0.1"])  # what clients dial; in the certificate
    certs: str = "certs"  # ca.crt, server.pem, server.key (`fedtune certs`)
    keys: str = "keys"  # registered clients' public keys, *.pub (`fedtune keys`)
    state: str = "state"  # the SuperLink's database: runs and registered keys survive a restart
    output: str = "runs"  # run folders

    @property
    def address(self) -> str:
        return f"{self.names[0]}:{self.port}"


@dataclass(frozen=True)
class ClientSettings:
    name: str = ""  # this client's name in the server's records and the audit
    superlink: str = "localhost:9092"  # the server's address, a name in its certificate
    ca: str = "certs/ca.crt"  # the CA that signed the server's certificate
    key: str = "keys/client"  # this client's private key; its .pub is registered with the server
    data: str = ""  # this client's records: .jsonl, .csv or .parquet
    budget: float = 8.0  # ε this client spends at most, whatever the server asks
    state: str = "state"  # ledgers and status (privacy spend), kept here
    model_cache: str = ""  # base models; default $FEDTUNE_CACHE or ~/.cache/fedtune
    port: int = 9094  # local port where this SuperNode serves its ClientApp processes
    allow_seeded: bool = False  # tests only: accept runs whose DP noise is seeded (no guarantee)
    min_inputs: int = 3  # under secure aggregation: refuse rounds whose sum may hold fewer real inputs
    apps: list = field(default_factory=list)  # approved app hashes (`fedtune client approve`); others are refused
    dataset: str = ""  # the data set's name: its lifetime ledger (every run on it spends one budget); "" = name
    policy: Policy = field(default_factory=Policy)  # the [policy] table: the weakest run this client accepts
    user_field: str = ""  # the column naming each record's person: every run then protects one person (user-level DP)
    heartbeat: float = 10.0  # seconds; the server declares this node dead 2x this after its last sign of life


def load_server(path: str | Path) -> tuple[ServerSettings, config_mod.Config]:
    """The ``[server]`` table and the run config (every other table) of a server file."""
    p = Path(path).expanduser().resolve()
    data = _read_toml(p, "server config")
    values = _table(data, "server", ServerSettings, p)
    for key in ("certs", "keys", "state", "output"):
        values[key] = _path(p.parent, values.get(key, getattr(ServerSettings(), key)))
    s = ServerSettings(**values)
    _port(s.port, f"{p}: server.port")
    if not s.names or not all(isinstance(n, str) and n for n in s.names):
        raise FedtuneError(f"{p}: server.names must list the names clients use to reach the server")
    run = {k: v for k, v in data.items() if k != "server"}
    cfg = config_mod.load(None, config_mod.flatten_toml(run, str(p)))
    return s, cfg


def load_client(path: str | Path) -> ClientSettings:
    p = Path(path).expanduser().resolve()
    data = _read_toml(p, "client config")
    values = _table(data, "client", ClientSettings, p)
    for key in ("ca", "key", "data", "state", "model_cache"):
        values[key] = _path(p.parent, values.get(key, getattr(ClientSettings(), key)))
    values["policy"] = Policy(**_table(data, "policy", Policy, p)).check(str(p)) if "policy" in data else Policy()
    s = ClientSettings(**values)
    bad = [h for h in s.apps if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h))]
    if bad:
        raise FedtuneError(f"{p}: client.apps must list app hashes (64 hex digits, as `fedtune run` prints them); "
                           f"got {bad[0]!r}")
    if s.dataset and ("/" in s.dataset or s.dataset.startswith(".")):
        raise FedtuneError(f"{p}: client.dataset must be a plain name such as clinic-a-2026 (got {s.dataset!r})")
    if not s.name or "/" in s.name or s.name.startswith("."):
        raise FedtuneError(f"{p}: client.name must be a plain name such as clinic-a (got {s.name!r})")
    if not s.data:
        raise FedtuneError(f"{p}: client.data is empty; name this client's data file (.jsonl, .csv or .parquet)")
    if not (s.budget > 0 and math.isfinite(s.budget)):
        raise FedtuneError(f"{p}: client.budget must be a finite ε > 0 (got {s.budget})")
    _port(s.port, f"{p}: client.port")
    if not 10.0 <= s.heartbeat <= 1800.0:  # Flower's SuperLink accepts no other interval
        raise FedtuneError(f"{p}: client.heartbeat must be 10..1800 seconds (got {s.heartbeat:g})")
    if not (isinstance(s.min_inputs, int) and s.min_inputs >= 2):
        raise FedtuneError(f"{p}: client.min_inputs must be an integer >= 2 (got {s.min_inputs!r}): a sum of one "
                           "input is that input")
    host, sep, port = s.superlink.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedtuneError(f"{p}: client.superlink must be host:port (got {s.superlink!r})")
    return s


def node_config(s: ClientSettings) -> dict[str, Any]:
    """What the SuperNode passes to every ClientApp process (Flower's node config)."""
    return {"fedtune-client": s.name, "data-file": s.data, "budget": s.budget, "state-dir": s.state,
            "model-cache": s.model_cache, "allow-seeded": s.allow_seeded, "min-inputs": s.min_inputs,
            "identity-key": s.key,  # signs its secure-aggregation messages (fedtune.secagg.roster)
            "dataset": s.dataset or s.name, **s.policy.to_node_config(),
            "user-field": s.user_field}


def node_config_arg(s: ClientSettings) -> str:
    """``--node-config`` text: space-separated key=value, values in TOML syntax."""
    return " ".join(f"{k}={config_mod.toml_value(v)}" for k, v in node_config(s).items())
