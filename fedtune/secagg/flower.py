"""SecAgg+ on Flower's Message API: the server's training round (flower_server.py) and the
client's stages (flower_client.py), over the messages of wire.py.

Each protocol stage is one round trip of TRAIN messages through ``Grid.send_and_receive``;
the message config names it under ``secagg-stage``:

  identify     the server's commitment to its graph seed -> the node's name, identity public
               key (roster.py; deployment: only a name's registered key is admitted) and a
               commitment to a fresh graph nonce (coin.py)
  graph        every admitted node's nonce commitment -> the node's nonce
  advertise    setup (parameters, clients, the server's seed, the nonces, the graph seed
               drawn from them, roster, encoding) -> two public keys, signed with the
               identity key, once the graph seed checks out
  share        the neighbours' signed public keys -> encrypted shares for each neighbour
  collect      the global adapter and the shares addressed to this client -> the client
               trains (spending from its ledger first), encodes [w·Δ, w] in fixed point
               and sends it masked, with a signed "real input or refusal" (and, for a
               resend, the input set its first sum had)
  consistency  the survivor set and their signed declarations -> the set, signed
  unmask       which neighbours survived or dropped, and the survivors' signatures ->
               the shares the server needs (only if a quorum signed the same set)

The server learns Σ w_i·Δ_i and Σ w_i of the clients whose inputs are in the sum, and
adds Σ w_i·Δ_i / Σ w_i to the global adapter. It never sees one client's update or its
example count. A client's protocol secrets stay in its own node state between stages.
"""

from fedtune.secagg.flower_client import LocalUpdate, handle_stage
from fedtune.secagg.flower_server import SecureRound, secure_train
from fedtune.secagg.wire import ENCODING, GRAPH, IDENTIFY, MASKED, STAGE, STATE, Encoding, flatten, from_record, to_record

__all__ = ["ENCODING", "GRAPH", "IDENTIFY", "MASKED", "STAGE", "STATE", "Encoding", "LocalUpdate", "SecureRound",
           "flatten", "from_record", "handle_stage", "secure_train", "to_record"]
