"""Fuzzing the live platform from its own OpenAPI document: Schemathesis
generates bodies that fit each operation's schema and bodies that break it,
and every answer must be a clean one (no 5xx but a 503 for a model nobody
serves, no dropped connection, errors in OpenAI's shape), with every process
still up and the platform ready afterwards. ``BASTION_FUZZ_EXAMPLES`` sets the
examples per operation and mode (``make bench`` runs many more)."""

from __future__ import annotations

import collections
import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "12"))
TIMEOUT_S = 120
# Statuses the fuzz saw, by operation: printed by the bench run.
SEEN: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def _document(platform, token):
    reply = requests.get(
        f"{platform.url}/openapi.json", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert reply.status_code == 200
    return reply.json()


def test_the_document_needs_a_credential(platform):
    assert requests.get(f"{platform.url}/openapi.json", timeout=30).status_code == 401


def test_the_document_describes_what_the_handlers_validate(platform):
    doc = _document(platform, platform.token())
    assert doc["openapi"].startswith("3.1")
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = chat["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    body = doc["components"]["schemas"][ref]
    assert body["additionalProperties"] is False
    assert body["properties"]["temperature"]["maximum"] == 2.0
    assert body["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1


def _operations(platform):
    schema = schemathesis.openapi.from_dict(_document(platform, platform.token(role="admin")))
    return [result.ok() for result in schema.get_all_operations()]


def _clean(case, response) -> None:
    label = case.operation.label
    SEEN[label][response.status_code] += 1
    if response.status_code >= 500:
        body = response.json()
        assert response.status_code == 503 and body["error"]["code"] == "no_worker", (
            f"{label} answered {response.status_code}: {response.text[:300]}"
        )
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text[:300]
        assert "Traceback" not in error["message"]


def _fuzz(operation, mode, base_url, http, headers, model) -> None:
    """Up to EXAMPLES generated requests to one operation, each answered
    cleanly. Valid bodies name the served ``model``, so that they reach the
    worker instead of stopping at a 404."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def run(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        response = case.call(base_url=base_url, session=http, headers=headers, timeout=TIMEOUT_S)
        _clean(case, response)

    try:
        run()
    except Unsatisfiable:  # negative mode: the operation takes no input to break
        assert mode is GenerationMode.NEGATIVE


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_generated_request_hurts_the_platform(platform, mode):
    user = {"Authorization": f"Bearer {platform.token()}"}
    admin = {"Authorization": f"Bearer {platform.token(role='admin')}"}
    http = requests.Session()
    for operation in _operations(platform):
        headers = admin if operation.path.startswith("/v1/admin") else user
        _fuzz(operation, mode, platform.url, http, headers, platform.model)
    platform.stack.check_alive()
    ready = http.get(f"{platform.url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
