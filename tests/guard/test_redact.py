from bastion_guard.redact import StreamRedactor, redact


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
