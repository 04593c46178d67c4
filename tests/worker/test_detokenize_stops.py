import pytest

from bastion_worker.engine.detokenize import REPLACEMENT, IncrementalDetokenizer
from bastion_worker.engine.stops import StopMatcher

TEXTS = ["你好，世界！今天天气很好。", "Emoji 🙂🚀 and café", "私有部署 private 部署 🔒 ok"]


class _DecodeOnly:
    """A tokenizer without a Rust backend: only ``decode`` (the window path)."""

    def __init__(self, tok):
        self.decode = tok.decode


@pytest.mark.parametrize("backend", [True, False], ids=["rust-stream", "python-windows"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_whole_characters_and_add_up(tiny_lm, text, backend):
    tok = tiny_lm.tokenizer
    prompt = tok("Q:")["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The byte-level tokeniser does split these characters over several tokens.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok if backend else _DecodeOnly(tok), prompt)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("backend", [True, False], ids=["rust-stream", "python-windows"])
def test_incomplete_character_at_the_end_is_flushed_as_replacement(tiny_lm, backend):
    tok = tiny_lm.tokenizer
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok if backend else _DecodeOnly(tok), [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert REPLACEMENT in detok.flush()
    assert detok.flush() == ""


def _byte_fallback_tokenizer():
    """A Rust tokenizer with Gemma's kind of byte-fallback tokens (``<0xNN>``)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    for word in ("a", "c", "hello", "▁world"):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend), vocab


def test_a_lone_lead_byte_after_a_released_one_does_not_break_the_stream():
    """``c`` as a byte token goes out as "c"; a lone lead byte after it makes
    the two decode together as replacement characters, which tokenizers'
    DecodeStream refuses. The sequence goes on: nothing released is repeated,
    and the text after it still arrives."""
    tok, vocab = _byte_fallback_tokenizer()
    detok = IncrementalDetokenizer(tok, [vocab["a"]])
    assert detok.add(vocab["<0x63>"]) == "c"
    assert detok.add(vocab["<0xEF>"]) == ""  # the start of a three-byte character
    pieces = [detok.add(vocab["hello"]), detok.add(vocab["▁world"]), detok.flush()]
    assert "".join(pieces) == REPLACEMENT + "hello world"


def _run(stops, pieces):
    matcher = StopMatcher(tuple(stops))
    out = [matcher.feed(p) for p in pieces]
    out.append(matcher.flush())
    return out, matcher.stopped


def test_stop_string_cuts_output_before_it():
    out, stopped = _run(["END"], ["abc E", "N", "D more"])
    assert "".join(out) == "abc " and stopped


def test_possible_stop_prefix_is_held_then_released():
    out, stopped = _run(["END"], ["abc E", "x"])
    assert out[0] == "abc " and "".join(out) == "abc Ex" and not stopped


def test_no_stops_releases_everything_at_once():
    out, _ = _run([], ["a", "b"])
    assert out == ["a", "b", ""]


def test_earliest_of_several_stops_wins():
    out, _ = _run(["\n\n", "###"], ["one ### two\n\nthree"])
    assert "".join(out) == "one "
