"""Fast decoding paths against the plain one: speculative (draft model, prompt lookup) must give
the plain greedy output token for token; int8 weights must keep perplexity within a bound."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmkit.core.checkpoint import load_model
from llmkit.core.config import SampleConfig
from llmkit.core.decoding import Decoder
from llmkit.core.errors import ConfigError
from llmkit.core.generate import decode_batch
from llmkit.core.model import Transformer
from llmkit.core.quantize import Int8Linear, available, quantize_int8
from llmkit.core.speculative import DraftModel, PromptLookup, speculative_decode
from llmkit.core.train import mean_token_loss

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


@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_output_is_the_plain_greedy_output(target, n, k):
    model, ckpt = target
    tok = ckpt.tokenizer
    proposers = {"self": DraftModel(model, "cpu"), "other": DraftModel(_draft_like(model, 1), "cpu"),
                 "lookup": PromptLookup(3)}
    for text in PROMPTS:
        ids = tok.encode_text(text)
        plain = _plain(model, tok, ids, n)
        for name, proposer in proposers.items():
            fast = speculative_decode(model, ids, SampleConfig(temperature=0.0, max_new_tokens=n), proposer,
                                      eos_id=tok.eos_id, decode=tok.decode, device="cpu", draft_tokens=k)
            assert fast.ids == plain.ids, (name, text)
            assert fast.text == plain.text and fast.finish_reason == plain.finish_reason, (name, text)
            assert 0 <= fast.accepted <= fast.drafted
            if name == "self" and fast.drafted:
                assert fast.accepted == fast.drafted  # a model always agrees with itself


def test_speculative_decoding_respects_stop_strings(target):
    model, ckpt = target
    tok = ckpt.tokenizer
    plain_out = _plain(model, tok, tok.encode_text("Le"), 30)
    assert len(plain_out.text) >= 4, plain_out.text  # the fixture's model writes that much
    stop = plain_out.text[2:4]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=30, stop=(stop,))
    plain = decode_batch(model, [tok.encode_text("Le")], cfg, eos_id=tok.eos_id, decode=tok.decode)[0]
    fast = speculative_decode(model, tok.encode_text("Le"), cfg, DraftModel(model, "cpu"), eos_id=tok.eos_id,
                              decode=tok.decode, device="cpu")
    assert (fast.text, fast.finish_reason) == (plain.text, "stop")


def test_prompt_lookup_guesses_what_followed_the_last_ngram():
    look = PromptLookup(3)
    assert look.propose([1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]
    assert look.propose([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert look.propose([1, 2, 3], 4) == []


def test_the_decoder_refuses_speculation_where_it_would_change_the_output(target):
    model, ckpt = target
    with pytest.raises(ConfigError, match="greedy"):
        Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.8, lookup=3), "cpu")
    with pytest.raises(ConfigError, match="penalties"):
        Decoder(model, ckpt.tokenizer, SampleConfig(temperature=0.0, repetition_penalty=1.2), "cpu",
                draft=model)
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
    out = subprocess.run([sys.executable, "-m", "llmkit", "generate", str(trained_run), "-p", "Le chat. Le chat. Le chat. Le",
                          "-n", "8", "--greedy", "--quantize", "int8", "--lookup", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "guesses accepted" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "llmkit", "generate", str(trained_run), "-p", "x", "--quantize", "int4"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --quantize")


def test_the_server_can_serve_int8_weights(trained_run):
    from conftest import need_module

    need_module("fastapi", "the serve extra")
    from llmkit.serve.api import Server

    server = Server(trained_run, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in server.model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in server.model.modules())
