"""The official openai client against the running platform."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests.e2e.conftest import Platform


@pytest.fixture(scope="module")
def client(platform: Platform) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{platform.url}/v1", api_key=platform.token(), max_retries=0
    ) as client:
        yield client


def test_model_list(client, platform):
    ids = [m.id for m in client.models.list().data]
    assert platform.model in ids


def test_chat_completion_with_usage(client, platform):
    reply = client.chat.completions.create(
        model=platform.model,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=7,
        temperature=0,
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_streamed_chat_arrives_incrementally_and_ends_once(client, platform):
    arrivals, texts, finishes, usage = [], [], [], None
    stream = client.chat.completions.create(
        model=platform.model,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=120,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["length"]
    assert usage is not None and usage.completion_tokens == 120
    assert len(texts) > 10
    # Chunks were sent as they were generated, not all at once at the end.
    assert arrivals[-1] - arrivals[1] > 0.02
    whole = client.chat.completions.create(
        model=platform.model,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=120,
        temperature=0,
    )
    assert "".join(texts) == whole.choices[0].message.content


def test_completion(client, platform):
    reply = client.completions.create(
        model=platform.model, prompt="Once upon", max_tokens=5, temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_streamed_completion(client, platform):
    chunks = list(
        client.completions.create(
            model=platform.model, prompt="Once", max_tokens=6, stream=True, temperature=0
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in chunks)


def test_seed_reproduces(client, platform):
    def ask():
        return (
            client.completions.create(
                model=platform.model, prompt="Seeded", max_tokens=12, temperature=1.0, seed=1234
            )
            .choices[0]
            .text
        )

    assert ask() == ask()


def test_stop_string(client, platform):
    free = client.completions.create(
        model=platform.model, prompt="Stop test", max_tokens=16, temperature=0
    ).choices[0]
    stop = free.text[4:6]
    assert stop.strip()
    cut = client.completions.create(
        model=platform.model, prompt="Stop test", max_tokens=16, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]


async def test_generate_endpoint(platform):
    async with aiohttp.ClientSession(headers=_auth(platform)) as http:
        async with http.post(
            f"{platform.url}/generate", json={"prompt": "Hi", "max_tokens": 4}
        ) as r:
            assert r.status == 200
            body = await r.json()
    assert set(body) == {"generated_text"} and isinstance(body["generated_text"], str)


async def test_chinese_prompt_streams_valid_utf8(platform):
    """Raw bytes: every SSE event must be whole UTF-8 and valid JSON."""
    body = {
        "model": platform.model,
        "messages": [{"role": "user", "content": "你好，世界！请用中文讲一个故事 🙂"}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
    }
    events, buffer = [], b""
    async with aiohttp.ClientSession(headers=_auth(platform)) as http:
        async with http.post(f"{platform.url}/v1/chat/completions", json=body) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            async for raw in reply.content.iter_any():
                buffer += raw
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    events.append(event.decode("utf-8"))  # strict: raises on a broken character
    assert buffer == b""
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(p["choices"][0]["delta"].get("content") is not None for p in payloads) > 5


def _auth(platform: Platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.token()}"}
