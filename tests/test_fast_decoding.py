"""Fast decoding paths against the plain one: speculative (draft model, prompt lookup) must give
the plain greedy output token for token; int8 weights must keep perplexity within a bound."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.decoder import Decoder
from llmkit.core.decoding.speculative import DraftModel, PromptLookup, speculative_batch
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.errors import ConfigError
from llmkit.core.model.quantize import Int8Linear, available, int8_copy, quantize_int8
from llmkit.core.model.transformer import Transformer
from llmkit.core.store.checkpoint import load_model
from llmkit.core.training.loop import mean_token_loss

PROMPTS = ["Le chat", "La mer est calme. La mer est", "", "Il était une fois, il était une fois, il"]


@pytest.fixture(scope="module")
def target(trained_run):
    return load_model(trained_run)


def _plain(model, tok, prompt_ids, n):
    cfg = SampleConfig(temperature=0.0, max_new_tokens=n)
    return decode_batch(model, [prompt_ids], cfg, eos_id=tok.eos_id, decode=tok.decode)[0]


def _draft_like(model, seed):
    torch.manual_seed(seed)
    cfg = model.cfg
    small = Transformer(type(cfg)(**{**cfg.__dict__, "n_layer": 1})).eval()
    return small


def _speculative(model, tok, prompts, cfg, proposers, k=4):
    # Unpaced: every pass carries the guesses (the pacer's timing would make the test's path vary).
    return speculative_batch(
        model, prompts, cfg, proposers, eos_id=tok.eos_id, decode=tok.decode, device="cpu", draft_tokens=k, paced=False
    )


@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_output_is_the_plain_greedy_output(target, n, k):
    model, ckpt = target
    tok = ckpt.tokenizer
    twin = int8_copy(model)
    proposers = {
        "self": lambda: DraftModel(model, "cpu"),
        "other": lambda: DraftModel(_draft_like(model, 1), "cpu"),
        "int8 twin": lambda: DraftModel(twin, "cpu"),
        "lookup": lambda: PromptLookup(3),
    }
    cfg = SampleConfig(temperature=0.0, max_new_tokens=n)
    prompts = [tok.encode_text(text) for text in PROMPTS]
    plain = [_plain(model, tok, ids, n) for ids in prompts]  # each prompt alone, the plain way
    for name, make in proposers.items():
        alone = [_speculative(model, tok, [ids], cfg, [make()], k)[0] for ids in prompts]
        together = _speculative(model, tok, prompts, cfg, [make() for _ in prompts], k)
        for fast in alone + together:
            want = plain[(alone + together).index(fast) % len(prompts)]
            assert fast.ids == want.ids, (name, fast.prompt_ids)
            assert fast.text == want.text and fast.finish_reason == want.finish_reason, (name, fast.prompt_ids)
            assert 0 <= fast.accepted <= fast.drafted
            if name == "self" and fast.drafted:
                assert fast.accepted == fast.drafted  # a model always agrees with itself


@pytest.fixture(scope="module")
def sharp(target):
    """A random model with large weights: its greedy text varies with every token of the context
    (the briefly trained fixture repeats one token), so a wrong position or key changes it."""
    model, _ = target
    torch.manual_seed(0)
    rnd = Transformer(type(model.cfg)(**{**model.cfg.__dict__, "tie_embeddings": False})).eval()
    with torch.no_grad():
        for p in rnd.parameters():
            if p.ndim == 2:
                p.mul_(8)
    return rnd


class _Misled:
    """Prompt lookup's guesses, the last one spoiled on every other call: passes that keep some
    guesses and reject others, different in every row."""

    free = True  # copied guesses, spoiled for nothing

    def __init__(self, vocab: int):
        self.look, self.vocab, self.calls = PromptLookup(2), vocab, 0

    def start(self, prompt, length):
        pass

    def propose(self, history, k):
        self.calls += 1
        guess = self.look.propose(history, k) or history[-k:]
        if guess and self.calls % 2:
            guess = guess[:-1] + [(guess[-1] + 1) % self.vocab]
        return guess


def test_batched_speculation_with_holes_and_slides_stays_exact(target, sharp):
    """Rows of one batch keep different numbers of guesses (holes in the cache), run past the
    context (each slides on its own), and end at different times: each row is still its own plain
    greedy output."""
    _, ckpt = target
    tok = ckpt.tokenizer
    context, vocab = sharp.cfg.context, sharp.cfg.vocab_size
    texts = PROMPTS + ["Le roi", "Elle dit : « Non. »"]
    prompts = [tok.encode_text(t) for t in texts]
    for n, k in [(3 * context, 4), (context + 3, 2), (9, 3)]:
        cfg = SampleConfig(temperature=0.0, max_new_tokens=n)
        plain = [_plain(sharp, tok, ids, n) for ids in prompts]
        mixed = [
            [_Misled(vocab), PromptLookup(3), DraftModel(_draft_like(sharp, b), "cpu")][b % 3]
            for b in range(len(prompts))
        ]
        fast = _speculative(sharp, tok, prompts, cfg, mixed, k)
        assert [o.ids for o in fast] == [o.ids for o in plain], (n, k)
        assert [o.finish_reason for o in fast] == [o.finish_reason for o in plain]
        kept = [o.accepted / o.drafted for o in fast if o.drafted]
        assert min(kept) < 1 and (n < context or max(kept) > 0), (n, k, kept)  # kept and rejected


def test_speculative_decoding_respects_stop_strings(target):
    model, ckpt = target
    tok = ckpt.tokenizer
    plain_out = _plain(model, tok, tok.encode_text("Le"), 30)
    assert len(plain_out.text) >= 4, plain_out.text  # the fixture's model writes that much
    stop = plain_out.text[2:4]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=30, stop=(stop,))
    prompts = [tok.encode_text("Le"), tok.encode_text("La mer")]
    plain = decode_batch(model, prompts, cfg, eos_id=tok.eos_id, decode=tok.decode)
    fast = _speculative(model, tok, prompts, cfg, [DraftModel(model, "cpu"), PromptLookup(3)])
    assert (fast[0].text, fast[0].finish_reason) == (plain[0].text, "stop")
    assert (fast[1].text, fast[1].finish_reason) == (plain[1].text, plain[1].finish_reason)


def test_the_pacer_guesses_only_where_guessing_pays():
    from llmkit.core.decoding.speculative import _Pacer

    pacer = _Pacer()
    g = [4, 4]  # two rows of four guesses (made, or room for them)
    assert pacer.width([0, 0], [0.9, 0.9]) == 1  # nothing to guess
    assert pacer.width(g, [0.9, 0.9]) == 5  # nothing timed yet: try the guesses
    pacer.time(2, 5, 0.015)
    assert pacer.width(g, [0.9, 0.9]) == 1  # then the plain pass, once
    pacer.time(2, 1, 0.010)
    pacer.time(2, 1, 0.030)  # a slow pass (the machine was busy) does not raise the cost
    assert pacer.width(g, [0.9, 0.9]) == 5  # 2 + 2 * 3.1 tokens for 1.5x the cost
    assert pacer.width(g, [0.1, 0.1]) == 1  # 2 + 2 * 0.11 tokens: not worth it
    # widths between are on the line from 1 to 5 (3 positions: 0.0125): tried, then timed
    assert pacer.width(g, [0.5, 0.5]) == 3  # 3.5 tokens for 1.25x beats 2 + 2 * 0.94 for 1.5x
    pacer.time(2, 3, 0.0149)  # dearer than the line: now known
    assert pacer.width(g, [0.5, 0.5]) == 5
    pacer.time(2, 2, 0.011)  # one guess per row is nearly free here
    assert pacer.width(g, [0.3, 0.3]) == 2  # 2.6 tokens for 1.1x beats 2 + 2 * 0.42 for 1.5x
    n = _Pacer.RETRY
    refusals = [pacer.width(g, [0.01, 0.01]) for _ in range(3 * n + 2)]
    assert refusals == [1] * n + [5] + [1] * 2 * n + [5]  # tried again after RETRY, then 2 RETRY passes


class _SlowDraft:
    """A costly proposer (like a draft model) whose guesses are never worth their time."""

    free = False

    def __init__(self, vocab: int):
        self.calls, self.vocab = 0, vocab

    def start(self, prompt, length):
        pass

    def propose(self, history, k):
        self.calls += 1
        time.sleep(0.05)  # fifty plain passes of the test model
        return [(history[-1] + 1) % self.vocab] * k


def test_a_costly_proposer_is_asked_only_when_the_pacer_wants_guesses(target, sharp):
    """A draft's guesses cost before the pacer can weigh them: the pacer decides first, and the
    draft's time counts in the pass's cost, so a draft that does not pay is mostly not run."""
    _, ckpt = target
    tok = ckpt.tokenizer
    prompts = [tok.encode_text(t) for t in PROMPTS[:2]]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=80)
    drafts = [_SlowDraft(sharp.cfg.vocab_size) for _ in prompts]
    fast = speculative_batch(sharp, prompts, cfg, drafts, eos_id=tok.eos_id, decode=tok.decode, device="cpu")
    assert [o.ids for o in fast] == [_plain(sharp, tok, ids, 80).ids for ids in prompts]
    # a first trial, then retries after 8, 16, 32 plain passes: a handful of calls in 80 passes
    assert all(1 <= d.calls <= 6 for d in drafts), [d.calls for d in drafts]


def test_paced_speculation_is_still_the_plain_greedy_output(target, sharp):
    _, ckpt = target
    tok = ckpt.tokenizer
    prompts = [tok.encode_text(t) for t in PROMPTS]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=50)
    fast = speculative_batch(
        sharp, prompts, cfg, [PromptLookup(2) for _ in prompts], eos_id=tok.eos_id, decode=tok.decode, device="cpu"
    )
    assert [o.ids for o in fast] == [_plain(sharp, tok, ids, 50).ids for ids in prompts]


def test_prompt_lookup_guesses_what_followed_the_last_ngram():
    look = PromptLookup(3)
    assert look.propose([1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]
    assert look.propose([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert look.propose([1, 2, 3], 4) == []
    # a match near the end: the text repeats with that period, and so do the guesses
    assert look.propose([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert look.propose([8, 8, 8], 3) == [8, 8, 8]


def test_the_decoder_refuses_speculation_where_it_would_change_the_output(target):
    model, ckpt = target
    with pytest.raises(ConfigError, match="greedy"):
        Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.8, lookup=3), "cpu")
    with pytest.raises(ConfigError, match="penalties"):
        Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.0, repetition_penalty=1.2), "cpu", draft=model)
    other = Transformer(type(model.cfg)(**{**model.cfg.__dict__, "vocab_size": model.cfg.vocab_size + 1}))
    with pytest.raises(ConfigError, match="vocabulary"):
        Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.0), "cpu", draft=other)
    d = Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.0, max_new_tokens=12, lookup=2), "cpu")
    plain = Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.0, max_new_tokens=12), "cpu")
    got = [o.text for _, o in next(d.run(PROMPTS))]
    assert got == [o.text for _, o in next(plain.run(PROMPTS))]


# --- int8 ------------------------------------------------------------------------------------------


def test_int8_linear_is_the_dequantized_product():
    assert available()  # torch's int8 weight-only kernel, in every build llmkit supports
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    exact = F.linear(x, q.dequantized())
    assert (q(x) - exact).abs().max() < 0.02 * exact.abs().max()  # bf16 activations
    # each weight within half a quantization step of the original
    assert ((q.dequantized() - lin.weight).abs() <= q.scale.float()[:, None] * 0.51 + 1e-6).all()


def test_int8_perplexity_moves_less_than_two_percent(target, sample_docs):
    model, ckpt = target
    tok = ckpt.tokenizer
    ids = torch.tensor(tok.encode_text(" ".join(sample_docs))[: 8 * (model.cfg.context + 1)])
    rows = ids.view(8, -1)  # (8, context + 1)
    batches = [(rows[:, :-1], rows[:, 1:])]
    plain = mean_token_loss(model, batches, "cpu").loss
    q, _ = load_model(ckpt.path)
    quantize_int8(q)
    assert all(not isinstance(m, torch.nn.Linear) for m in q.modules())
    low = mean_token_loss(q, batches, "cpu").loss
    assert abs(math.exp(low) / math.exp(plain) - 1) < 0.02, (math.exp(plain), math.exp(low))
    # the tied embedding table itself stays exact
    assert torch.equal(q.embed.weight, model.embed.weight)


def test_generate_cli_with_int8_and_lookup(trained_run):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            str(trained_run),
            "-p",
            "Le chat. Le chat. Le chat. Le",
            "-n",
            "8",
            "--greedy",
            "--quantize",
            "int8",
            "--lookup",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "guesses accepted" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "llmkit", "generate", str(trained_run), "-p", "x", "--quantize", "int4"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --quantize")


def test_the_int8_twin_shares_every_other_tensor_and_leaves_the_model_alone(target, sharp):
    model, ckpt = target
    x = torch.tensor([ckpt.tokenizer.encode_text("Le chat dort")])
    before = model(x)
    twin = int8_copy(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in twin.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == sum(
        isinstance(m, Int8Linear) for m in twin.modules()
    )
    assert torch.equal(model(x), before)  # the model is still fp32
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
        if name in own:
            assert t is own[name], name  # embeddings, norms, rotary tables: the model's own
    # a twin of a model with large weights (its greedy text turns on near-ties): guesses kept
    # and rejected, the output still the model's own
    prompts = [ckpt.tokenizer.encode_text(t) for t in PROMPTS]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=30)
    sharp_twin = int8_copy(sharp)
    fast = _speculative(sharp, ckpt.tokenizer, prompts, cfg, [DraftModel(sharp_twin, "cpu") for _ in prompts])
    assert [o.ids for o in fast] == [_plain(sharp, ckpt.tokenizer, ids, 30).ids for ids in prompts]
    assert 0 < sum(o.accepted for o in fast) < sum(o.drafted for o in fast)


def test_generate_cli_with_the_int8_twin_as_draft(trained_run):
    args = [
        sys.executable,
        "-m",
        "llmkit",
        "generate",
        str(trained_run),
        "-p",
        "Il était une fois",
        "-n",
        "12",
        "--greedy",
    ]
    plain = subprocess.run(args, capture_output=True, text=True)
    twin = subprocess.run(args + ["--draft", "int8"], capture_output=True, text=True)
    assert plain.returncode == 0 and twin.returncode == 0, twin.stderr
    assert twin.stdout == plain.stdout and "guesses accepted" in twin.stderr
    both = subprocess.run(args + ["--draft", "int8", "--quantize", "int8"], capture_output=True, text=True)
    assert both.returncode == 1 and both.stderr.strip().splitlines()[-1].startswith("error: --draft int8")


def test_the_server_can_serve_int8_weights(trained_run):
    from conftest import need_module

    need_module("fastapi", "the serve extra")
    from llmkit.serve.api import Server

    server = Server(trained_run, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in server.model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in server.model.modules())
