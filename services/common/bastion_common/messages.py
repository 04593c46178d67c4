"""Every message that crosses a process boundary through Redis, typed and versioned.

Each is serialised as JSON into one stream field (``FIELD``), never pickled.
Readers ignore fields they do not know, so a newer writer does not break an
older reader.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from bastion_common.errors import BastionError

FIELD = "m"
VERSION = 1
Status = Literal["ok", "blocked", "error", "cancelled"]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = VERSION

    def dump(self) -> dict[Any, Any]:
        """The stream entry's fields (typed loosely, as redis-py's XADD takes them)."""
        return {FIELD: self.model_dump_json()}

    @classmethod
    def load(cls, fields: dict[str, str]) -> Self:
        return cls.model_validate_json(fields[FIELD])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


# Where each request field's bounds live: the gateway validates requests
# against these models and the worker reads the same ones off the queue.
# OpenAI's documented ranges where it documents one; elsewhere a range that
# keeps the sampler's arithmetic finite.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_NEW_TOKENS = 1 << 20  # a role's ceiling in the policy usually caps far lower
MAX_TOP_K = 1 << 20  # the worker also refuses a top_k above its model's vocabulary
SEED_BITS = 64  # torch's generators take a 64-bit seed; signed, as JSON clients send it
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # logits scaled at most 100x: finite in fp32

MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
_StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]


def _stop_tuple(value: object) -> object:
    """OpenAI's ``stop`` is a string, a list of strings or null."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return value


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # None: the gateway applies its default (BASTION_DEFAULT_MAX_TOKENS, capped by
    # the role) before queueing; a request that reaches a worker without one may
    # fill the model's context, as in vLLM.
    max_tokens: MaxTokens | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K)  # 0 or -1 (vLLM's spelling): off
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(
        1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    stop: Annotated[
        tuple[StopString, ...],
        Field(max_length=MAX_STOP_SEQUENCES),
        BeforeValidator(_stop_tuple, json_schema_input_type=StopString | _StopList | None),
    ] = ()
    seed: int | None = Field(None, ge=-(2 ** (SEED_BITS - 1)), le=2 ** (SEED_BITS - 1) - 1)
    # Keep generating past end-of-sequence, up to max_tokens (as vLLM's ignore_eos; benchmarks).
    ignore_eos: bool = False

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


class Requester(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    subject: str
    tenant: str
    role: str


class GenerationRequest(Message):
    """The gateway's request to the worker group of one model."""

    id: str
    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = SamplingParams()
    # Higher goes first; waiting raises it over time so nothing starves.
    priority: int = 0
    requester: Requester
    result_stream: str  # the gateway's (Keys.results), shared by its requests
    cancel_key: str
    enqueued_at: float
    deadline: float


class ResultRecord(Message):
    """One record of a request's answer on its gateway's result stream, under
    the request's id (:meth:`entry`). ``token`` records carry text in order;
    exactly one ``done`` or ``error`` record ends the answer (a ``done`` may
    carry the last text)."""

    kind: Literal["token", "done", "error"]
    text: str = ""
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None
    error_code: str | None = None
    error_param: str | None = None

    @classmethod
    def failure(cls, exc: BastionError) -> ResultRecord:
        """The final record of a request that failed with ``exc``."""
        return cls(
            kind="error",
            error_type=type(exc).__name__,
            error_message=exc.message,
            error_code=exc.code,
            error_param=exc.param,
        )

    @property
    def final(self) -> bool:
        return self.kind != "token"

    def entry(self, request_id: str) -> dict[Any, Any]:
        """A result stream entry holding this record alone."""
        return {request_id: self.model_dump_json()}


class AuditEvent(Message):
    """What the auditor stores for one request: metadata and hashes, never text."""

    id: str
    timestamp: float
    user_id: str
    tenant: str
    role: str
    model: str
    endpoint: str
    input_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_length: int
    prompt_tokens: int
    completion_tokens: int
    processing_time: float
    status: Status
    error_code: str = ""
    guard_verdict: str = ""
    guard_findings: tuple[str, ...] = ()
