"""Decoding: greedy, sampling, seeds."""

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.generate import Finished, generate_ids
from llmkit.core.model import Transformer
from llmkit.core.sampling import next_token, top_k_filter


def _gen(model, prompt, **kw):
    cfg = SampleConfig(**{"max_new_tokens": 12, **kw})
    return [t for t in generate_ids(model, prompt, cfg, eos_id=None) if not isinstance(t, Finished)]


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


def test_generation_stops_at_the_context(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    out = list(generate_ids(model, [1] * 30, SampleConfig(max_new_tokens=10, temperature=0), eos_id=None))
    assert isinstance(out[-1], Finished) and out[-1].reason == "context"
    # 30 prompt tokens + 2 fed-back new ones fill the context of 32; the third is predicted from the last slot.
    assert len(out) - 1 == 3


def test_top_k_filter_keeps_exactly_k():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]
    assert next_token(logits, temperature=0, top_k=0).item() == 1
