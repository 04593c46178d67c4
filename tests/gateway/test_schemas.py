import pytest

from bastion_common.errors import InvalidRequestError
from bastion_gateway.schemas import chat_job, completion_job, generate_job, parse_json


def test_chat_body_normalises():
    job = chat_job(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_completion_tokens": 5,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert [m.content for m in job.messages] == ["be brief", "hi there"]
    assert job.params.max_tokens == 5 and job.params.stop == ("END",)
    assert job.stream and job.include_usage


def test_completion_accepts_a_one_element_prompt_list():
    assert completion_job({"model": "m", "prompt": ["x"]}).prompt == "x"


def test_generate_needs_only_a_prompt():
    job = generate_job({"prompt": "p", "max_tokens": 3})
    assert job.model is None and job.params.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "max_tokens",
        ),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            "temperature",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ],
)
def test_bad_chat_bodies_name_the_parameter(body, param):
    with pytest.raises(InvalidRequestError) as info:
        chat_job(body)
    assert info.value.param == param


def test_several_prompts_are_refused():
    with pytest.raises(InvalidRequestError) as info:
        completion_job({"model": "m", "prompt": ["a", "b"]})
    assert info.value.param == "prompt"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_body_must_be_a_json_object(raw):
    with pytest.raises(InvalidRequestError) as info:
        parse_json(raw)
    assert info.value.code == "invalid_json"
