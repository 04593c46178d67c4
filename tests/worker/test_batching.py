"""Grouping prompts of similar length into prefill passes."""

from bastion_worker.engine.batching import length_groups


def test_length_groups_cover_every_prompt_once_longest_first():
    lengths = [16, 96, 40, 90, 20, 60, 33, 75, 18, 50]
    groups = length_groups(lengths)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert len(groups) > 1
    padded = sum(len(g) * lengths[g[0]] for g in groups)
    assert padded < len(lengths) * max(lengths) * 0.8


def test_a_few_short_prompts_stay_in_one_pass():
    assert length_groups([10, 4, 7]) == [[0, 2, 1]]
    assert length_groups([]) == []
