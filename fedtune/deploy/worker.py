"""The client worker: one long-lived process that runs every message of a deployed client.

Flower's SuperNode in ``--isolation process`` mode holds the messages and serves them over
its local Runtime (ClientAppIo) API; it starts no executor of its own. This worker takes
the executor's place: it acquires a task the way ``flower-superexec`` does (authenticated
with the SuperExec secret only ``fedtune client start`` and this process know), pulls the
message, context, run and FAB with Flower's own client functions, and runs fedtune's
handlers from the client's installed fedtune in this process, so the imports, the base
model with LoRA and the tokenized data stay loaded across messages and runs. The FAB's
bytes are handed to ``check_app`` (the approval hook) and never written, installed or
imported. State on disk (ledger, release store) stays the truth: a killed worker is
restarted by ``fedtune client start`` and a request it already paid for is resent free.

    python -m fedtune.deploy.worker --runtime-api 127.0.0.1:9094 --secret-file state/superexec.secret
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedtune.client import handle_evaluate, handle_train
from fedtune.deploy import approved
from fedtune.deploy.supervisor import check_paths
from fedtune.errors import FedtuneError
from fedtune.secagg.flower import STAGE

log = logging.getLogger("fedtune.worker")
POLL_S = 0.05  # seconds between asks for a task when idle (a local HTTP call)
PULL_RETRY_S = 0.02  # retry period for an object the SuperNode has not stored yet (Flower: 1 s, doubling)
REFUSED = 1001  # Flower error code of a message the worker refuses before any handler runs


def check_app(run, fab) -> None:
    """The approval hook: called with the run and its FAB before a message is handled.

    Raises FedtuneError (one line, sent back as the reply's error and logged) unless the
    FAB's SHA-256 is in the operator's client.apps, which ``fedtune client start`` passes in
    the environment (fedtune.deploy.approved). The worker never runs the FAB's code either way."""
    import os

    allowed = [h for h in os.environ.get(approved.APPS_ENV, "").split(",") if h]
    approved.check_fab(fab.content, allowed, os.environ.get(approved.NAME_ENV, "?"))


def fedtune_app() -> ClientApp:
    """fedtune's ClientApp, from this installation (the same handlers as simulation)."""
    app = ClientApp()
    app.train()(handle_train)
    app.evaluate()(handle_evaluate)
    return app


def handle(app: ClientApp, message: Message, context: Context, run, fab,
           check: Callable = check_app) -> Message:
    """The reply to one message: a refusal when the approval hook raises, else the app's."""
    try:
        check(run, fab)
    except FedtuneError as exc:
        log.warning("fedtune: refused run %s (FAB %s): %s", run.run_id, fab.hash_str[:12], exc)
        return Message(Error(code=REFUSED, reason=f"client worker refused the run: {exc}"), reply_to=message)
    try:
        return app(message=message, context=context)
    except Exception as exc:  # noqa: BLE001 - a handler bug fails this message, not the worker
        log.exception("fedtune: the handler failed")
        return Message(Error(code=1000, reason=f"client worker: {type(exc).__name__}: {exc}"), reply_to=message)


def _task_client(address: str, token: str):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, retry_invoker=make_simple_http_retry_invoker(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)])


def _heartbeat(client) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its SIGINT on a lost task (that would stop this worker)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())  # a lost task shows when the reply is pushed
            return True
        except Exception:  # noqa: BLE001 - retried by HeartbeatSender
            return False
    return beat


def kind(message: Message) -> str:
    """evaluate, train, or the SecAgg+ stage a train message names."""
    config = message.content.config_records.get("config", {})
    return str(config[STAGE]) if STAGE in config else message.metadata.message_type


def _since(pending_at: str) -> float:
    """Seconds since ``pending_at``, when the SuperNode stored the message (Flower's task timestamp)."""
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(pending_at)).total_seconds()
    except (ValueError, TypeError):  # none given (tests) or not Flower's aware ISO time
        return float("nan")


def pull_task_input(client):
    """(message, context, run, fab, time it was whole) of the acquired task: Flower's own
    ``pull_task_input`` (flwr/supernode/runtime/run_clientapp.py), except that an object the
    SuperNode is still fetching from the SuperLink is asked for again every 20 ms (Flower
    backs off from 1 s): the SuperNode announces a task before it holds the message's objects."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    pull, received = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id), [time.time()]

    def timed_pull(object_id: str) -> bytes:
        content = pull(object_id)
        received[0] = max(received[0], time.time())  # the last object in: the message is whole at the SuperNode
        return content

    message = pull_and_inflate_object_from_tree(
        tree, timed_pull, make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_RETRY_S, backoff_cap=PULL_RETRY_S,
        max_tries_per_object=None)  # Flower's 500 tries would give up after 10 s; its 2 h limit stays
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the pulled object
    return message, context, run, fab, received[0]


def run_task(app: ClientApp, address: str, token: str, check: Callable = check_app, pending_at: str = "") -> None:
    """Pull one task's message, handle it in this process, push the reply and the context."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _task_client(address, token)
    beats = HeartbeatSender(_heartbeat(client))
    beats.start()
    context, status, details = None, SubStatus.FAILED, "the client worker failed"
    try:
        message, context, run, fab, whole = pull_task_input(client)
        announced, arrived, t0 = _since(pending_at), time.time() - whole, time.perf_counter()
        reply = handle(app, message, context, run, fab, check)
        log.info("fedtune: %s message of run %s: handler started %.3f s after its arrival (%.3f s after the SuperNode "
                 "announced it), done in %.2f s", kind(message), run.run_id, arrived, announced, time.perf_counter() - t0)
        push_message(client, reply, context)
        status, details = SubStatus.COMPLETED, ""
    finally:
        beats.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()


def _acquirer(address: str, secret: bytes):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, retry_invoker=make_simple_http_retry_invoker(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])


def serve(address: str, secret: bytes, check: Callable = check_app) -> None:
    """Acquire ClientApp tasks from the SuperNode and run them here, one at a time, forever."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    app = fedtune_app()
    acquirer = _acquirer(address, secret)
    while True:
        res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            time.sleep(POLL_S)
            continue
        try:
            run_task(app, address, res.token, check, res.task.pending_at)
        except Exception:  # noqa: BLE001 - a lost task (SuperNode restarted, task expired) is not ours to die for
            log.exception("fedtune: task %s failed", res.task.task_id)


def warm_up() -> None:
    """Import what model messages need now, not at the first message."""
    import opacus  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fedtune.model  # noqa: F401  # lazy: torch, loaded here on purpose (the warm-up)
    import fedtune.train  # noqa: F401  # lazy: torch, loaded here on purpose (the warm-up)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fedtune's long-lived client worker (started by `fedtune client start`)")
    ap.add_argument("--runtime-api", required=True, help="the SuperNode's Runtime API, host:port")
    ap.add_argument("--secret-file", required=True, help="the SuperExec secret shared with the SuperNode")
    ap.add_argument("--data", required=True, help="the client's data file (client.data)")
    ap.add_argument("--model-cache", default="", help="the client's model cache (client.model_cache)")
    args = ap.parse_args(argv)
    try:
        check_paths(args.data, args.model_cache)
    except FedtuneError as exc:
        print(f"fedtune: the client worker cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        with open(args.secret_file, "rb") as fh:
            secret = fh.read()
    except OSError as exc:
        print(f"fedtune: cannot read the worker secret {args.secret_file} ({exc.strerror}); start the client with "
              "`fedtune client start`", file=sys.stderr)
        return 2
    warm_up()
    serve(args.runtime_api, secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
