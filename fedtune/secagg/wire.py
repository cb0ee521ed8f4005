"""SecAgg+ messages on Flower: the stage names, protocol dicts <-> ConfigRecords, and the
public encoding of updates (shared by flower_server.py and flower_client.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from fedtune.errors import FedtuneError
from fedtune.privacy.distributed import DDGPlan
from fedtune.secagg.encoding import DistributedGaussian, FixedPoint, WeightedFixedPoint
from fedtune.secagg.protocol import SecAggError

STAGE = "secagg-stage"
STATE = "fedtune-secagg"  # the client's round secrets, in its Context.state
ENCODING = "secagg-encoding"
MASKED = "masked"
IDENTIFY = "identify"  # before the protocol: each node names itself and its identity key (roster.py)
GRAPH = "graph"  # then the nonces of the graph seed's coin toss are revealed (coin.py)


# ---- protocol messages <-> Flower ConfigRecords ------------------------------------------
# Client ids are Flower node ids (unsigned 64-bit), beyond ConfigRecord's signed ints: they
# travel as strings. {id: bytes} maps travel as two parallel lists; an empty map or list
# as a marker (Flower cannot count the bytes of an empty list).
def to_record(msg: dict[str, Any], **extra: Any) -> ConfigRecord:
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if isinstance(value, (dict, list, tuple)) and not value:
            out[f"{key}.empty"] = "dict" if isinstance(value, dict) else "list"
        elif isinstance(value, dict):
            out[f"{key}.ids"] = [str(k) for k in value]
            out[f"{key}.values"] = [bytes(v) for v in value.values()]
        elif isinstance(value, (list, tuple)):
            out[f"{key}.list"] = [str(v) for v in value]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[f"{key}.int"] = str(int(value))
        else:
            out[key] = value
    return ConfigRecord({**out, **extra})


def from_record(record: ConfigRecord) -> dict[str, Any]:
    msg: dict[str, Any] = {}
    try:
        for key, value in record.items():
            name, _, kind = key.rpartition(".")
            if kind == "ids":
                values = record[f"{name}.values"]
                if len(values) != len(value):
                    raise ValueError(f"'{name}' has {len(value)} ids but {len(values)} values")
                msg[name] = {int(k): bytes(v) for k, v in zip(value, values)}
            elif kind == "list":
                msg[name] = [int(v) for v in value]
            elif kind == "int":
                msg[name] = int(value)
            elif kind == "empty":
                msg[name] = {} if value == "dict" else []
            elif kind != "values":
                msg[key] = value
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"secure aggregation: malformed protocol message ({e})") from None
    return msg


@dataclass(frozen=True)
class Encoding:
    """How updates become field elements; public, sent with the setup. With ``ddg`` set
    (client-level DP under secure aggregation) each client adds its own noise."""

    bits: int
    clip: float
    max_weight: float
    n_max: int
    ddg: DDGPlan | None = None

    def coder(self) -> WeightedFixedPoint | DistributedGaussian:
        if self.ddg is not None:
            return DistributedGaussian(self.ddg)
        return WeightedFixedPoint(FixedPoint(self.clip, self.bits, self.n_max), self.max_weight)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Encoding:
        try:
            d = json.loads(text)
            ddg = DDGPlan.from_dict(d["ddg"]) if d.get("ddg") else None
            return cls(int(d["bits"]), float(d["clip"]), float(d["max_weight"]), int(d["n_max"]), ddg)
        except (KeyError, TypeError, ValueError, FedtuneError) as e:
            raise SecAggError(f"secure aggregation: malformed encoding ({e})") from None


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).reshape(-1) for k in keys])

