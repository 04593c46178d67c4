import json

import pytest
from pydantic import ValidationError

from bastion_common.messages import FIELD, AuditEvent, ResultRecord


def test_readers_ignore_unknown_fields():
    raw = {FIELD: json.dumps({"v": 2, "kind": "token", "text": "hi", "future_field": [1, 2]})}
    record = ResultRecord.load(raw)
    assert record.text == "hi" and not record.final


def test_round_trip_is_json_not_pickle():
    record = ResultRecord(kind="done", finish_reason="length", prompt_tokens=3, completion_tokens=4)
    fields = record.dump()
    assert json.loads(fields[FIELD])["finish_reason"] == "length"
    assert ResultRecord.load(fields) == record and record.final


def test_audit_event_requires_a_sha256_hex_hash():
    with pytest.raises(ValidationError):
        AuditEvent(
            id="x",
            timestamp=0,
            user_id="u",
            tenant="t",
            role="user",
            model="m",
            endpoint="chat",
            input_hash="not-a-hash",
            output_length=0,
            prompt_tokens=0,
            completion_tokens=0,
            processing_time=0,
            status="ok",
        )
