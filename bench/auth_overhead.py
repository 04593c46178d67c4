"""What authentication and rate limiting add to each request.

Runs the real gateway in-process on a free port against the real Redis (or an
embedded Valkey) and measures, in one run:
- HTTP round trips: a public route (the baseline) against the same kind of
  cheap route behind each credential type;
- the pieces in isolation: JWT verification per algorithm, API-key lookup,
  and the rate limiter's admit + release (two Lua calls on Redis).

Absolute times on a shared machine are noisy; compare against the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bastion_cli.stack import embedded_valkey, free_port, redis_answers
from bastion_common.jwtauth import BoundKey, JwtVerifier, KeyRing
from bastion_common.keys import Keys
from bastion_common.policy import Policy
from bastion_common.tokens import Principal, mint
from bastion_gateway import keys as app_keys
from bastion_gateway.app import create_app
from bastion_gateway.limits import RateLimiter
from bastion_gateway.settings import GatewaySettings
from bench.report import p50_p99_ms, publish

SECRET = "bench-" + "s" * 42
N_HTTP = 2000
N_UNIT = 3000


async def _time(n: int, call: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    for _ in range(min(200, n // 10)):  # warm-up
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return p50_p99_ms(samples)


async def _http_rows(redis_url: str, prefix: str) -> list[tuple[str, float, float]]:
    settings = GatewaySettings(
        redis_url=redis_url, key_prefix=prefix, jwt_secret=SECRET, jwt_local_key=True,
        insecure_http=True,
        port=free_port(),
    )  # fmt: skip
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    base = f"http://127.0.0.1:{settings.port}"
    token = mint(SECRET, subject="bench", role="user", tenant="t", issuer="bastion")
    api_key, _ = await app[app_keys.API_KEYS].create(name="bench", tenant="t", role="user")
    rows = []
    try:
        async with aiohttp.ClientSession() as http:

            def get(path: str, credential: str | None) -> Callable[[], Awaitable[object]]:
                headers = {"Authorization": f"Bearer {credential}"} if credential else {}

                async def call() -> object:
                    async with http.get(base + path, headers=headers) as reply:
                        assert reply.status == 200, await reply.text()
                        return await reply.read()

                return call

            rows.append(
                ("HTTP /healthz, no auth (baseline)", *await _time(N_HTTP, get("/healthz", None)))
            )
            rows.append(
                ("HTTP /v1/models, HS256 JWT", *await _time(N_HTTP, get("/v1/models", token)))
            )
            rows.append(
                ("HTTP /v1/models, API key", *await _time(N_HTTP, get("/v1/models", api_key)))
            )
    finally:
        await runner.cleanup()
    return rows


def _ring(alg: str, key: object) -> KeyRing:
    """A key ring holding one key under kid "k" (as a key file would give)."""
    ring = KeyRing()
    ring._static["k"] = BoundKey("k", alg, key)
    return ring


async def _unit_rows(redis_url: str, prefix: str) -> list[tuple[str, float, float]]:
    import redis.asyncio as aioredis

    from bastion_gateway.apikeys import ApiKeyStore

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    claims = {"sub": "bench", "iss": "bastion", "exp": int(time.time()) + 3600}
    rows = []
    for alg, signing, verifying in (
        ("HS256", SECRET, SECRET),
        ("RS256", rsa_key, rsa_key.public_key()),
        ("ES256", ec_key, ec_key.public_key()),
    ):
        verifier = JwtVerifier(_ring(alg, verifying), issuer="bastion")
        token = jwt.encode(claims, signing, algorithm=alg, headers={"kid": "k"})
        rows.append(
            (f"JWT verify {alg}", *await _time(N_UNIT, lambda v=verifier, t=token: v.verify(t)))
        )
    redis = aioredis.from_url(redis_url, decode_responses=True)
    try:
        store = ApiKeyStore(redis, Keys(prefix))
        key, _ = await store.create(name="bench", tenant="t", role="user")
        rows.append(
            ("API key verify (one Redis GET)", *await _time(N_UNIT, lambda: store.verify(key)))
        )
        # Every limit active (so every check runs) but too high to trip here.
        high = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12,
                "concurrent_requests": 10**6, "daily_tokens": 10**15}  # fmt: skip
        policy = Policy.parse({"limits": {"principal": high, "tenant": high}})
        limiter = RateLimiter(redis, Keys(prefix), policy)
        principal = Principal(subject="bench", role="user", tenant="t")

        admit_times: list[float] = []

        async def admit_release() -> None:
            start = time.perf_counter()
            admission = await limiter.admit(principal, uuid.uuid4().hex, 10)
            admit_times.append(time.perf_counter() - start)
            await limiter.release(principal, admission, 5)

        both = await _time(N_UNIT, admit_release)
        rows.append(("Rate limits: admit (1 Lua call)", *p50_p99_ms(admit_times)))
        rows.append(("Rate limits: admit + release (2 Lua calls)", *both))
    finally:
        await redis.aclose()
    return rows


async def _cleanup(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.from_url(redis_url)
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        await redis.delete(key)
    await redis.aclose()


async def _run(redis_url: str) -> str:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        http = await _http_rows(redis_url, prefix)
        units = await _unit_rows(redis_url, prefix)
    finally:
        await _cleanup(redis_url, prefix)
    base = http[0][1]
    lines = [
        "| measurement | p50 ms | p99 ms | p50 vs baseline |",
        "|---|---:|---:|---:|",
    ]
    for name, p50, p99 in http:
        lines.append(
            f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f}x (+{p50 - base:.3f} ms) |"
        )
    for name, p50, p99 in units:
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | |")
    auth = http[1][1] - base
    admit, both = units[-2][1], units[-1][1]
    lines += [
        "",
        f"Before generation starts (JWT auth + admission): {auth + admit:.3f} ms p50.",
        f"In all, release at the end included: {auth + both:.3f} ms p50 (target < 1 ms).",
    ]
    return "\n".join(lines)


def main() -> int:
    url = "redis://127.0.0.1:6379/0"
    with contextlib.ExitStack() as stack:
        if not redis_answers(url):
            url = stack.enter_context(embedded_valkey(Path("var") / "bench-valkey"))
        table = asyncio.run(_run(url))
    setting = f"{N_HTTP} HTTP requests / {N_UNIT} calls each, keep-alive, one client."
    publish("auth_overhead.md", "Auth and rate-limit overhead", setting, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
