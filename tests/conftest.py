"""Shared fixtures: tiny configs, a tokenizer trained once on the bundled sample, data paths."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

try:  # property tests: random examples while developing, the same examples in CI (no flaky reds)
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    if os.environ.get("CI"):
        _hsettings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A model small enough that a training step takes milliseconds: 2 layers, width 32.
TINY_SETS = [
    "model.d_model=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.context=32",
    "model.dropout=0.0",
    "tokenizer.vocab_size=400",
    "train.batch_size=4",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.save_every=2",
    "train.samples=1",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.dtype=fp32",
    "train.compile=false",
    "train.device=cpu",
    "train.report=false",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temporary directory, never the user's ~/.cache."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "llmkit-cache"))


@pytest.fixture(scope="session")
def sample_docs():
    from llmkit.core.files.corpus import read_corpus, sample_corpus

    return read_corpus(sample_corpus())


@pytest.fixture(scope="session")
def tokenizer(sample_docs):
    from llmkit.core.config import TokenizerConfig
    from llmkit.core.text.tokenizer import train_tokenizer

    tok, _ = train_tokenizer(sample_docs, TokenizerConfig(vocab_size=400), corpus_sha256="test")
    return tok


@pytest.fixture
def tiny_model_cfg(tokenizer):
    from llmkit.core.config import ModelConfig

    return ModelConfig(vocab_size=tokenizer.vocab_size, context=32, d_model=32, n_layer=2, n_head=2, n_kv_head=1)


@pytest.fixture
def corpus_file(tmp_path, sample_docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(sample_docs), encoding="utf-8")
    return path


def skip_or_fail(reason: str):
    """Skip a test whose data or dependency is missing here, saying why (-ra lists the reasons);
    under CI, where everything must be present, the same absence fails the test instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: a skip there would hide an untested path)")
    pytest.skip(reason)


def need_module(name: str, why: str):
    """Import an optional dependency, or skip (fail under CI) naming it and why it is needed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} is not installed ({why})")


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        skip_or_fail(f"{path} not present (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_docs):
    """A tiny model pretrained for a few steps, shared read-only by the generate tests."""
    import os

    from llmkit.core.jobs.pretrain import plan, pretrain

    root = tmp_path_factory.mktemp("trained")
    os.environ.setdefault("LLMKIT_CACHE", str(root / "cache"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sample_docs), encoding="utf-8")
    cfg, _ = plan(
        root / "run",
        resume=None,
        preset=None,
        config_file=None,
        sets=[*TINY_SETS, "train.steps=4", "train.samples=0"],
        flags={},
    )
    pretrain([str(corpus)], root / "run", cfg)
    return root / "run"
