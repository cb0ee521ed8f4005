"""One wave of messages to clients and their replies, as ``Grid.send_and_receive`` does,
with two differences that matter when a client dies:

- replies are asked for every ``POLL_S`` (Flower's deployed grid sleeps 3 s between asks,
  so every wave costs at least 3 s even when the clients answer in milliseconds), and a
  reply's objects that its node has not finished uploading are asked for again after
  ``OBJECT_RETRY_S``, doubling (Flower's grid waits 1 s first);
- the SuperLink's own error reply for a node it has marked offline (``NODE_UNAVAILABLE``,
  sent as from the SuperLink, not from the node) is attributed to the node it is about, so
  the server stops waiting for that node at once and says which node it was;
- the deadline holds even when one pull hangs: Flower's pull of a reply whose objects never
  arrive (its client killed mid-upload) retries until the SuperLink's 180 s object-push
  session expires, inside one call; here that call is left behind at the deadline (replies it
  was fetching with it are lost: those nodes count as not having replied).

Replies come back in arrival order, as Flower's do; callers sort where order matters.
"""

from __future__ import annotations

import functools
import inspect
import queue
import threading
import time
from typing import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

POLL_S = 0.2  # seconds between asks for replies (a local call to the SuperLink)
OBJECT_RETRY_S = 0.05  # first retry of a reply's object still being uploaded (then doubling to Flower's 10 s cap)


def _prompt_object_pulls() -> None:
    """Flower's deployed grid (flwr.superlink.grid.http_grid) pulls a reply's objects with a
    first retry after ``OBJECT_RETRY_S`` instead of 1 s; flwr is pinned, checked here."""
    from flwr.superlink.grid import http_grid

    pull = http_grid.pull_objects
    if not isinstance(pull, functools.partial):
        if "initial_backoff" not in inspect.signature(pull).parameters:
            raise RuntimeError("flwr's pull_objects has no initial_backoff any more; fedtune.exchange needs flwr==1.42.0")
        http_grid.pull_objects = functools.partial(pull, initial_backoff=OBJECT_RETRY_S)


def send_and_receive(grid, messages: Iterable[Message], timeout: float, poll: float = POLL_S) -> list[Message]:
    """Send ``messages``; their replies, waiting at most ``timeout`` seconds for the last one."""
    messages = list(messages)
    if not isinstance(grid, Grid):  # an in-process stand-in (tests): it answers at once
        return list(grid.send_and_receive(messages, timeout=timeout))
    _prompt_object_pulls()
    pushed = set(grid.push_messages(messages)) - {None, ""}  # the grid sets each message's id as it pushes
    sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id in pushed}
    waiting, replies = set(sent), []
    deadline = time.monotonic() + timeout
    while waiting:
        pulled = _pull(grid, sorted(waiting), deadline)
        for reply in pulled or ():
            asked = sent.get(reply.metadata.reply_to_message_id)
            if asked is None:
                continue
            waiting.discard(asked.metadata.message_id)
            replies.append(_attributed(reply, asked))
        if pulled is None or not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def _pull(grid: Grid, ids: list[str], deadline: float) -> list[Message] | None:
    """``grid.pull_messages(ids)``, or None if it has not returned by ``deadline``."""
    box: queue.Queue = queue.Queue()

    def pull() -> None:
        try:
            box.put((list(grid.pull_messages(ids)), None))
        except Exception as exc:  # noqa: BLE001 - raised again in the caller's thread
            box.put(([], exc))
    threading.Thread(target=pull, daemon=True).start()  # daemon: a hung pull never holds the exit
    try:
        replies, exc = box.get(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    except queue.Empty:
        return None
    if exc is not None:
        raise exc
    return replies


def _attributed(reply: Message, asked: Message) -> Message:
    """An error reply the SuperLink wrote for ``asked``'s node, as the node's own error reply."""
    if not reply.has_error() or reply.metadata.src_node_id == asked.metadata.dst_node_id:
        return reply
    return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=asked)
