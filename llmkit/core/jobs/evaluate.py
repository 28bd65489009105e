"""``llmkit eval``: a checkpoint's own task measured on a file.

- language model, on text: loss per token, perplexity and bits per byte over the whole file;
- classifier, on labelled rows: loss, accuracy, macro-F1, per-class scores, confusion matrix;
- translator, on src/tgt pairs: chrF and BLEU of greedy translations, plus the reference loss;
- instruct model, on prompt/response pairs: exact match and token F1 of greedy answers (the
  extractive-QA scores), plus the response loss.

The task, its fields and template come from the checkpoint; a field can be renamed for one file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.core.config import DataConfig
from llmkit.core.errors import ConfigError
from llmkit.core.files.corpus import resolve_files
from llmkit.core.interop.resolve import open_model
from llmkit.core.tasks.metrics import bits_per_byte
from llmkit.core.tasks.objectives import (
    classification_report,
    classify_texts,
    decode_responses,
    pair_loss,
    response_scores,
)
from llmkit.core.text.examples import drop_unseen, pair_sequence, read_examples
from llmkit.core.text.token_cache import Source, load_source
from llmkit.core.training.loop import mean_token_loss


def _lm_windows(stream: np.ndarray, context: int, batch_size: int):
    """Non-overlapping windows covering the stream once: every token is predicted exactly once."""
    starts = list(range(0, max(stream.size - 1, 1), context))
    for i in range(0, len(starts), batch_size):
        rows = [stream[s : s + context + 1] for s in starts[i : i + batch_size]]
        T = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            t = torch.from_numpy(r.astype(np.int64))
            x[b, : len(r) - 1], y[b, : len(r) - 1] = t[:-1], t[1:]
        yield x, y


def evaluate_checkpoint(
    checkpoint: Path,
    data: list[str],
    *,
    fields: dict[str, str | None] | None = None,
    batch_size: int = 16,
    limit: int = 0,
    device="cpu",
    on_progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The checkpoint's task metrics on ``data``; ``limit`` caps the examples (0: all)."""
    model, ckpt = open_model(checkpoint, device)
    tok, task = ckpt.tokenizer, ckpt.task
    given = {k: v for k, v in (fields or {}).items() if v is not None}
    if given:
        task = replace(task, **given)
    context = model.cfg.context
    report: dict[str, Any] = {"checkpoint": str(ckpt.path), "task": task.kind, "data": [str(d) for d in data]}
    with torch.inference_mode():
        if task.kind == "lm":
            # Streamed into the token cache like a corpus (every document, none held out or dropped).
            tokens_of = load_source(Source(resolve_files(data), split="train"), tok, DataConfig(dedup=False))
            stream, n_bytes = tokens_of.train, tokens_of.meta["bytes"]
            loss, tokens, se = mean_token_loss(model, _lm_windows(stream, context, batch_size), device)
            return {
                **report,
                "tokens": tokens,
                "bytes": n_bytes,
                "loss": loss,
                "loss_se": se,
                "perplexity": math.exp(min(loss, 50)),
                "bits_per_byte": bits_per_byte(loss, tokens, n_bytes),
            }
        if len(data) != 1:
            raise ConfigError(f"a {task.kind} checkpoint is measured on one file of examples (got {len(data)})")
        examples = read_examples(Path(data[0]), task)
        report["blank"] = examples.blank
        if task.kind == "classify":
            examples, unseen = drop_unseen(examples, task.labels)
            items = examples.examples[:limit] if limit else examples.examples
            index = {label: i for i, label in enumerate(task.labels)}
            logits, cut = classify_texts(
                model, tok, [e.text for e in items], pooling=task.pooling, batch_size=batch_size, device=device
            )
            out = classification_report(logits, [index[e.label] for e in items], task.labels)
            out["loss"] = out.pop("val_loss")
            return {**report, **out, "unseen": dict(unseen), "truncated": cut}
        items = examples.examples[:limit] if limit else examples.examples
        seqs = [pair_sequence(tok, task.prompt_template, e.turns, context) for e in items]
        loss = pair_loss(model, seqs, mask_prompt=task.mask_prompt, batch_size=batch_size, device=device)
        on_progress(f"decoding {len(items)} prompts")
        hyps = decode_responses(
            model,
            tok,
            task.prompt_template,
            items,
            max_new_tokens=task.max_new_tokens,
            batch_size=batch_size,
            device=device,
        )
        scores = response_scores(task.kind, hyps, [e.response for e in items])
        return {
            **report,
            "examples": len(items),
            "loss": loss,
            "perplexity": math.exp(min(loss, 50)),
            **scores,
            "truncated": sum(s.truncated for s in seqs),
            "outputs": [{"prompt": e.prompt, "output": h, "reference": e.response} for e, h in zip(items, hyps)],
        }
