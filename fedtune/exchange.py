"""One wave of messages to clients and their replies, as ``Grid.send_and_receive`` does,
with two differences that matter when a client dies:

- replies are asked for every ``POLL_S`` (Flower's deployed grid sleeps 3 s between asks,
  so every wave costs at least 3 s even when the clients answer in milliseconds);
- the SuperLink's own error reply for a node it has marked offline (``NODE_UNAVAILABLE``,
  sent as from the SuperLink, not from the node) is attributed to the node it is about, so
  the server stops waiting for that node at once and says which node it was.

Replies come back in arrival order, as Flower's do; callers sort where order matters.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

POLL_S = 0.2  # seconds between asks for replies (a local call to the SuperLink)


def send_and_receive(grid, messages: Iterable[Message], timeout: float, poll: float = POLL_S) -> list[Message]:
    """Send ``messages``; their replies, waiting at most ``timeout`` seconds for the last one."""
    messages = list(messages)
    if not isinstance(grid, Grid):  # an in-process stand-in (tests): it answers at once
        return list(grid.send_and_receive(messages, timeout=timeout))
    pushed = set(grid.push_messages(messages)) - {None, ""}  # the grid sets each message's id as it pushes
    sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id in pushed}
    waiting, replies = set(sent), []
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(sorted(waiting)):
            asked = sent.get(reply.metadata.reply_to_message_id)
            if asked is None:
                continue
            waiting.discard(asked.metadata.message_id)
            replies.append(_attributed(reply, asked))
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def _attributed(reply: Message, asked: Message) -> Message:
    """An error reply the SuperLink wrote for ``asked``'s node, as the node's own error reply."""
    if not reply.has_error() or reply.metadata.src_node_id == asked.metadata.dst_node_id:
        return reply
    return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=asked)
