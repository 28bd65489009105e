"""Token streams -> batches.

The windows of a step are drawn by a generator seeded from (seed, step) as one global batch, and
each process takes its micro-batches' slices of it: a resumed run sees exactly the batches an
uninterrupted one would have, and one process sees the same global batch as two. With several
sources, each window's source is drawn by weight from the same generator (``corpus/mix.py``).

Building the streams (the token cache) belongs to ``core/corpus/``.
"""

from __future__ import annotations

import numpy as np

from llmkit.core.text.mix import mixed_starts


def batch_generator(seed: int, step: int) -> np.random.Generator:
    """The generator of one step's global batch: a pure function of (seed, step) (exact resume)."""
    return np.random.default_rng([seed, step])


def _block(tokens, starts, length: int):
    import torch  # start-up time: the token cache's spawned workers import this layer without torch

    # (B, length + 1) int64: inputs are [:, :-1], targets [:, 1:]
    block = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(block)
    return t[:, :-1], t[:, 1:]


def train_batch(tokens, batch_size: int, context: int, rng: np.random.Generator, part: int = 0, parts: int = 1):
    """Micro-batch ``part`` of a global batch of ``parts`` x batch_size random windows:
    x (B, T) and y (B, T), y shifted by one."""
    starts = rng.integers(0, tokens.size - context, size=batch_size * parts)  # the whole global batch
    return _block(tokens, starts[part * batch_size : (part + 1) * batch_size], context)


def mixed_batch(
    streams: list,
    weights: list[float],
    batch_size: int,
    context: int,
    rng: np.random.Generator,
    part: int = 0,
    parts: int = 1,
):
    """:func:`train_batch` over several sources: each window's source drawn by weight."""
    which, starts = mixed_starts([s.size for s in streams], weights, batch_size * parts, context, rng)
    mine = slice(part * batch_size, (part + 1) * batch_size)
    rows = [np.asarray(streams[w][s : s + context + 1], dtype=np.int64) for w, s in zip(which[mine], starts[mine])]
    import torch  # start-up time: the token cache's spawned workers import this layer without torch

    t = torch.from_numpy(np.stack(rows))  # (B, context + 1)
    return t[:, :-1], t[:, 1:]


def eval_batches(tokens, batch_size: int, context: int, n_batches: int):
    """A fixed, evenly spread set of validation windows: the same at every evaluation."""
    length = min(context, tokens.size - 1)
    n = min(n_batches * batch_size, tokens.size - length)
    starts = np.unique(np.linspace(0, tokens.size - length - 1, num=max(n, 1)).astype(np.int64))
    for i in range(0, starts.size, batch_size):
        yield _block(tokens, starts[i : i + batch_size], length)
