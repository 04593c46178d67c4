"""How request input is hashed for the audit trail.

``input_hash`` is the hex SHA-256 of the UTF-8 bytes of:
- for ``/v1/completions`` and ``/generate``: the prompt string exactly as sent;
- for ``/v1/chat/completions``: the messages as compact JSON, each message
  reduced to ``{"role", "content"}`` with keys in that order, no spaces,
  non-ASCII characters written as themselves.

A security team holding a suspect prompt recomputes the hash and finds the row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from bastion_common.messages import ChatMessage


def canonical_input(prompt: str | None, messages: Iterable[ChatMessage] | None) -> str:
    if messages is None:
        return prompt or ""
    items = [{"role": m.role, "content": m.content} for m in messages]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def input_hash(prompt: str | None, messages: Iterable[ChatMessage] | None) -> str:
    return hashlib.sha256(canonical_input(prompt, messages).encode("utf-8")).hexdigest()
