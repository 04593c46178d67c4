"""Parsing and validating request bodies into one normalised :class:`Job`.

Field names and semantics follow OpenAI's API. The sampling fields and their
bounds are declared once, in :class:`bastion_common.messages.SamplingParams`,
which the request bodies extend; the worker validates the same model. A field
this server does not know is refused with a 400 naming it, as OpenAI does, and
OpenAI fields that would change the answer's shape are accepted only at their
"off" value: refusing beats silently ignoring them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from bastion_common.errors import InvalidRequestError
from bastion_common.messages import ChatMessage, MaxTokens, SamplingParams

MAX_MESSAGES = 1024
MAX_NAME_CHARS = 256
M = TypeVar("M", bound=BaseModel)
_SAMPLING_FIELDS = frozenset(SamplingParams.model_fields)


def _must_be_off(value: Any) -> Any:
    if value not in (None, False, 0, "", [], {}):
        raise PydanticCustomError(
            "unsupported_parameter", "this server does not support this parameter"
        )
    return value


# An OpenAI parameter Bastion does not implement: accepted only when absent,
# null, false, zero or empty, so that clients sending the default still work.
Unsupported = Annotated[
    Any,
    AfterValidator(_must_be_off),
    Field(description="Not supported: only null, false, 0 or empty is accepted."),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Common(SamplingParams):
    """The fields every generation endpoint shares: the sampling parameters
    (their bounds as the worker checks them) and OpenAI's envelope."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: Unsupported = None
    functions: Unsupported = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Unsupported = None
    logprobs: Unsupported = None
    top_logprobs: Unsupported = None
    logit_bias: Unsupported = None
    store: Unsupported = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def flat(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return ChatMessage(role=self.role, content=text)


class ChatBody(_Common):
    messages: list[InMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None


class CompletionBody(_Common):
    prompt: str | list[str]
    # Return the prompt before the completion, through the same output filter.
    echo: bool = False
    suffix: Unsupported = None
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return value


class GenerateBody(SamplingParams):
    """``/generate``: a prompt and the sampling fields, flat."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    prompt: str
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)


@dataclass(frozen=True, slots=True)
class Job:
    endpoint: Literal["chat", "completion", "generate"]
    model: str | None
    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    echo: bool = False


def validate_body(model: type[M], raw: bytes | str) -> M:
    """``raw`` (JSON) as ``model``, or an :class:`InvalidRequestError` naming the
    first bad field. pydantic's JSON parser refuses what Python's ``json`` lets
    through to fail later: lone surrogates, nesting past a depth limit, and
    integers too long to convert."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors(include_url=False)[0]
    kind = first["type"]
    if kind in ("json_invalid", "json_type", "model_type", "model_attributes_type"):
        message = "We could not parse the JSON body of your request"
        if kind == "json_invalid":
            message += f": {first['msg'].removeprefix('Invalid JSON: ')}"
        return InvalidRequestError(f"{message}. It must be one JSON object.", code="invalid_json")
    param = ".".join(str(p) for p in first["loc"]) or None
    if kind == "extra_forbidden":
        return InvalidRequestError(
            f"Unrecognized request argument supplied: {param}.",
            param=param,
            code="unsupported_parameter",
        )
    if kind == "unsupported_parameter":
        return InvalidRequestError(
            f"The parameter '{param}' is not supported by this server.",
            param=param,
            code="unsupported_parameter",
        )
    return InvalidRequestError(
        f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value"
    )


def _sampling(body: SamplingParams, max_tokens: int | None) -> SamplingParams:
    """A body's sampling fields, validated by the body's own declaration of
    them, as the message the worker reads."""
    values = {name: getattr(body, name) for name in _SAMPLING_FIELDS}
    return SamplingParams.model_construct(**{**values, "max_tokens": max_tokens})


def _include_usage(options: StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


def chat_job(raw: bytes | str) -> Job:
    req = validate_body(ChatBody, raw)
    return Job(
        endpoint="chat",
        model=req.model,
        params=_sampling(req, req.max_completion_tokens or req.max_tokens),
        messages=tuple(m.flat() for m in req.messages),
        stream=req.stream,
        include_usage=_include_usage(req.stream_options),
        user=req.user,
    )


def completion_job(raw: bytes | str) -> Job:
    req = validate_body(CompletionBody, raw)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return Job(
        endpoint="completion",
        model=req.model,
        params=_sampling(req, req.max_tokens),
        prompt=prompt,
        stream=req.stream,
        include_usage=_include_usage(req.stream_options),
        user=req.user,
        echo=req.echo,
    )


def generate_job(raw: bytes | str) -> Job:
    req = validate_body(GenerateBody, raw)
    params = _sampling(req, req.max_tokens)
    return Job(endpoint="generate", model=req.model, params=params, prompt=req.prompt)
