"""Decoding: greedy, sampling, seeds, beams, stop strings, batching, sliding context."""

import math

import torch
from torch import nn

from llmkit.core.config import ModelConfig, SampleConfig
from llmkit.core.decoding.sampling import next_token, top_k_filter
from llmkit.core.decoding.steps import TextStream, beam_search, decode_batch
from llmkit.core.model.transformer import Transformer

CHARS = "abcdefghijklmnopqrstuvwxyz ENDX"


def char_decode(ids):
    return "".join(CHARS[i % len(CHARS)] for i in ids)


def _gen(model, prompt, **kw):
    cfg = SampleConfig(**{"max_new_tokens": 12, **kw})
    return decode_batch(model, [prompt], cfg, eos_id=None, decode=char_decode)[0].ids


def _model(cfg):
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_top_k_one_equals_greedy(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    greedy = _gen(model, [5, 6, 7], temperature=0)
    assert _gen(model, [5, 6, 7], temperature=1.0, top_k=1, seed=3) == greedy


def test_same_seed_same_tokens_and_different_seeds_differ(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    a = _gen(model, [5], temperature=1.5, top_k=0, seed=1)
    assert a == _gen(model, [5], temperature=1.5, top_k=0, seed=1)
    assert a != _gen(model, [5], temperature=1.5, top_k=0, seed=2)


def test_generation_slides_past_the_context(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    out = decode_batch(
        model, [[1] * 30], SampleConfig(max_new_tokens=50, temperature=0), eos_id=None, decode=char_decode
    )[0]
    assert out.finish_reason == "length"
    assert len(out.ids) == 50  # 30 + 50 tokens > context 32: the window slid instead of failing


def test_batched_equals_unbatched(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    for cfg in (
        SampleConfig(max_new_tokens=15, temperature=0),
        SampleConfig(max_new_tokens=15, temperature=1.0, top_k=0),
    ):
        batched = decode_batch(model, prompts, cfg, eos_id=None, decode=char_decode, seeds=[11, 12, 13])
        for p, seed, out in zip(prompts, [11, 12, 13], batched):
            alone = decode_batch(model, [p], cfg, eos_id=None, decode=char_decode, seeds=[seed])[0]
            assert out.ids == alone.ids


def test_one_beam_equals_greedy(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    cfg = SampleConfig(max_new_tokens=10, temperature=0, num_beams=1)
    greedy = decode_batch(model, [[4, 5, 6]], cfg, eos_id=None, decode=char_decode)[0]
    beam = beam_search(model, [4, 5, 6], cfg, eos_id=None, decode=char_decode)
    assert beam.ids == greedy.ids


class Chain(nn.Module):
    """A fake language model whose next-token distribution depends on the last token only."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 6):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, context=16, d_model=8, n_layer=1, n_head=2)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.logp = torch.full((vocab, vocab), -30.0)
        for src, dist in table.items():
            for dst, p in dist.items():
                self.logp[src, dst] = math.log(p)

    def forward(self, idx, *, cache=None, pos=0, positions=None, key_valid=None, last_only=False):
        return self.logp[idx[:, -1:]]  # (B, 1, V)


def _logprob(model, prompt, ids):
    seq = prompt + ids
    return sum(float(model.logp[a, b]) for a, b in zip(seq, seq[1:]))


def test_beam_search_beats_greedy_on_a_trap():
    # Greedy takes 1 (0.6) and then faces four equal choices (0.25): 0.15 in all.
    # Through 2 (0.4) the next token is nearly certain (0.99): 0.396.
    model = Chain(
        {
            0: {1: 0.6, 2: 0.4},
            1: {2: 0.25, 3: 0.25, 4: 0.25, 5: 0.25},
            2: {3: 0.99, 4: 0.01},
            3: {3: 1.0},
            4: {4: 1.0},
            5: {5: 1.0},
        }
    )
    greedy = decode_batch(model, [[0]], SampleConfig(max_new_tokens=2, temperature=0), eos_id=None, decode=char_decode)[
        0
    ]
    beam = beam_search(
        model, [0], SampleConfig(max_new_tokens=2, temperature=0, num_beams=2), eos_id=None, decode=char_decode
    )
    assert greedy.ids[0] == 1 and beam.ids == [2, 3]
    assert _logprob(model, [0], beam.ids) >= _logprob(model, [0], greedy.ids)


def test_beam_search_ends_at_eos_and_length_penalty_changes_the_choice():
    model = Chain({0: {1: 0.5, 2: 0.5}, 1: {5: 0.9, 3: 0.1}, 2: {3: 0.6, 4: 0.4}, 3: {3: 1.0}, 4: {4: 1.0}})
    # By total log-probability, 0 1 <eos> (0.45) beats 0 2 3 3 3 3 (0.30) ...
    plain = beam_search(
        model,
        [0],
        SampleConfig(max_new_tokens=5, temperature=0, num_beams=3, length_penalty=0.0),
        eos_id=5,
        decode=char_decode,
    )
    assert plain.finish_reason == "eos" and plain.ids == [1]
    # ... but per token the long one is better, and a length penalty of 1 prefers it.
    long = beam_search(
        model,
        [0],
        SampleConfig(max_new_tokens=5, temperature=0, num_beams=3, length_penalty=1.0, early_stopping=False),
        eos_id=5,
        decode=char_decode,
    )
    assert long.finish_reason == "length" and long.ids == [2, 3, 3, 3, 3]


def test_stop_string_split_across_tokens_ends_output_exactly():
    ids = [CHARS.index(c) for c in "hello ENDX more"]
    stream = TextStream(char_decode, ("END",))
    shown = "".join(stream.push(t) for t in ids) + stream.flush()
    assert stream.stopped and shown == "hello " and stream.text == "hello "


def test_streaming_holds_back_a_possible_stop_prefix_then_releases_it():
    stream = TextStream(char_decode, ("ENDX",))
    chunks = [stream.push(CHARS.index(c)) for c in "ab EN"]
    assert "".join(chunks) == "ab "  # "EN" might begin the stop string
    assert stream.push(CHARS.index("a")) == "ENa"  # it did not
    assert not stream.stopped


def test_decode_batch_stops_rows_at_stop_strings():
    # A chain that spells "ab END" forever: the stop string ends it early.
    order = [CHARS.index(c) for c in "ab END"]
    table = {a: {b: 1.0} for a, b in zip(order, order[1:] + order[:1])}
    model = Chain(table, vocab=len(CHARS))
    out = decode_batch(
        model,
        [[order[-1]]],
        SampleConfig(max_new_tokens=20, temperature=0, stop=("END",)),
        eos_id=None,
        decode=char_decode,
    )[0]
    assert out.text == "ab " and out.finish_reason == "stop"


def test_top_k_filter_keeps_exactly_k():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]
    assert next_token(logits, temperature=0, top_k=0).item() == 1


def test_show_probs_records_the_sampled_distribution(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    out = decode_batch(
        model, [[4]], SampleConfig(max_new_tokens=3, temperature=0), eos_id=None, decode=char_decode, record_probs=True
    )[0]
    assert len(out.probs) == 3
    for step, tok in zip(out.probs, out.ids):
        assert step.token == tok and step.top[0][0] == tok and 0 < step.prob <= 1


def _continuous(model, jobs, capacity, join_every, cfg):
    """Run ``jobs`` (ids, seed, max_new) through Slots, admitting one waiting job every
    ``join_every`` steps while others decode; the outputs in job order."""
    from llmkit.core.decoding.steps import SlotJob, Slots

    slots = Slots(model, capacity, cfg, eos_id=None, decode=char_decode)
    waiting = [SlotJob(ids, seed, n) for ids, seed, n in jobs]
    order, done, step = {}, {}, 0
    first = slots.admit(waiting[:2])
    order.update({id(o): i for i, o in enumerate(first)})
    waiting = list(enumerate(waiting))[2:]
    joined_mid_flight = 0
    while slots.live or waiting:
        if waiting and step % join_every == join_every - 1:
            out = slots.admit([waiting[0][1]])[0]
            if out is not None:
                joined_mid_flight += slots.live > 1
                order[id(out)] = waiting.pop(0)[0]
        for out in slots.step():
            done[order[id(out)]] = out
        step += 1
    return [done[i] for i in range(len(jobs))], joined_mid_flight


def test_continuous_batching_equals_each_prompt_alone(tiny_model_cfg):
    """Rows that join a running batch between two steps (and leave it when they end) decode exactly
    as they would alone: greedy, and sampled with each row's own seed."""
    model = _model(tiny_model_cfg)
    prompts = [[5, 9, 3], [7], [11, 4, 8, 2, 6], [3, 3], [10, 12, 14, 9], [2, 8]]
    jobs = [(p, 100 + i, 12 - (i % 4)) for i, p in enumerate(prompts)]
    for temperature in (0.0, 0.9):
        cfg = SampleConfig(max_new_tokens=12, temperature=temperature, top_k=20)
        outs, joined = _continuous(model, jobs, capacity=3, join_every=2, cfg=cfg)
        assert joined >= 2  # the test does exercise rows joining others mid-flight
        for (ids, seed, n), out in zip(jobs, outs):
            alone = decode_batch(
                model,
                [ids],
                SampleConfig(max_new_tokens=n, temperature=temperature, top_k=20),
                eos_id=None,
                decode=char_decode,
                seeds=[seed],
            )[0]
            assert out.ids == alone.ids and out.finish_reason == "length"


def test_continuous_batching_cancels_a_row_and_refuses_what_cannot_fit(tiny_model_cfg):
    from llmkit.core.decoding.steps import SlotJob, Slots

    model = _model(tiny_model_cfg)
    cfg = SampleConfig(max_new_tokens=8, temperature=0.0)
    slots = Slots(model, 2, cfg, eos_id=None, decode=char_decode)
    gone = [False]
    a, b = slots.admit([SlotJob([5, 9], 0, 8, cancelled=lambda: gone[0]), SlotJob([7], 1, 8)])
    assert slots.admit([SlotJob([3], 2, 4)]) == [None]  # every row taken
    slots.step()
    gone[0] = True
    ended = slots.step()
    assert a in ended and a.finish_reason == "cancelled" and len(a.ids) < 8
    long_prompt = list(range(1, 20))
    assert slots.admit([SlotJob(long_prompt, 3, 4)]) == [None]  # longer than the slots decoded so far
    while slots.live:
        slots.step()
    assert b.finish_reason == "length" and len(b.ids) == 8
