"""Answering one Task frame: decode the Flower message, run its handler, encode the reply.

Every outcome is a Reply the coordinator can decode: a handler's answer, an
error reply from the handler registry (unknown type, handler failure), an error
reply for a task that did not decode, an error reply in place of an answer that
does not encode (logged with its traceback: raised on the agent's task thread,
it would have ended that thread and every later task would go unanswered), or an
error reply in place of an answer larger than the coordinator accepts (so the
round records why, instead of the stream breaking on an oversized frame).
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message, RecordDict

from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.flower_adapter import (
    COORDINATOR_NODE_ID,
    ERR_HANDLER_FAILED,
    ERR_MESSAGE_TOO_LARGE,
    MessageDecodeError,
    message_from_bytes,
    message_to_bytes,
    new_instruction,
    reply_with_error,
    set_message_id,
)
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

log = logging.getLogger(__name__)


def _stand_in(task: fleet_pb2.Task, node_id: int) -> Message:
    """An instruction to reply to when the task's own bytes did not decode.

    Its real type is unknown; Flower only accepts train/evaluate/query categories,
    and the coordinator matches replies by message id, so "query.undecodable" it is.
    """
    message = new_instruction(
        RecordDict(), "query.undecodable", node_id, run_id=0, src_node_id=COORDINATOR_NODE_ID
    )
    set_message_id(message, task.message_id)
    return message


def reply_frame(message_id: str, reply: Message, compute_s: float) -> fleet_pb2.AgentFrame:
    return fleet_pb2.AgentFrame(
        reply=fleet_pb2.Reply(
            message_id=message_id,
            flower_message=message_to_bytes(reply),
            compute_seconds=compute_s,
        )
    )


def answer_task(
    task: fleet_pb2.Task,
    handlers: HandlerRegistry,
    context: Context,
    max_message_bytes: int,
) -> fleet_pb2.AgentFrame:
    """The Reply frame for `task`; `max_message_bytes` 0 means the coordinator set no limit."""
    started = time.perf_counter()
    try:
        message = message_from_bytes(task.flower_message)
    except MessageDecodeError as exc:
        log.warning("task %s did not decode: %s", task.message_id, exc)
        instruction = _stand_in(task, context.node_id)
        error = reply_with_error(instruction, ERR_HANDLER_FAILED, f"agent could not decode the task: {exc}")
        return reply_frame(task.message_id, error, time.perf_counter() - started)
    set_message_id(message, task.message_id)
    message_type = message.metadata.message_type
    reply = handlers.handle(message, context)
    compute_s = time.perf_counter() - started
    try:
        frame = reply_frame(task.message_id, reply, compute_s)
    except Exception as exc:  # e.g. a handler that returned None: answer, and keep answering
        reason = (f"the answer to {message_type!r} is not a Flower message that encodes: "
                  f"{type(exc).__name__}: {exc}")
        log.warning("task %s: %s; sending an error reply instead", task.message_id, reason, exc_info=True)
        return reply_frame(task.message_id, reply_with_error(message, ERR_HANDLER_FAILED, reason), compute_s)
    size = frame.ByteSize()
    if max_message_bytes and size > max_message_bytes:
        reason = (
            f"reply to {message_type!r} is {size} bytes, over the coordinator's limit of "
            f"{max_message_bytes} bytes (max_message_bytes)"
        )
        log.warning("task %s: %s; sending an error reply instead", task.message_id, reason)
        error = reply_with_error(message, ERR_MESSAGE_TOO_LARGE, reason)
        frame = reply_frame(task.message_id, error, compute_s)
    return frame
