from bastion_guard.redact import Redactor, StreamRedactor, redact


def test_redacts_email_and_keys():
    text, found = redact("mail jane.doe@bank.example.com key AKIAABCDEFGHIJKLMNOP ok")
    assert text == "mail [EMAIL] key [SECRET] ok"
    assert found == {"EMAIL": 1, "SECRET": 1}


def _stream(chunks):
    redactor = StreamRedactor()
    out = [redactor.feed(c) for c in chunks[:-1]] + [redactor.feed(chunks[-1], final=True)]
    return out


def test_entity_split_across_chunks_is_still_caught():
    out = _stream(["Write to jane", ".doe@bank.exa", "mple.com today", "."])
    assert "".join(out) == "Write to [EMAIL] today."
    assert "jane" not in "".join(out[:2])


def test_text_that_cannot_be_an_entity_is_released_at_once():
    out = _stream(["你好，世界。", "Hello there ", "end"])
    assert out[0] == "你好，世界。"
    assert out[1] == "Hello there "
    assert "".join(out) == "你好，世界。Hello there end"


def test_final_chunk_flushes_what_was_held():
    out = _stream(["token abc", ""])
    assert out == ["token ", "abc"]


def test_grouped_numbers_split_across_chunks_are_caught():
    out = _stream(["请拨打 138 ", "1234 56", "78 或发邮件", ""])
    assert "".join(out) == "请拨打 [PHONE] 或发邮件"
    assert not any("1234" in piece for piece in out)


def test_card_and_pem_block_across_many_chunks():
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----"
    text = f"card 4111 1111 1111 1111 and key\n{pem}\nbye"
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)] + [""]
    out = _stream(chunks)
    assert "".join(out) == "card [CREDIT_CARD] and key\n[SECRET]\nbye"
    assert not any("MIIE" in piece for piece in out)


def test_chinese_text_is_not_held_back():
    redactor = StreamRedactor()
    assert redactor.feed("今天的会议改到下午三点。") == "今天的会议改到下午三点。"


def test_redaction_styles():
    text = "mail ann@corp.example.com"
    assert redact(text, Redactor("mask"))[0] == "mail " + "*" * 20
    one = redact(text, Redactor("pseudonym", b"tenant-a"))[0]
    assert one == redact(text, Redactor("pseudonym", b"tenant-a"))[0]
    assert one != redact(text, Redactor("pseudonym", b"tenant-b"))[0]
    assert one.startswith("mail [EMAIL_")


def _jwt(payload_chars):
    import base64
    import json

    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'sub': 'x' * payload_chars})}.{'s' * 342}"


def _streamed(text, size, **kwargs):
    redactor = StreamRedactor(**kwargs)
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    out = [redactor.feed(c) for c in chunks] + [redactor.feed("", final=True)]
    return out, redactor.found


def test_a_jwt_longer_than_the_old_hold_back_is_held_until_it_ends():
    token = _jwt(2000)
    assert len(token) > 2500
    out, found = _streamed(f"your token: {token} keep it safe", 7)
    assert "".join(out) == "your token: [JWT] keep it safe"
    assert not any(token[:20] in piece or token[-20:] in piece for piece in out)
    assert found == {"JWT": 1}


def test_a_run_past_the_hold_back_is_redacted_whole_and_its_rest_dropped():
    secret = "Zq9" * 700  # 2,100 characters with no end in sight at 512
    out, found = _streamed(f"here: {secret} and then more text", 5, max_holdback=512)
    assert "".join(out) == "here: [LONG_TOKEN] and then more text"
    assert not any("Zq9" in piece for piece in out)
    assert found == {"LONG_TOKEN": 1}


def test_a_pem_block_open_past_its_bound_is_redacted_whole():
    from bastion_guard.entities import PEM_MAX

    body = ("MIIEpAIBAAKCAQEA" * 4 + "\n") * (PEM_MAX // 60)
    pem = f"-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----"
    out, found = _streamed(f"key:\n{pem}\nbye", 50)
    assert "".join(out) == "key:\n[SECRET]\nbye"
    assert not any("MIIE" in piece for piece in out)
    assert found == {"SECRET": 1}


def test_the_keep_style_reports_a_long_run_and_lets_it_through():
    secret = "Zq9" * 300
    out, found = _streamed(f"a {secret} b", 64, max_holdback=256, redactor=Redactor("keep"))
    assert "".join(out) == f"a {secret} b"
    assert found == {"LONG_TOKEN": 1}
