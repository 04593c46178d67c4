"""PII and secret recognisers: positives, hard negatives, Chinese context."""

import pytest

from bastion_guard.entities import find_entities


def _found(text):
    return [(e.type, text[e.start : e.end]) for e in find_entities(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mail First.Last@CORP.COM today", [("EMAIL", "First.Last@CORP.COM")]),
        ("联系电话13812345678，谢谢", [("PHONE", "13812345678")]),
        ("call (+86) 138-1234-5678 or +44 20 7946 0958", [("PHONE", "(+86) 138-1234-5678"), ("PHONE", "+44 20 7946 0958")]),
        ("office 010-6234 5678", [("PHONE", "010-6234 5678")]),
        ("US desk 1 (415) 555-0132", [("PHONE", "1 (415) 555-0132")]),
        ("身份证号11010519491231002X。", [("CN_ID", "11010519491231002X")]),
        ("card 4111 1111 1111 1111 expires", [("CREDIT_CARD", "4111 1111 1111 1111")]),
        ("amex 3782-822463-10005", [("CREDIT_CARD", "3782-822463-10005")]),
        ("IBAN: DE89 3704 0044 0532 0130 00.", [("IBAN", "DE89 3704 0044 0532 0130 00")]),
        ("hosts 10.0.0.1:8080 and [2001:db8::1]:443", [("IP_ADDRESS", "10.0.0.1"), ("IP_ADDRESS", "2001:db8::1")]),
        ("mapped ::ffff:198.51.100.7 here", [("IP_ADDRESS", "::ffff:198.51.100.7")]),
        ("SSN 123-45-6789 or ssn 123456789", [("US_SSN", "123-45-6789"), ("US_SSN", "123456789")]),
        ("key AKIAABCDEFGHIJKLMNOP in config", [("SECRET", "AKIAABCDEFGHIJKLMNOP")]),
        # every kind of token, each alone (the cheap prefix check must let each through)
        ("token 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 rejected", [("SECRET", "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")]),
        ("use ghp_aaaaaaaaaaBBBBBBBBBB1234567890abcdef here", [("SECRET", "ghp_aaaaaaaaaaBBBBBBBBBB1234567890abcdef")]),
        ("OPENAI_KEY is sk-QQQQQQQQQQQQQQQQrrrrrrrrrrrrrrrr ok", [("SECRET", "sk-QQQQQQQQQQQQQQQQrrrrrrrrrrrrrrrr")]),
        ("bot xoxb-1234-5678-AbCdEf9 posted", [("SECRET", "xoxb-1234-5678-AbCdEf9")]),
        ("maps AIzaSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSS key", [("SECRET", "AIzaSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSS")]),
        ("redis://:s3cr3t-Pass@cache:6379/0", [("SECRET", "s3cr3t-Pass")]),
        ("Server=db;User Id=sa;Password=Tr0ub4dor&3;", [("SECRET", "Tr0ub4dor&3")]),
    ],
)  # fmt: skip
def test_recognised(text, expected):
    assert _found(text) == expected


def test_pem_block_is_one_entity_even_with_escaped_newlines():
    block = (
        "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\n-----END PRIVATE KEY-----"
    )
    assert _found(f'{{"private_key": "{block}"}}') == [("SECRET", block)]


def test_jwt_is_jwt_not_secret_and_needs_alg():
    token = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.abcdefghijklmnopqrstuvwxyz012345678"
    )
    assert _found(f"Bearer {token}") == [("JWT", token)]
    no_alg = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.abcdefgh"  # header {"typ":"JWT"}
    assert _found(no_alg) == []


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "order 110105194912310021 has a bad check digit",
        "birth date 11010519491331002X is impossible",
        "build 10.0.19045.3693 and OID 1.3.6.1.4.1.311, not 999.1.2.3",
        "version v1.2.3 at 12:30:45, MAC 00:1a:2b:3c:4d:5e",
        "EIN 12-3456789, SSN 666-12-3456 and 000-12-3456 are invalid",
        "IBAN DE89 3704 0044 0532 0130 01 fails mod-97",
        "use sk-... or ${DB_PASSWORD} or postgres://app:${DB_PASSWORD}@db/app",
        "commit 3f2a9c1e4b5d6f7a8b9c0d1e2f3a4b5c6d7e8f90 and uuid 123e4567-e89b-12d3-a456-426614174000",
        "金额 12345678 元，订单号 202405061234567890",
        "user@<your-domain> and @mention and a regex [a-z]+@[a-z]+\\.com",
        "ext. 4471 or local 555-0132",
    ],
)
def test_hard_negatives(text):
    assert _found(text) == []
