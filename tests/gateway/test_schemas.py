import json

import pytest

from bastion_common.errors import InvalidRequestError
from bastion_common.messages import MAX_STOP_CHARS, SamplingParams
from bastion_gateway.schemas import chat_job, completion_job, generate_job

MESSAGES = [{"role": "user", "content": "x"}]


def _chat(**fields):
    return json.dumps({"model": "m", "messages": MESSAGES, **fields})


def test_chat_body_normalises():
    job = chat_job(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi "},
                            {"type": "text", "text": "there"},
                        ],
                    },
                ],
                "max_completion_tokens": 5,
                "stop": "END",
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    )
    assert [m.content for m in job.messages] == ["be brief", "hi there"]
    assert job.params.max_tokens == 5 and job.params.stop == ("END",)
    assert job.stream and job.include_usage
    assert type(job.params) is SamplingParams


def test_completion_accepts_a_one_element_prompt_list():
    assert completion_job(json.dumps({"model": "m", "prompt": ["x"]})).prompt == "x"


def test_generate_needs_only_a_prompt():
    job = generate_job(json.dumps({"prompt": "p", "max_tokens": 3}))
    assert job.model is None and job.params.max_tokens == 3


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"temperature": 1e-300},  # valid for OpenAI; the sampler keeps it finite
        {"top_p": 1e-9},
        {"top_k": -1},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"repetition_penalty": 0.01},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": None},
        {"stop": "x" * MAX_STOP_CHARS},
        {"tools": [], "tool_choice": "none", "logprobs": False, "logit_bias": {}},
        {"response_format": {"type": "text"}},
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(fields):
    chat_job(_chat(**fields))


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 2}, "n", "invalid_value"),
        ({"max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"max_tokens": 2**64}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"temperature": 9}, "temperature", "invalid_value"),
        ({"temperature": -1e-9}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"top_k": -2}, "top_k", "invalid_value"),
        ({"top_k": 2**40}, "top_k", "invalid_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"repetition_penalty": 100}, "repetition_penalty", "invalid_value"),
        ({"seed": 2**64}, "seed", "invalid_value"),
        ({"seed": -(2**63) - 1}, "seed", "invalid_value"),
        ({"stop": ["a"] * 5}, "stop", "invalid_value"),
        ({"stop": [""]}, "stop.0", "invalid_value"),
        ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop.0", "invalid_value"),
        ({"stop": [1]}, "stop.0", "invalid_value"),
        ({"tools": [{}]}, "tools", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format.type", "invalid_value"),
        ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
        ({"frobnicate": 1}, "frobnicate", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", None),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name",
            "unsupported_parameter",
        ),
        ({"model": ""}, "model", "invalid_value"),
        ({"model": None}, "model", "invalid_value"),
        ({"user": "u" * 257}, "user", "invalid_value"),
    ],
)
def test_bad_chat_bodies_name_the_parameter(fields, param, code):
    with pytest.raises(InvalidRequestError) as info:
        chat_job(_chat(**fields))
    assert info.value.param == param
    if code is not None:
        assert info.value.code == code
    assert info.value.status == 400


def test_a_missing_model_is_named():
    with pytest.raises(InvalidRequestError) as info:
        chat_job(json.dumps({"messages": MESSAGES}))
    assert info.value.param == "model"


def test_several_prompts_are_refused():
    with pytest.raises(InvalidRequestError) as info:
        completion_job(json.dumps({"model": "m", "prompt": ["a", "b"]}))
    assert info.value.param == "prompt"


def test_generate_takes_the_same_bounds():
    with pytest.raises(InvalidRequestError) as info:
        generate_job(json.dumps({"prompt": "p", "seed": 2**64}))
    assert info.value.param == "seed"


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        b"",
        b'"text"',
        b"null",
        # Python's json lets these through to fail later, as a 500.
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"model": "m", "messages": [], "seed": ' + b"9" * 5000 + b"}",
    ],
    ids=[
        "syntax",
        "array",
        "bytes",
        "empty",
        "string",
        "null",
        "lone-surrogate",
        "deep-nesting",
        "huge-int",
    ],
)
def test_body_must_be_a_json_object(raw):
    with pytest.raises(InvalidRequestError) as info:
        chat_job(raw)
    assert info.value.code == "invalid_json"
