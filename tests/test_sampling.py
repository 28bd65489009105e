"""Logit processors on hand-made distributions: each keeps or changes exactly what it defines."""

import math

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.sampling import (
    NGramIndex,
    min_p_filter,
    no_repeat_ngram,
    presence_frequency_penalty,
    process_logits,
    repetition_penalty,
    token_counts,
    top_k_filter,
    top_p_filter,
)


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def logits_of(probs):
    return torch.tensor([probs]).log()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(top_p_filter(logits, 0.5)) == [True, False, False, False]
    assert kept(top_p_filter(logits, 0.6)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.8)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.81)) == [True, True, True, False]
    assert kept(top_p_filter(logits, 1.0)) == [True] * 4
    shuffled = logits_of([0.15, 0.5, 0.05, 0.3])  # order of the vocabulary does not matter
    assert kept(top_p_filter(shuffled, 0.6)) == [False, True, False, True]


def test_min_p_keeps_tokens_relative_to_the_top_one():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(min_p_filter(logits, 0.5)) == [True, True, False, False]  # threshold 0.25
    assert kept(min_p_filter(logits, 0.09)) == [True, True, True, True]  # threshold 0.045
    assert kept(min_p_filter(logits, 0.31)) == [True, True, False, False]  # threshold 0.155
    assert kept(min_p_filter(logits, 0.61)) == [True, False, False, False]  # threshold 0.305


def test_top_k_keeps_k():
    assert kept(top_k_filter(logits_of([0.1, 0.4, 0.2, 0.3]), 2)) == [False, True, False, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    counts = token_counts(torch.tensor([[0, 1, 1]]), None, 4)
    out = repetition_penalty(logits, counts, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    counts = token_counts(torch.tensor([[2, 2, 2, 1]]), None, 4)
    out = presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_counts_ignore_padding():
    counts = token_counts(torch.tensor([[0, 0, 3]]), torch.tensor([[False, False, True]]), 4)
    assert counts.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    logits = torch.zeros(2, 6)
    rows = [[1, 2, 3, 1, 2], [4, 5]]
    out = no_repeat_ngram(logits, rows, 3)
    assert not math.isfinite(out[0, 3])  # "1 2 3" already seen, the text ends in "1 2"
    assert torch.isfinite(out[1]).all()  # nothing to repeat yet
    unigram = no_repeat_ngram(torch.zeros(1, 6), [[1, 4]], 1)
    assert torch.isfinite(unigram)[0].tolist() == [True, False, True, True, False, True]


def test_order_temperature_before_filters():
    # A hot temperature flattens the distribution, so top-p keeps more tokens.
    logits = logits_of([0.6, 0.3, 0.1])
    cold = process_logits(logits, SampleConfig(temperature=1.0, top_k=0, top_p=0.75))
    hot = process_logits(logits, SampleConfig(temperature=5.0, top_k=0, top_p=0.75))  # ~(0.39, 0.34, 0.27)
    assert kept(cold) == [True, True, False] and kept(hot) == [True, True, True]


def test_incremental_ngram_index_matches_the_full_scan():
    import random

    rng = random.Random(0)
    for n in (1, 2, 3):
        seq = [rng.randrange(5) for _ in range(40)]
        index = NGramIndex(n, [])
        for i, t in enumerate(seq):
            index.add(t)
            expected = [
                j
                for j, ok in enumerate(torch.isfinite(no_repeat_ngram(torch.zeros(1, 5), [seq[: i + 1]], n))[0])
                if not ok
            ]
            assert index.banned() == expected, (n, i)
