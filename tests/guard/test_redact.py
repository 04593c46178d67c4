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
