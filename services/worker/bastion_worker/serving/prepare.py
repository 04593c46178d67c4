"""A request read from the stream, checked against the model and tokenised."""

from __future__ import annotations

import time

from bastion_common.errors import InvalidRequestError, TimeoutError_
from bastion_common.messages import GenerationRequest
from bastion_worker.engine.core import Engine
from bastion_worker.engine.sequence import Sequence


def prepare(engine: Engine, model: str, req: GenerationRequest) -> Sequence:
    """``req`` as a sequence for ``engine``, which serves ``model``, or the error
    that answers it: another model, a deadline passed, an empty prompt the model
    cannot start from, a prompt past the context, or ``top_k`` past the vocabulary.
    ``max_tokens`` is capped by the room left in the context."""
    if req.model != model:
        raise InvalidRequestError(f"This worker serves {model!r}, not {req.model!r}.")
    if time.time() > req.deadline:
        raise TimeoutError_("The request waited in the queue past its deadline.")
    lm = engine.lm
    if req.messages is not None:
        prompt_ids = lm.encode_chat(req.messages)
        stops = req.params.stop + lm.chat_stops
    else:
        prompt_ids = lm.encode_prompt(req.prompt or "")
        stops = req.params.stop
    if not prompt_ids:  # an empty prompt: generate from the start of a text
        if lm.tokenizer.bos_token_id is None:
            raise InvalidRequestError("The prompt is empty.", param="prompt", code="empty_prompt")
        prompt_ids = [lm.tokenizer.bos_token_id]
    room = lm.context_length - len(prompt_ids)
    if room < 1:
        raise InvalidRequestError(
            f"The prompt is {len(prompt_ids)} tokens; this model's context is "
            f"{lm.context_length} tokens.",
            param="messages" if req.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    vocab = lm.model.config.vocab_size
    if req.params.top_k > vocab:
        raise InvalidRequestError(
            f"top_k may be at most this model's vocabulary size, {vocab}.", param="top_k"
        )
    max_tokens = min(req.params.max_tokens or room, room)
    return engine.new_sequence(req.id, prompt_ids, req.params, max_tokens, stops)
