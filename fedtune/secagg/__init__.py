"""Secure aggregation (SecAgg+, Bell et al. CCS 2020), independent of Flower and torch.

encoding.py turns float updates into field elements and packs them; protocol.py holds the
parameters, stages and masks; client.py and server.py are the two state machines. A
transport (e.g. a Flower workflow) maps each Stage to one message round trip.
"""

from fedtune.secagg.client import SecAggClient
from fedtune.secagg.encoding import FixedPoint, WeightedFixedPoint, pack, unpack
from fedtune.secagg.protocol import SecAggAborted, SecAggError, SecAggParams, SecAggSetup, Stage
from fedtune.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "FixedPoint", "SecAggAborted", "SecAggClient", "SecAggError", "SecAggParams", "SecAggResult", "SecAggServer",
    "SecAggSetup", "Stage", "WeightedFixedPoint", "pack", "unpack",
]
