"""Queue entries the worker will not serve: ones it cannot read, and requests
handed out too many times (a dead-letter queue's redelivery limit). Each is
acknowledged and deleted, and answered with an error on its gateway's result
stream where the entry still names the request and that stream."""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_common import keys as K
from bastion_common.errors import BastionError, InternalError, InvalidRequestError
from bastion_common.messages import FIELD, ResultRecord


def ack(pipe: aioredis.client.Pipeline, stream: str, entry_id: str) -> None:
    """Acknowledge and delete a stream entry: nothing of it stays in Redis."""
    pipe.xack(stream, K.WORKER_GROUP, entry_id)
    pipe.xdel(stream, entry_id)


def refuse(
    pipe: aioredis.client.Pipeline,
    stream: str,
    entry_id: str,
    fields: dict[str, str],
    error: BastionError,
) -> None:
    """Queue the entry's acknowledgement, and ``error`` to its gateway."""
    where = _reply_address(fields)
    if where is not None:
        request_id, results = where
        pipe.xadd(results, ResultRecord.failure(error).entry(request_id))
        pipe.expire(results, K.RESULT_TTL_S)
    ack(pipe, stream, entry_id)


def unreadable(exc: ValidationError | KeyError) -> InvalidRequestError:
    return InvalidRequestError(
        f"The worker could not read this request: {describe(exc)}", code="invalid_request"
    )


def exhausted(deliveries: int) -> InternalError:
    return InternalError(
        f"This request was handed to a worker {deliveries} times and each stopped before "
        "answering it; it will not be tried again.",
        code="retries_exhausted",
    )


def describe(exc: ValidationError | KeyError) -> str:
    """What made an entry unreadable: the first field and why (never its value)."""
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return f"missing field {exc}"


def _reply_address(fields: dict[str, str]) -> tuple[str, str] | None:
    """(request id, result stream) of an entry that does not parse as a
    request, where it holds them."""
    try:
        body = json.loads(fields[FIELD])
    except (KeyError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    request_id, stream = body.get("id"), body.get("result_stream")
    if isinstance(request_id, str) and isinstance(stream, str) and request_id and stream:
        return request_id, stream
    return None
