"""Flower's own `flower-supernode`, with three deliberate changes (docs/deployment.md).

1. Message latency. Flower 1.42's SuperNode sleeps a hard-coded 3 s after every pull that
   finds no message (flwr/supernode/start_client_internal.py), so each wave of messages (a
   SecAgg+ key stage, an evaluation) waits up to 3 s at every client. Here the pull is asked
   again after ``PULL_S`` while messages flow (for ``BUSY_S`` after the last one received or
   replied to: a long training counts from its reply), and after
   Flower's 3 s once the node has been idle longer: a few more small requests per second to
   the SuperLink during a run, none more when idle. Its 0.5 s waits for the local worker's
   reply become ``LOCAL_S`` (a look at its own in-memory state). A message's objects not yet
   uploaded to the SuperLink (the server registers a wave's messages, then uploads their
   contents) are asked for again after ``OBJECT_RETRY_S``, doubling, not after 1 s.
2. Dead-node detection. Flower's SuperNode declares a 30 s heartbeat interval, so the
   SuperLink marks a killed node offline (NODE_UNAVAILABLE) 38-60 s after its death; with
   ``--fedtune-heartbeat`` (client.heartbeat, by default Flower's minimum, 10 s) 16-20 s after.
3. Start-up: when the node is admitted (its node id is known), ``--fedtune-ready-file`` is
   written, so `fedtune client start` starts the worker (which imports torch) only for a
   node that joined, not for one the server turns away.

Everything else is Flower's code, unchanged. flwr is pinned (1.42.0): if Flower changes the
code these changes rely on, the SuperNode does not start and says so in one line.

    python -m fedtune.deploy.supernode [--fedtune-heartbeat S] [--fedtune-ready-file F] FLOWER_ARGS...
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PULL_S = 0.2  # seconds between pulls from the SuperLink while a run's messages flow
BUSY_S = 60.0  # that long after the last message; then Flower's own 3 s
LOCAL_S = 0.05  # seconds between looks for the worker's reply (the SuperNode's own state)
OBJECT_RETRY_S = 0.05  # first retry of an object not yet at the SuperLink (Flower: 1 s), doubling to Flower's 10 s cap
IDLE_SLEEP_S, LOCAL_SLEEP_S = 3, 0.5  # Flower 1.42's fixed sleeps, which these replace
HEARTBEAT_MIN_S = 10.0  # the SuperLink refuses a shorter interval (flwr.common.constant.HEARTBEAT_MIN_INTERVAL)


class FlowerChanged(RuntimeError):
    """The SuperNode code this launcher adjusts is not what it expects (flwr upgraded)."""


class _PacedTime:
    """The ``time`` module as start_client_internal sees it: its fixed sleeps shortened."""

    def __init__(self, sleep=time.sleep) -> None:
        self.last_message, self._sleep = float("-inf"), sleep

    def __getattr__(self, name: str):
        return getattr(time, name)

    def message(self) -> None:
        self.last_message = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP_S and time.monotonic() - self.last_message < BUSY_S:
            seconds = PULL_S
        elif seconds == LOCAL_SLEEP_S:
            seconds = LOCAL_S
        self._sleep(seconds)


def _expect(module, needles: list[str]) -> None:
    source = inspect.getsource(module)
    missing = [n for n in needles if n not in source]
    if missing:
        raise FlowerChanged(f"{module.__file__} no longer has {missing[0]!r}")


def patch(heartbeat: float, ready_file: Path | None, sleep=time.sleep) -> _PacedTime:
    """Apply the changes to Flower's SuperNode modules (before it starts); the paced clock."""
    from flwr.supercore import heartbeat as beat
    from flwr.supernode import fleet_http_connection as fleet
    from flwr.supernode import start_client_internal as sci

    _expect(sci, [f"time.sleep({IDLE_SLEEP_S})", f"time.sleep({LOCAL_SLEEP_S})", "run_id = _pull_and_store_message(",
                  "_push_messages(\n", "with _init_connection(", "obj_contents = pull_objects("])
    _expect(fleet, ["heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL"])
    _expect(beat, ["HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT"])
    clock, pull, push, connect = _PacedTime(sleep), sci._pull_and_store_message, sci._push_messages, sci._init_connection

    def pull_and_store(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.message()
        return run_id

    def push_replies(*args, **kwargs):
        push(*args, **kwargs)
        clock.message()

    @contextmanager
    def announced(*args, **kwargs):
        with connect(*args, **kwargs) as conn:
            if ready_file is not None:  # conn[0] is the node id the SuperLink gave this node
                ready_file.write_text(f"{conn[0]}\n")
            yield conn

    sci.time, sci._init_connection = clock, announced
    sci._pull_and_store_message, sci._push_messages = pull_and_store, push_replies
    sci.pull_objects = functools.partial(sci.pull_objects, initial_backoff=OBJECT_RETRY_S)
    fleet.HEARTBEAT_DEFAULT_INTERVAL = beat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat  # declared, and the sender's period
    return clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--fedtune-heartbeat", type=float, default=HEARTBEAT_MIN_S)
    ap.add_argument("--fedtune-ready-file", type=Path, default=None)
    ours, flower_args = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if ours.fedtune_heartbeat < HEARTBEAT_MIN_S:
        print(f"fedtune: client.heartbeat must be >= {HEARTBEAT_MIN_S:g} s (the SuperLink's minimum)", file=sys.stderr)
        return 2
    try:
        patch(ours.fedtune_heartbeat, ours.fedtune_ready_file)
    except (FlowerChanged, ImportError, AttributeError, OSError) as exc:
        import flwr

        print(f"fedtune: cannot start the SuperNode: flwr {flwr.__version__}'s SuperNode is not the one fedtune "
              f"adjusts ({exc}); install the pinned flwr==1.42.0 (make install)", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
