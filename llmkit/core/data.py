"""Corpus -> token cache -> batches.

A corpus is tokenized once into two flat memory-mapped arrays (train and validation) under a
directory keyed by a hash of the corpus content, the tokenizer model and the split settings, so
editing the corpus or changing the tokenizer invalidates it and nothing else does.

The split is deterministic and follows line boundaries: the tail ``val_fraction`` of every
document (cut at the first line break past the mark) is validation; a single-file corpus thus
splits like nanoGPT's first 90% / last 10%. Documents end with EOS in the token stream.

The windows of a step are drawn by a generator seeded from (seed, step) as one global batch, and
each process takes its micro-batches' slices of it: a resumed run sees exactly the batches an
uninterrupted one would have, and one process sees the same global batch as two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmkit.core.config import DataConfig
from llmkit.core.corpus import decode_text, read_bytes
from llmkit.core.errors import DataError
from llmkit.core.tokenizer import Tokenizer

CACHE_VERSION = 1


def default_cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("LLMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmkit"


@dataclass
class TokenData:
    """The tokenized corpus: flat train/validation streams and their sizes."""

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    path: Path
    from_cache: bool


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Cut one document into (train, val) at the first line break past the (1 - fraction) mark."""
    mark = int(len(text) * (1.0 - val_fraction))
    cut = text.find("\n", mark)
    if cut < 0:  # no line break after the mark: fall back to the last one before it, then a space
        cut = text.rfind("\n", 0, mark)
    if cut <= 0:
        cut = text.find(" ", mark)
    if cut <= 0:
        return text, ""
    return text[: cut + 1], text[cut + 1:]


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    # "\n" is a user symbol, so encoding line by line and joining with its id equals encoding the
    # whole text, and lets SentencePiece spread the lines over all cores.
    lines = text.split("\n")
    encoded = tok.encode_batch(lines)
    out: list[int] = []
    nl = tok.newline_id
    for i, ids in enumerate(encoded):
        if i:
            out.append(nl)
        out.extend(ids)
    return out


def cache_key(file_hashes: list[str], tok: Tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{tok.contract['model_sha256']}|{cfg.val_fraction}|".encode())
    for fh in file_hashes:
        h.update(fh.encode())
    return h.hexdigest()[:24]


def load_or_build(files: list[Path], tok: Tokenizer, cfg: DataConfig, *,
                  on_progress: Callable[[int, int], None] | None = None) -> TokenData:
    """Return the token cache for (corpus, tokenizer, split), building it when absent or stale."""
    raw = [read_bytes(p) for p in files]
    key = cache_key([hashlib.sha256(b).hexdigest() for b in raw], tok, cfg)
    root = default_cache_dir(cfg) / "tokens" / key
    if (root / "meta.json").is_file():
        try:
            return _open(root, from_cache=True)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(root, ignore_errors=True)  # a damaged cache is rebuilt, never trusted

    docs = [decode_text(b, p) for b, p in zip(raw, files)]
    if not any(d.strip() for d in docs):
        raise DataError(f"corpus is empty: {', '.join(str(p) for p in files[:3])}")
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    train_parts, val_parts = [], []
    chars = val_bytes = 0
    for i, doc in enumerate(docs):
        if not doc.strip():
            continue
        tr, va = split_document(doc, cfg.val_fraction)
        chars += len(doc)
        val_bytes += len(va.encode("utf-8"))
        train_parts.append(np.asarray(encode_text(tok, tr) + [tok.eos_id], dtype=dtype))
        if va:
            val_parts.append(np.asarray(encode_text(tok, va) + [tok.eos_id], dtype=dtype))
        if on_progress:
            on_progress(i + 1, len(docs))
    train = np.concatenate(train_parts)
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=dtype)
    meta = {
        "version": CACHE_VERSION, "key": key, "dtype": np.dtype(dtype).name,
        "documents": len(train_parts), "chars": chars, "bytes": sum(len(b) for b in raw),
        "train_tokens": int(train.size), "val_tokens": int(val.size), "val_bytes": val_bytes,
        "files": [str(p) for p in files],
    }
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the cache complete
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return _open(root, from_cache=False)


def _open(root: Path, *, from_cache: bool) -> TokenData:
    meta = json.loads((root / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def mm(name: str, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(root / name, dtype=dtype, mode="r", shape=(n,))

    return TokenData(mm("train.bin", meta["train_tokens"]), mm("val.bin", meta["val_tokens"]), meta, root, from_cache)


def check_fits(data: TokenData, context: int) -> None:
    """A corpus must hold at least one full training block (context + 1 tokens for the shift)."""
    need = context + 1
    if data.train.size < need:
        raise DataError(
            f"corpus too small: {data.train.size} training tokens, one block needs {need} "
            f"(model.context + 1); add text or lower model.context")
    if data.val.size < 2:
        raise DataError("corpus too small: nothing left for validation; add text or raise data.val_fraction")


def batch_generator(seed: int, step: int) -> np.random.Generator:
    """The generator of one step's global batch: a pure function of (seed, step) (exact resume)."""
    return np.random.default_rng([seed, step])


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int):
    import torch

    # (B, length + 1) int64: inputs are [:, :-1], targets [:, 1:]
    block = np.stack([np.asarray(tokens[s: s + length + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(block)
    return t[:, :-1], t[:, 1:]


def train_batch(tokens: np.ndarray, batch_size: int, context: int, rng: np.random.Generator,
                part: int = 0, parts: int = 1):
    """Micro-batch ``part`` of a global batch of ``parts`` x batch_size random windows:
    x (B, T) and y (B, T), y shifted by one."""
    starts = rng.integers(0, tokens.size - context, size=batch_size * parts)  # the whole global batch
    return _windows(tokens, starts[part * batch_size: (part + 1) * batch_size], context)


def eval_batches(tokens: np.ndarray, batch_size: int, context: int, n_batches: int):
    """A fixed, evenly spread set of validation windows: the same at every evaluation."""
    length = min(context, tokens.size - 1)
    n = min(n_batches * batch_size, tokens.size - length)
    starts = np.unique(np.linspace(0, tokens.size - length - 1, num=max(n, 1)).astype(np.int64))
    for i in range(0, starts.size, batch_size):
        yield _windows(tokens, starts[i: i + batch_size], length)
