"""What a data holder's ClientApp does with each message from the server.

train: load the global adapter, check the privacy budget against the local ledger,
train one round (DP-SGD), write the spend to the ledger (fsync'ed), then reply with the
new adapter (fedtune.client.round), or, under secure aggregation, take part in the
SecAgg+ stage the message names (the update then leaves only masked). A request the
client already paid for (a restarted server asking again) gets the same update again at
no cost (fedtune.client.state, fedtune.release).
evaluate: held-out loss of the adapter it is sent.
"""

from __future__ import annotations

import math
import time

from flwr.app import Context, Message

from fedtune import revealed
from fedtune.client.reply import error_reply, named_reply, update_reply
from fedtune.client.round import local_round
from fedtune.client.secure import bind, check_encoding, client_name, colluders, identity_file, min_inputs
from fedtune.client.setup import setup
from fedtune.client.state import full_adapter
from fedtune.errors import FedtuneError
from fedtune.floor import failure_reason
from fedtune.secagg.flower import STAGE, handle_stage

# Under secure aggregation only these metrics travel in the clear (fedtune.revealed).
REVEALED_UNDER_SECAGG = revealed.REVEALED_UNDER_SECAGG


def handle_train(msg: Message, context: Context) -> Message:
    if STAGE in msg.content["config"]:  # secure aggregation: one of its stages
        try:
            return handle_stage(msg, context, lambda m: local_round(m, context, secure=True),
                                check=lambda encoding: check_encoding(context, encoding),
                                min_inputs=lambda: min_inputs(context), who=lambda: client_name(context),
                                bind=lambda r, digest: bind(context, r, digest), keep=lambda: identity_file(context),
                                colluders=lambda: colluders(context))
        except FedtuneError as exc:  # names the peer or the problem; the server drops us this round
            return error_reply(msg, f"node {context.node_id} (secure aggregation)", exc)
    update = local_round(msg, context, secure=False)
    if isinstance(update, Message):
        return update
    return update_reply(msg, update)


def handle_evaluate(msg: Message, context: Context) -> Message:
    from fedtune.model import set_adapter_state  # lazy: torch, peft
    from fedtune.train import evaluate  # lazy: torch

    try:
        s = setup(context)
        set_adapter_state(s.m.model, full_adapter(s, msg.content["arrays"].to_torch_state_dict()))
    except (FedtuneError, KeyError, ValueError) as exc:
        return error_reply(msg, "client evaluate", exc)
    if not revealed.evaluation_allowed(s.cfg):  # a per-client loss no DP covers: withheld (privacy.reveal_losses)
        return named_reply(msg, s.name, {"eval-withheld": 1})
    t0 = time.perf_counter()
    try:
        loss_sum, tokens = evaluate(
            s.m.model, s.heldout, batch_size=s.cfg.train.eval_batch_size, device=s.m.device,
            amp_dtype=s.m.amp_dtype, pad_id=s.pad_id,
        )
    except Exception as exc:  # noqa: BLE001 - named in the summary; the headline leaves this client out
        return error_reply(msg, s.name, RuntimeError(failure_reason("evaluation", exc)))
    mean = loss_sum / max(tokens, 1)
    return named_reply(msg, s.name, {
        "num-examples": len(s.heldout), "eval-loss-sum": loss_sum, "eval-tokens": tokens,
        "eval-loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval-seconds": time.perf_counter() - t0,
    })
