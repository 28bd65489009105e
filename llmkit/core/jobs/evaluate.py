"""``llmkit eval``: a checkpoint's own task measured on a file.

- language model, on text: loss per token, perplexity and bits per byte over the whole file;
- classifier, on labelled rows: loss, accuracy, macro-F1, per-class scores, confusion matrix;
- translator, on src/tgt pairs: chrF and BLEU of greedy translations, plus the reference loss;
- instruct model, on prompt/response pairs: exact match and token F1 of greedy answers (the
  extractive-QA scores), plus the response loss;
- embedding model (or any model with ``retrieval``), on query/positive pairs or bitext: recall@1/@10,
  MRR@10 and nDCG@10 of exact search over the pairs' passages (and ``corpus``, distractors).

The task, its fields and template come from the checkpoint; a field can be renamed for one file.
Several files of examples are measured together (and each apart). Generated outputs can stream to
a JSON-lines file as they are decoded (``outputs``); an evaluation stopped half-way continues from
that file (``resume``) without decoding again what it holds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.core.config import DataConfig, embed_settings
from llmkit.core.errors import ConfigError
from llmkit.core.files.corpus import resolve_files
from llmkit.core.interop.resolve import open_model
from llmkit.core.jobs.embed import ItemSource
from llmkit.core.tasks.metrics import bits_per_byte
from llmkit.core.tasks.objectives import (
    classification_report,
    classify_texts,
    decode_responses,
    pair_loss,
    response_scores,
)
from llmkit.core.tasks.retrieval import RetrievalSet, encode_set, retrieval_report
from llmkit.core.tasks.zeroshot import label_scores
from llmkit.core.text.examples import ExampleSet, drop_unseen, pair_sequence, read_examples
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


def _previous_outputs(path: Path, items: list) -> dict[int, str]:
    """The outputs an earlier, stopped evaluation wrote to ``path``, by example index; a line cut
    by the stop is dropped (and the file truncated before it), anything else that does not match
    these examples is refused."""
    done: dict[int, str] = {}
    lines = path.read_bytes().split(b"\n")
    keep = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            if n >= len(lines) - 1:  # the last line, cut by the stop: decoded again
                break
            raise ConfigError(f"{path}: line {n} is damaged; choose another --outputs file") from None
        i = row.get("index")
        if not isinstance(i, int) or not 0 <= i < len(items) or row.get("prompt") != items[i].prompt:
            raise ConfigError(f"{path}: line {n} holds the output of another example; choose another --outputs file")
        done[i] = row.get("output", "")
        keep += len(raw) + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return done


def evaluate_checkpoint(
    checkpoint: Path,
    data: list[str],
    *,
    fields: dict[str, str | None] | None = None,
    batch_size: int = 16,
    limit: int = 0,
    device="cpu",
    outputs: Path | None = None,
    resume: bool = False,
    zero_shot: dict[str, Any] | None = None,
    retrieval: dict[str, Any] | None = None,
    on_progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The checkpoint's task metrics on ``data``; ``limit`` caps the examples (0: all).

    For translation and instruct models, ``outputs`` receives one JSON line per example as it is
    decoded (index, file, line, prompt, output, reference); with ``resume`` an existing file is
    continued, otherwise it must not exist. ``on_progress`` hears a line per decoded batch.

    ``zero_shot`` ({labels, template, normalize}) measures a language model as a classifier of
    labelled rows, each label scored by its likelihood (``tasks.zeroshot``).

    ``retrieval`` ({center, corpus, pooling}) measures any model as an encoder of query/passage pairs (an
    embedding checkpoint is always measured so): ``center`` removes the corpus mean from the
    vectors, ``corpus`` adds the texts of these files to the passages searched."""
    if outputs is not None and outputs.exists() and not resume:
        raise ConfigError(f"{outputs} exists: pass --resume to continue that evaluation, or choose another file")
    model, ckpt = open_model(checkpoint, device)
    tok, task = ckpt.tokenizer, ckpt.task
    given = {k: v for k, v in (fields or {}).items() if v is not None}
    if zero_shot is not None:
        if task.kind == "classify":
            raise ConfigError("--labels scores labels with a language model; this classifier has its own labels")
        task = replace(task, kind="classify", labels=tuple(zero_shot["labels"]))
    if retrieval is not None and task.kind not in ("embed", "lm"):
        raise ConfigError(f"--retrieval measures a model's vectors; this {task.kind} checkpoint has its own task")
    if retrieval is not None or task.kind == "embed":
        # A language model's vectors are its mean-pooled states (as `encode` pools by default).
        own = task.pooling if task.kind == "embed" else "mean"
        task = replace(task, kind="embed", pooling=(retrieval or {}).get("pooling") or own)
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
        items, origin, blank = [], [], 0
        for name in data:  # several files are measured together; each one's share is reported too
            examples = read_examples(Path(name), task)
            items += examples.examples
            origin += [name] * len(examples.examples)
            blank += examples.blank
        report["blank"] = blank
        if limit:
            items, origin = items[:limit], origin[:limit]
        if task.kind == "embed":
            how = retrieval or {}
            extra = [t for path in how.get("corpus") or [] for t in ItemSource.from_file(Path(path))]
            rset = RetrievalSet.from_examples(items, extra)
            on_progress(f"encoding {len(rset.queries)} queries and {len(rset.corpus)} passages")
            settings = embed_settings(task)
            queries, corpus = encode_set(model, tok, rset, settings, batch_size=batch_size, device=device)
            center = bool(how.get("center"))
            scores = retrieval_report(queries, corpus, rset, center=center)
            return {**report, **scores, "pooling": settings.pooling, "center": center}
        if task.kind == "classify":
            kept, unseen = drop_unseen(ExampleSet(Path(data[0]), items, blank), task.labels)
            items = kept.examples
            index = {label: i for i, label in enumerate(task.labels)}
            texts = [e.text for e in items]
            if zero_shot is not None:
                how = {k: zero_shot[k] for k in ("template", "normalize")}
                logits, cut = label_scores(model, tok, texts, list(task.labels), **how, batch_size=batch_size,
                                           device=device)  # fmt: skip
                report["zero_shot"] = how
            else:
                logits, cut = classify_texts(model, tok, texts, pooling=task.pooling, batch_size=batch_size,
                                             device=device)  # fmt: skip
            out = classification_report(logits, [index[e.label] for e in items], task.labels)
            out["loss"] = out.pop("val_loss")
            return {**report, **out, "unseen": dict(unseen), "truncated": cut}
        return {**report, **_generated(model, tok, task, items, origin, data, batch_size, device, outputs, on_progress)}


def _generated(model, tok, task, items, origin, data, batch_size, device, outputs, on_progress) -> dict[str, Any]:
    """A translator's or instruct model's scores: the loss of the references, then greedy outputs
    (streamed to ``outputs``, those it already holds kept) scored against them, per file too."""
    seqs = [pair_sequence(tok, task.prompt_template, e.turns, model.cfg.context) for e in items]
    loss = pair_loss(model, seqs, mask_prompt=task.mask_prompt, batch_size=batch_size, device=device)
    done = _previous_outputs(outputs, items) if outputs is not None and outputs.exists() else {}
    progress = _Progress(len(items), len(done), on_progress)

    def stream(batch: list[tuple[int, str]]) -> None:
        if outputs is not None:  # appended and flushed per batch: a stop loses one batch at most
            rows = [{"index": i, "file": origin[i], "line": items[i].line, "prompt": items[i].prompt,
                     "output": text, "reference": items[i].response} for i, text in batch]  # fmt: skip
            with outputs.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        progress(len(batch))

    on_progress(f"decoding {len(items) - len(done)} prompts" + (f" ({len(done)} already in {outputs})" if done else ""))
    hyps = decode_responses(model, tok, task.prompt_template, items, max_new_tokens=task.max_new_tokens,
                            batch_size=batch_size, device=device, done=done, on_batch=stream)  # fmt: skip
    refs = [e.response for e in items]
    out: dict[str, Any] = {}
    if len(data) > 1:
        out["per_file"] = {
            name: {
                "examples": len(mine),
                **response_scores(task.kind, [hyps[i] for i in mine], [refs[i] for i in mine]),
            }
            for name in data
            if (mine := [i for i, f in enumerate(origin) if f == name])
        }
    return {
        **out,
        "examples": len(items),
        "resumed": len(done),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        **response_scores(task.kind, hyps, refs),
        "truncated": sum(s.truncated for s in seqs),
        "outputs": [{"prompt": e.prompt, "output": h, "reference": e.response} for e, h in zip(items, hyps)],
    }


class _Progress:
    """A line per decoded batch: examples done, rate and time left (at most every 10 s after the first)."""

    def __init__(self, total: int, done: int, say: Callable[[str], None]):
        self.total, self.done, self.say = total, done, say
        self.start, self.fresh, self.last = time.monotonic(), 0, 0.0

    def __call__(self, n: int) -> None:
        self.done, self.fresh = self.done + n, self.fresh + n
        now = time.monotonic()
        if self.done < self.total and now - self.last < 10 and self.last:
            return
        self.last = now
        rate = self.fresh / max(now - self.start, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        self.say(f"decoded {self.done}/{self.total} ({rate:.2f} examples/s, {left:.0f} s left)")
