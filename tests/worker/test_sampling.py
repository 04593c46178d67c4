"""Choosing the next token per row, without a model."""

import pytest
import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine.sampling import CHUNK, make_generator, sample

GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("vocab", [5000, 16 * CHUNK], ids=["one-pass", "by-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_take_the_first_of_tied_maxima_as_argmax_does(dtype, vocab):
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (16, vocab)).to(dtype)  # every row has many ties
    logits[3, 7] = logits[3, 4000] = 9  # a tie at the top: the first one wins
    logits[5, 3000] = logits[5, 2500] = logits[5, 2900] = 9  # in two chunks, 2500 first
    logits[6, vocab - 1] = 9  # the very last entry
    chosen = sample(logits, [GREEDY] * 16, [None] * 16, [([], [])] * 16)
    assert chosen == torch.argmax(logits.float(), dim=-1).tolist()
    assert chosen[3] == 7 and chosen[5] == 2500 and chosen[6] == vocab - 1


def test_sampled_and_penalised_rows_sit_beside_greedy_ones():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 5.0
    logits[:, 6] = 4.9
    seeded = SamplingParams(temperature=1.0, top_k=2, seed=7)
    penalised = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    params = [GREEDY, seeded, penalised]
    histories = [([], []), ([], []), ([], [2])]  # row 2 already said token 2

    def run():
        return sample(logits, params, [make_generator(p) for p in params], histories)

    first = run()
    assert first[0] == 2
    assert first[1] in (2, 6)  # top_k keeps the two best
    assert first[2] == 6  # the penalty moved it off token 2
    assert run() == first  # the seed reproduces
