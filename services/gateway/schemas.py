"""Parsing and validating request bodies into one normalised :class:`Job`.

Field names and semantics follow OpenAI's API; what Bastion does not support
is refused with a clear 400 rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bastion_common.errors import InvalidRequestError
from bastion_common.messages import ChatMessage, SamplingParams

MAX_STOP_STRINGS = 4
M = TypeVar("M", bound=BaseModel)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: generate max_tokens tokens whatever the model says (benchmarks).
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        return value

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(stop),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class InMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def flat(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return ChatMessage(role=self.role, content=text)


class ChatBody(_Common):
    messages: list[InMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Common):
    prompt: str | list[str]
    # Return the prompt before the completion, through the same output filter.
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return value


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = Field(None, min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = None


# Parameters that change the answer's shape; refusing beats quietly ignoring them.
UNSUPPORTED = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "suffix", "best_of")


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


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def _validate(model: type[M], body: dict[str, Any]) -> M:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], 0):
            raise InvalidRequestError(
                f"The parameter '{name}' is not supported by this server.",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequestError(
            f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value"
        ) from exc


def chat_job(body: dict[str, Any]) -> Job:
    req = _validate(ChatBody, body)
    return Job(
        endpoint="chat",
        model=req.model,
        params=req.sampling(req.max_completion_tokens or req.max_tokens),
        messages=tuple(m.flat() for m in req.messages),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user,
    )


def completion_job(body: dict[str, Any]) -> Job:
    req = _validate(CompletionBody, body)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return Job(
        endpoint="completion",
        model=req.model,
        params=req.sampling(req.max_tokens),
        prompt=prompt,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user,
        echo=req.echo,
    )


def generate_job(body: dict[str, Any]) -> Job:
    req = _validate(GenerateBody, body)
    params = SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=tuple(req.stop),
        seed=req.seed,
    )
    return Job(endpoint="generate", model=req.model, params=params, prompt=req.prompt)
