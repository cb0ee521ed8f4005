"""A data holder's side of a round: what its ClientApp does with each message.

app.py    the Flower handlers (train, evaluate), thin
setup.py  the typed client setup from the run config: model, data, seeded generators
round.py  one local round top to bottom: policy, budget, train, clip, spend, release
state.py  what stays on the client between rounds: kept tensors and the release to resend
secure.py the checks a client makes on a secure round's parameters (its own config decides)
reply.py  the messages a client answers with
"""

from fedtune.client.app import handle_evaluate, handle_train

__all__ = ["handle_evaluate", "handle_train"]
