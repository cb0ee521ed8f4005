"""The coordinator's side of a run: what its ServerApp does.

app.py         the ServerApp's main: the run folder, its lock, run.json, the summary
loop.py        the round loop: train -> aggregate -> save -> evaluate, each round
setup.py       before round 0: the initial adapter, the strategy, the clients connected
strategy.py    Flower strategies: sampling, screening replies, the (client-level DP) average
aggregation.py the server optimizer applied to the average
budget.py      the server's own ledger: client-level DP and distributed DP spends
secure.py      a training round under SecAgg+
resume.py      a restarted server continues after the last completed round
"""

from fedtune.server.app import main
from fedtune.server.setup import initial_adapter

__all__ = ["initial_adapter", "main"]
