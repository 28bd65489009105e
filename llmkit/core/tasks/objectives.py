"""The tasks the training loop trains, and the measurements they share with ``llmkit eval``.

- ``LMTask``: next-token prediction on a token cache (pretraining, and fine-tuning ``--task lm``):
  random training windows drawn from (seed, step), a fixed set of validation windows.
- ``ClassifyTask``: texts -> labels through the classification head on the pooled final hidden
  state; validation reports loss, accuracy, macro-F1, per-class precision/recall/F1 and the
  confusion matrix.
- ``PairTask``: prompt -> response (instruct, translate) as next-token prediction on the
  response (the prompt masked out of the loss by default); validation reports the response loss,
  and for translation decodes the dev set greedily for chrF and BLEU; instruct shows samples.

Batches follow a fixed shuffle per epoch drawn from (seed, epoch): the examples of step s,
micro-batch m are a pure function of (seed, s, m), so resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.core.config import RunConfig, SampleConfig
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.model.heads import classify_logits
from llmkit.core.tasks.metrics import accuracy, bleu, chrf, confusion_matrix, exact_match, macro_f1, per_class, token_f1
from llmkit.core.text.batches import batch_generator, eval_batches, mixed_batch, train_batch
from llmkit.core.text.examples import Example, Sequence, classify_ids, encode_prompt
from llmkit.core.text.mix import Corpus
from llmkit.core.training.loop import mean_token_loss, next_token_loss, target_loss

# --- language modelling ---------------------------------------------------------------------------


class LMTask:
    """Next-token prediction on a token cache: random training windows (drawn from each source by
    weight), fixed validation ones (the loss over all, and each source's own when there are several)."""

    def __init__(self, data: Corpus, cfg: RunConfig, device: torch.device):
        self.data, self.cfg, self.device = data, cfg, device

    def batch_tokens(self, batch_size: int) -> int:
        """The most padded tokens a micro-batch holds (what its activations scale with)."""
        return batch_size * self.cfg.model.context

    def train_batch(self, step: int, part: int, parts: int):
        rng = batch_generator(self.cfg.train.seed, step)
        B, T = self.cfg.train.batch_size, self.cfg.model.context
        if len(self.data.parts) == 1:  # the draw single-source runs always made
            return train_batch(self.data.parts[0].train, B, T, rng, part, parts)
        return mixed_batch([p.train for p in self.data.parts], self.data.weights, B, T, rng, part, parts)

    def loss(self, forward, batch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        return forward(next_token_loss, x, y), y.numel()

    def evaluate(self, net):
        B, T, n = self.cfg.train.batch_size, self.cfg.model.context, self.cfg.train.eval_sample
        losses = {
            name: mean_token_loss(net, eval_batches(tokens, B, T, n), self.device)
            for name, tokens in self.data.val_parts
        }
        if len(losses) == 1:
            only = next(iter(losses.values()))
            return {"val_loss": only.loss, "val_loss_se": only.se}
        total = sum(r.tokens for r in losses.values())
        # Sources are independent samples: the standard errors of their weighted sum add in quadrature.
        se = (
            None
            if any(r.se is None for r in losses.values())
            else math.sqrt(sum((r.tokens / max(total, 1) * r.se) ** 2 for r in losses.values()))
        )
        return {
            "val_loss": sum(r.loss * r.tokens for r in losses.values()) / max(total, 1),
            "val_loss_se": se,
            "val_sources": {name: r.loss for name, r in losses.items()},
        }


# --- shuffling fine-tuning examples ---------------------------------------------------------------


def _span(n: int, start: int, count: int, order) -> list[int]:
    """Positions [start, start + count) of epochs laid end to end, ``order(epoch)`` each."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = min(count - len(out), n - offset)
        out.extend(order(epoch)[offset : offset + take].tolist())
        pos += take
    return out


def epoch_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Example indices at global positions [start, start + count) of the epoch-by-epoch shuffle."""
    return _span(n, start, count, lambda epoch: np.random.default_rng([seed, epoch]).permutation(n))


class BucketedOrder:
    """The epoch-by-epoch shuffle with batches of similar lengths (length bucketing).

    Each epoch's permutation (the one ``epoch_indices`` draws) is cut into buckets of
    ``batches_per_bucket`` batches; inside a bucket the examples are sorted by length and cut into
    batches, and the batches are shuffled. Every example is still seen once per epoch and batches
    still mix the whole training set, but a batch pads to a length close to its own examples':
    on texts of uneven lengths that is most of the padding gone. A pure function of (seed, epoch),
    so resume stays exact.
    """

    def __init__(self, lengths: list[int], seed: int, batch_size: int, batches_per_bucket: int):
        self.lengths, self.seed = np.asarray(lengths), seed
        self.bucket = batch_size * batches_per_bucket
        self.batch = batch_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = len(self.lengths)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            shuffle = np.random.default_rng([self.seed, epoch, 1])
            parts = []
            for start in range(0, n, self.bucket):
                chunk = perm[start : start + self.bucket]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first
                batches = [chunk[i : i + self.batch] for i in range(0, len(chunk), self.batch)]
                parts.extend(batches[i] for i in shuffle.permutation(len(batches)))
            self._epoch, self._order = epoch, np.concatenate(parts) if parts else perm
        return self._order

    def indices(self, start: int, count: int) -> list[int]:
        """Example indices at global positions [start, start + count) of the bucketed epochs."""
        return _span(len(self.lengths), start, count, self.order)


def batch_order(lengths: list[int], cfg: RunConfig, *, labelled: bool = False):
    """How fine-tuning draws its batches: ``indices(start, count)`` of the bucketed order, or of
    the plain shuffle when ``train.length_buckets`` is 0 (-1, the default: 0 for ``labelled``
    examples, 50 otherwise) or the set is under two buckets."""
    B = cfg.train.batch_size
    buckets = cfg.train.length_buckets if cfg.train.length_buckets >= 0 else (0 if labelled else 50)
    # Only on sets of two buckets or more: below that, sorting fixes the batches every epoch, and
    # a small set whose lengths follow its labels would see batches of one label. Classification
    # keeps the plain shuffle by default: on theatre17 buckets cost 0.05 macro-F1 for 12% speed.
    if buckets and len(lengths) >= 2 * B * buckets:
        return BucketedOrder(lengths, cfg.train.seed, B, buckets).indices
    return lambda start, count: epoch_indices(len(lengths), cfg.train.seed, start, count)


def _by_length(rows: list[list[int]], batch_size: int):
    """Index batches of similar lengths (longest first): little padding at evaluation."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# --- classification -------------------------------------------------------------------------------


@torch.no_grad()
def classify_rows(model, rows: list[list[int]], *, pooling: str, batch_size: int, device) -> torch.Tensor:
    """Class logits (N, K) for token rows, in input order."""
    out = None
    for idx in _by_length(rows, batch_size):
        logits = classify_logits(model, [rows[i] for i in idx], pooling=pooling, device=device).float()
        if out is None:
            out = torch.empty(len(rows), logits.size(1))
        out[idx] = logits.cpu()
    return out


def classify_texts(
    model, tok, texts: list[str], *, pooling: str, batch_size: int = 16, device="cpu"
) -> tuple[torch.Tensor, int]:
    """Class logits (N, K) for texts, in input order; and how many were truncated to the context."""
    context = model.cfg.context
    rows, lengths = zip(*(classify_ids(tok, t, context) for t in texts))
    cut = sum(n > context for n in lengths)
    return classify_rows(model, list(rows), pooling=pooling, batch_size=batch_size, device=device), cut


def classification_report(logits: torch.Tensor, gold: list[int], labels: tuple[str, ...]) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class scores and confusion matrix (rows gold, columns predicted)."""
    pred = logits.argmax(-1).tolist()
    idx = list(range(len(labels)))
    return {
        "val_loss": F.cross_entropy(logits, torch.tensor(gold)).item(),
        "accuracy": accuracy(pred, gold),
        "macro_f1": macro_f1(pred, gold, idx),
        "per_class": {labels[i]: s for i, s in per_class(pred, gold, idx).items()},
        "confusion": confusion_matrix(pred, gold, idx),
        "labels": list(labels),
        "examples": len(gold),
    }


class ClassifyTask:
    def __init__(
        self,
        train: tuple[list[list[int]], list[int]],
        dev: tuple[list[list[int]], list[int]],
        labels: tuple[str, ...],
        cfg: RunConfig,
        device,
        class_weights: torch.Tensor | None = None,
    ):
        self.rows, self.y = train
        self.dev_rows, self.dev_y = dev
        self.labels, self.cfg, self.device = labels, cfg, device
        self.weights = class_weights.to(device) if class_weights is not None else None
        self.order = batch_order([len(r) for r in self.rows], cfg, labelled=True)

    def batch_tokens(self, batch_size: int) -> int:
        return batch_size * max(map(len, self.rows))

    def train_batch(self, step: int, part: int, parts: int):
        B = self.cfg.train.batch_size
        idx = self.order((step * parts + part) * B, B)
        return [self.rows[i] for i in idx], torch.tensor([self.y[i] for i in idx])

    def _loss(self, model, rows, y):
        logits = classify_logits(model, rows, pooling=self.cfg.task.pooling, device=self.device)  # (B, K)
        return F.cross_entropy(logits.float(), y, weight=self.weights)

    def loss(self, forward, batch):
        rows, y = batch
        return forward(self._loss, rows, y.to(self.device)), sum(map(len, rows))

    def evaluate(self, net):
        logits = classify_rows(
            net, self.dev_rows, pooling=self.cfg.task.pooling, batch_size=self.cfg.train.batch_size, device=self.device
        )
        return classification_report(logits, self.dev_y, self.labels)


def balanced_weights(y: list[int], n_labels: int) -> torch.Tensor:
    """n / (K * count_k): every class weighs the same in the loss, whatever its frequency."""
    counts = np.bincount(np.asarray(y), minlength=n_labels).astype(np.float64)
    return torch.tensor(len(y) / (n_labels * np.maximum(counts, 1)), dtype=torch.float32)


# --- prompt -> response ---------------------------------------------------------------------------


def pair_batch(seqs: list[Sequence], mask_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) and y (B, T) right-padded; y is -100 on padding and (optionally) on the prompt."""
    T = max(len(s.ids) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids = torch.tensor(s.ids)
        n = len(s.ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = ids[1:]
        if mask_prompt:
            # target j predicts ids[j + 1]: the prompt's own tokens are ids[:n_prompt]
            y[b, : max(s.n_prompt - 1, 0)] = -100
    return x, y


def pair_loss(model, seqs: list[Sequence], *, mask_prompt: bool, batch_size: int, device) -> float:
    """Mean loss per target token of prompt/response sequences, batched by length."""
    batches = (pair_batch([seqs[i] for i in idx], mask_prompt) for idx in _by_length([s.ids for s in seqs], batch_size))
    return mean_token_loss(model, batches, device)[0]


def decode_responses(
    model,
    tok,
    template: str,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    device,
    done: dict[int, str] | None = None,
    on_batch: Callable[[list[tuple[int, str]]], None] | None = None,
) -> list[str]:
    """Greedy responses to each example's prompt (the template applied), in input order.

    ``done`` holds responses already decoded (by index: a resumed evaluation), which are not
    decoded again; ``on_batch`` receives each batch's (index, response) pairs as they come."""
    done = done or {}
    prompts = [encode_prompt(tok, template, e.turns[:-1]) for e in examples]
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    out = [done.get(i, "") for i in range(len(prompts))]
    todo = [i for i in range(len(prompts)) if i not in done]
    for rows in _by_length([prompts[i] for i in todo], batch_size):
        idx = [todo[r] for r in rows]
        texts = decode_batch(model, [prompts[i] for i in idx], cfg, eos_id=tok.eos_id, decode=tok.decode, device=device)
        for i, o in zip(idx, texts):
            out[i] = o.text.strip()
        if on_batch is not None:
            on_batch([(i, out[i]) for i in idx])
    return out


def response_scores(kind: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """chrF and BLEU for translation; exact match and token F1 (in %) for answers."""
    if kind == "translate":
        return {"chrf": chrf(hyps, refs), "bleu": bleu(hyps, refs)}
    n = max(len(refs), 1)
    return {
        "exact_match": 100.0 * sum(exact_match(h, r) for h, r in zip(hyps, refs)) / n,
        "token_f1": 100.0 * sum(token_f1(h, r) for h, r in zip(hyps, refs)) / n,
    }


class PairTask:
    SAMPLES = 3

    def __init__(
        self, train: list[Sequence], dev: list[Sequence], dev_examples: list[Example], cfg: RunConfig, tok, device
    ):
        self.seqs, self.dev, self.dev_examples = train, dev, dev_examples
        self.cfg, self.tok, self.device = cfg, tok, device
        self.order = batch_order([len(s.ids) for s in self.seqs], cfg)

    def batch_tokens(self, batch_size: int) -> int:
        return batch_size * max(len(s.ids) for s in self.seqs)

    def train_batch(self, step: int, part: int, parts: int):
        B = self.cfg.train.batch_size
        idx = self.order((step * parts + part) * B, B)
        seqs = [self.seqs[i] for i in idx]
        return (*pair_batch(seqs, self.cfg.task.mask_prompt), sum(len(s.ids) - 1 for s in seqs))

    def loss(self, forward, batch):
        x, y, n_tokens = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return forward(target_loss, x, y), n_tokens  # throughput counts every real input token

    def evaluate(self, net):
        B = self.cfg.train.batch_size
        val_loss = pair_loss(net, self.dev, mask_prompt=self.cfg.task.mask_prompt, batch_size=B, device=self.device)
        metrics: dict[str, Any] = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        task = self.cfg.task
        n = task.eval_limit if task.kind == "translate" else self.SAMPLES
        chosen = self.dev_examples[:n]
        hyps = decode_responses(
            net,
            self.tok,
            task.prompt_template,
            chosen,
            max_new_tokens=task.max_new_tokens,
            batch_size=B,
            device=self.device,
        )
        if task.kind == "translate":
            metrics.update(response_scores("translate", hyps, [e.response for e in chosen]))
            metrics["decoded"] = len(chosen)
        metrics["samples"] = [
            {"prompt": e.prompt, "output": h, "reference": e.response} for e, h in zip(chosen[: self.SAMPLES], hyps)
        ]
        return metrics
