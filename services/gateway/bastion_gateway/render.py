"""OpenAI's response shapes, for whole responses and for SSE chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from bastion_gateway.schemas import Job
from bastion_gateway.service import Finish


def usage(finish: Finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass
class Renderer:
    """Shapes one job's output; ids and timestamps are fixed per response."""

    job: Job
    model: str
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        # The id names the request, so the audit row is found from the response.
        prefix = "chatcmpl" if self.job.endpoint == "chat" else "cmpl"
        self.id = f"{prefix}-{self.request_id}"

    @property
    def _chat(self) -> bool:
        return self.job.endpoint == "chat"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        if self.job.endpoint == "generate":
            return {"generated_text": text}
        if self._chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice, obj = {"text": text}, "text_completion"
        choice.update(index=0, finish_reason=finish.reason, logprobs=None)
        body = self._envelope(obj, [choice])
        body["usage"] = usage(finish)
        return body

    def chunk(
        self, text: str | None = None, finish: str | None = None, first: bool = False
    ) -> bytes:
        if self._chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice, obj = {"index": 0, "text": text or ""}, "text_completion"
        choice.update(finish_reason=finish, logprobs=None)
        body = self._envelope(obj, [choice])
        if self.job.include_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, finish: Finish) -> bytes:
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = usage(finish)
        return sse(body)
