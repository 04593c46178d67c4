"""Requests built to break the platform, each sent beside an ordinary one: the
hostile request gets a 4xx or a clean answer, the ordinary one its 200 in
good time, no process exits and the platform stays ready. Each case once
crashed a process, failed other requests or stalled the platform."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import requests

from bastion_cli.stack import free_port
from tests.e2e.conftest import Platform

ORDINARY_WITHIN_S = 30.0  # far past an answer's time here, far below the 60 s deadline
LONG_MODEL = "tiny-llama-16k"


@pytest.fixture(scope="module")
def roomy(platform: Platform, tiny_long_model_path):
    """A gateway taking 1 MiB bodies (the platform's takes 64 KB), and a worker
    serving the tiny model with a 16,384-token context, on the same platform."""
    port = free_port()
    platform.stack.start_one(
        "gateway-roomy",
        {"BASTION_PORT": str(port), "BASTION_MAX_BODY_BYTES": str(1 << 20)},
        module="gateway",
    )
    platform.stack.start_one(
        "worker-long",
        {"BASTION_MODEL_PATH": str(tiny_long_model_path), "BASTION_WORKER_ID": "worker-long"},
        module="worker",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        platform.stack.wait_ready(120, base_url=url)
        _wait_for_model(platform, url, LONG_MODEL)
        yield url
    finally:
        platform.stack.stop_one("worker-long")
        platform.stack.stop_one("gateway-roomy")


def _wait_for_model(platform: Platform, url: str, model: str, timeout_s: float = 120.0) -> None:
    headers = {"Authorization": f"Bearer {platform.token()}"}
    deadline = time.monotonic() + timeout_s
    while True:
        platform.stack.check_alive()
        with requests.get(f"{url}/v1/models", headers=headers, timeout=10) as reply:
            if model in {m["id"] for m in reply.json()["data"]}:
                return
        assert time.monotonic() < deadline, f"no worker serves {model}"
        time.sleep(0.2)


def _chat(model: str, text: str = "Hello", **extra):
    return {
        "model": model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def _cases(platform: Platform):
    """(path, hostile body, statuses it may get) for each case."""
    long_prompt = " ".join(  # about 8,000 tokens of the tiny tokenizer
        ["The gateway checks every request before it reaches a model."] * 335
    )
    return {
        "seed of 2^64": ("/v1/chat/completions", _chat(platform.model, seed=2**64), {400}),
        "temperature 1e-300": (
            "/v1/chat/completions",
            _chat(platform.model, temperature=1e-300, repetition_penalty=0.01),
            {200},
        ),
        "repetition_penalty 1e-300": (
            "/v1/chat/completions",
            _chat(platform.model, repetition_penalty=1e-300),
            {400},
        ),
        # Longer than either model's context once tokenised, but the guard's
        # output filter takes the echo first.
        "65,000-character echoed word": (
            "/v1/completions",
            {"model": LONG_MODEL, "prompt": "a" * 65_000, "echo": True, "max_tokens": 4},
            {200, 400},
        ),
        "100 KB of brackets": ("/v1/chat/completions", _chat(platform.model, "[" * 100_000), {400}),
        "8,000-token prompt": (
            "/v1/chat/completions",
            _chat(LONG_MODEL, long_prompt, max_tokens=4),
            {200},
        ),
    }


async def _post(http, url, path, body, token):
    started = time.monotonic()
    async with http.post(
        f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as reply:
        payload = await reply.json(content_type=None)
        return reply.status, payload, time.monotonic() - started


@pytest.mark.parametrize(
    "case",
    [
        "seed of 2^64",
        "temperature 1e-300",
        "repetition_penalty 1e-300",
        "65,000-character echoed word",
        "100 KB of brackets",
        "8,000-token prompt",
    ],
)
async def test_a_hostile_request_hurts_nobody(platform: Platform, roomy: str, case: str):
    path, body, allowed = _cases(platform)[case]
    ordinary = _chat(body["model"], "Say something about gateways.", max_tokens=16)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        (status, payload, _), (ok, answer, took) = await asyncio.gather(
            _post(http, roomy, path, body, platform.token()),
            _post(http, roomy, "/v1/chat/completions", ordinary, platform.token()),
        )
        assert status in allowed, payload
        if status >= 400:
            assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert ok == 200 and answer["usage"]["completion_tokens"] > 0, answer
        assert took < ORDINARY_WITHIN_S
        platform.stack.check_alive()
        async with http.get(f"{roomy}/readyz") as ready:
            assert ready.status == 200, await ready.text()


async def test_an_echoed_word_past_the_hold_back_is_redacted_not_streamed(platform, roomy):
    body = {"model": LONG_MODEL, "prompt": "Zq9" * 3000, "echo": True, "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        status, payload, _ = await _post(http, roomy, "/v1/completions", body, platform.token())
    assert status == 200, payload
    text = payload["choices"][0]["text"]
    assert text.startswith("[LONG_TOKEN]") and "Zq9Zq9" not in text
