"""End-to-end runs long enough to show learning (marked slow: run by .ci/run, not by default)."""

import json
import math

import pytest
from conftest import shared

from llmkit.core.jobs.pretrain import plan, pretrain

pytestmark = pytest.mark.slow


def _evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "eval"]


def test_tiny_preset_learns_the_bundled_sample(tmp_path):
    out = tmp_path / "run"
    cfg, _ = plan(
        out,
        resume=None,
        preset="tiny",
        config_file=None,
        sets=["train.steps=150", "train.eval_every=50", "train.device=cpu"],
        flags={},
    )
    result = pretrain(None, out, cfg)
    evals = _evals(out)
    assert result.state.step == 150
    # Uniform guessing over 2048 tokens costs ln(2048) = 7.6 nats; the model must do far better.
    assert evals[-1]["val_loss"] < 0.8 * math.log(2048), evals
    assert evals[-1]["val_bpb"] < 3.0
    assert all(text for _, text in result.samples)


def test_char_model_on_shakespeare_learns_beyond_unigram_statistics(tmp_path):
    corpus = shared("shakespeare", "input.txt")
    out = tmp_path / "run"
    cfg, _ = plan(
        out,
        resume=None,
        preset="tiny",
        config_file=None,
        sets=[
            "tokenizer.model_type=char",
            "tokenizer.byte_fallback=false",
            "model.context=64",
            "model.dropout=0.0",
            "train.steps=300",
            "train.eval_every=100",
            "train.batch_size=16",
            "train.device=cpu",
            "train.samples=1",
        ],
        flags={},
    )
    pretrain([str(corpus)], out, cfg)
    # A character unigram model of this text scores about 3.3 nats; bigrams about 2.5.
    assert _evals(out)[-1]["val_loss"] < 2.5
