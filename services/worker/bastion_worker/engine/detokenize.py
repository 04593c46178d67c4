"""Incremental detokenisation that never releases half a character.

Byte-level tokenisers split one Chinese character or emoji over several
tokens; decoding a window that ends mid-character yields U+FFFD, so such text
is held back until the next token completes it. A few tokens of the prompt
are given as context, so that decoders which strip a leading space at the
start of a sequence still produce the right spacing.

With a Rust ("fast") tokenizer this is the `tokenizers` library's own
``DecodeStream``, one call into Rust per token. A tokenizer without one is
decoded by windows: two ``decode`` calls per token, in Python.

``DecodeStream`` raises where a new token changes text already released: with
byte-fallback tokens (Gemma's ``<0xNN>``), a byte that decoded as a character
and then a lone lead byte after it decode together as replacement characters.
A model sampling such bytes is not an error in the request, so that
sequence's detokeniser goes on by windows from there (what it released stays
released; the rest comes out as the tokens decode).
"""

from __future__ import annotations

from typing import Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int]) -> None:
        backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        self._impl: _Stream | _Windows
        if isinstance(backend, Tokenizer):
            self._impl = _Stream(backend, context)
        else:
            self._impl = _Windows(tokenizer, context)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it completes (maybe empty)."""
        if isinstance(self._impl, _Stream):
            try:
                return self._impl.add(token_id)
            except Exception:  # tokenizers raises a bare Exception: see the module's note
                stream = self._impl
                self._impl = _Windows(stream.backend, stream.released[-CONTEXT_TOKENS:])
                return "".join(self._impl.add(t) for t in [*stream.held, token_id])
        return self._impl.add(token_id)

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character shows as U+FFFD)."""
        return self._impl.flush()


class _Stream:
    def __init__(self, backend: Tokenizer, context: list[int]) -> None:
        self.backend = backend
        self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        self.released = context  # the context and the tokens whose text went out
        self.held: list[int] = []  # tokens of a character not complete yet

    def add(self, token_id: int) -> str:
        text = self._stream.step(self.backend, token_id)
        if text is None:
            self.held.append(token_id)
            return ""
        self.released = [*self.released[-CONTEXT_TOKENS:], *self.held, token_id]
        self.held = []
        return str(text)

    def flush(self) -> str:
        held, self.held = self.held, []
        return str(self.backend.decode(held, skip_special_tokens=True)) if held else ""


class _Windows:
    def __init__(self, tokenizer: Decoder, context: list[int]) -> None:
        self._tok = tokenizer
        self._ids = context
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
