import hashlib
import time

import jwt
import pytest

from bastion_common.errors import AuthenticationError, NotFoundError, RateLimitError, from_name
from bastion_common.hashing import input_hash
from bastion_common.jwtauth import JwtVerifier, KeyRing
from bastion_common.messages import ChatMessage
from bastion_common.tokens import load_or_create_key, mint

KEY = "k" * 48


def test_error_body_is_openai_shaped():
    body = NotFoundError("no such model", param="model", code="model_not_found").body()
    assert body == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_rate_limit_carries_retry_after():
    assert RateLimitError("slow down", retry_after_s=7).headers() == {"Retry-After": "7"}


def test_errors_cross_the_queue_by_name():
    exc = from_name("NotFoundError", "gone", "x")
    assert isinstance(exc, NotFoundError) and exc.code == "x"
    assert from_name("SomethingElse", "boom").status == 500


def _verifier():
    return JwtVerifier(KeyRing(local_secret=KEY), issuer="bastion")


async def test_token_round_trip():
    token = mint(KEY, subject="alice", role="user", tenant="bank", issuer="bastion")
    principal = await _verifier().verify(token)
    assert (principal.subject, principal.role, principal.tenant) == ("alice", "user", "bank")


@pytest.mark.parametrize(
    "token",
    [
        mint(KEY, subject="a", role="user", tenant="t", issuer="bastion", ttl_s=-60),
        mint("x" * 48, subject="a", role="user", tenant="t", issuer="bastion"),
        mint(KEY, subject="a", role="user", tenant="t", issuer="someone-else"),
        jwt.encode({"sub": "a", "iss": "bastion", "exp": time.time() + 60}, None, algorithm="none"),
        jwt.encode({"iss": "bastion", "exp": time.time() + 60}, KEY, algorithm="HS256"),
        "not.a.token",
    ],
    ids=["expired", "wrong-key", "wrong-issuer", "alg-none", "no-sub", "garbage"],
)
async def test_bad_tokens_are_refused(token):
    with pytest.raises(AuthenticationError):
        await _verifier().verify(token)


def test_signing_key_is_created_once_with_private_mode(tmp_path):
    path = tmp_path / "keys" / "k"
    first = load_or_create_key(path)
    assert load_or_create_key(path) == first and len(first) >= 48
    assert path.stat().st_mode & 0o777 == 0o600


def test_input_hash_is_documented_sha256():
    assert input_hash("héllo", None) == hashlib.sha256("héllo".encode()).hexdigest()
    msgs = (ChatMessage(role="user", content="你好"),)
    expected = hashlib.sha256('[{"role":"user","content":"你好"}]'.encode()).hexdigest()
    assert input_hash(None, msgs) == expected
