"""The messages a client answers the server with."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtune.secagg.flower import LocalUpdate

ERROR_CODE = 1000  # Flower error code for fedtune client-side failures (reason says why)


def error_reply(msg: Message, who: str, exc: Exception) -> Message:
    return Message(Error(code=ERROR_CODE, reason=f"{who}: {exc}"), reply_to=msg)


def update_reply(msg: Message, update: LocalUpdate) -> Message:
    """A plain (not secure) round's answer: the update, or a refusal with no update."""
    if update.state is None:  # refused: no update leaves
        return Message(RecordDict({"metrics": MetricRecord(update.metrics), "client": ConfigRecord(update.client)}),
                       reply_to=msg)
    arrays = ArrayRecord(update.state)
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({**update.metrics, "upload-bytes": arrays.count_bytes()}),
        # The ledger's head, recorded by the server: a later rewrite of the ledger shows.
        "client": ConfigRecord(update.client),
    }), reply_to=msg)


def named_reply(msg: Message, name: str, metrics: dict) -> Message:
    """An evaluation's answer: its metrics and the client's name."""
    return Message(RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord({"name": name})}), reply_to=msg)
