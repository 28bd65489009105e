"""Texts as vectors for search: encoding, exact ranking, retrieval metrics, and the contrastive
task that trains an embedding model (``finetune --task embed``).

- ``embed_items``: texts -> pooled vectors (N, C), each text behind its prefix, batched by length;
  ``encode``, the server and the evaluations below all encode through it.
- ``RetrievalSet``: queries, a corpus and which documents answer which query. A pairs file is one
  as it is: its positives (and negatives) are the corpus, each text once.
- ``top_k``: exact cosine ranking, in blocks of queries (memory bounded by the block).
- ``retrieval_scores``: recall@1/@10, MRR@10, nDCG@10 (binary relevance), averaged over queries.
- ``reciprocal_rank_fusion``: one ranking from several (BM25 and dense, say).
- ``info_nce`` and ``EmbedTask``: every query against every passage of its batch (InfoNCE with
  in-batch negatives, hard negatives appended), a passage equal to the query's own positive never
  counted as a negative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.core.config import EmbedConfig, RunConfig
from llmkit.core.model.heads import pooled_hidden
from llmkit.core.tasks.objectives import batch_order
from llmkit.core.text.examples import Example

# --- encoding --------------------------------------------------------------------------------------


def text_rows(tokenizer, texts: Sequence[str], limit: int, prefix: str = "") -> tuple[list[list[int]], list[int]]:
    """Token rows of ``prefix + text`` (BOS first where the model expects it), cut to ``limit``;
    and each one's length before the cut."""
    bos = [tokenizer.bos_id] if tokenizer.expects_bos else []  # as the model saw texts in training
    rows = [bos + r for r in tokenizer.encode_batch([prefix + t for t in texts])]
    return [r[:limit] or [tokenizer.bos_id] for r in rows], [len(r) for r in rows]


@torch.inference_mode()
def embed_batch(model, rows: list[list[int]], s: EmbedConfig, device="cpu") -> torch.Tensor:
    """Token rows -> pooled vectors (B, C); padding on ``s.pad_side``."""
    vec = pooled_hidden(model, rows, pooling=s.pooling, layer=s.layer, side=s.pad_side, device=device)  # (B, C)
    if s.normalize:
        vec = F.normalize(vec, dim=-1)
    return vec


def embed_items(
    model, tokenizer, items: Sequence[str], s: EmbedConfig, *, batch_size: int = 32, device="cpu"
) -> tuple[np.ndarray, int]:
    """Vectors (N, C) for items in input order (each behind ``s.prefix``), and how many items were
    truncated to max_length."""
    limit = min(s.max_length or model.cfg.context, model.cfg.context)
    rows, lengths = text_rows(tokenizer, items, limit, s.prefix)
    truncated = sum(n > limit for n in lengths)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: similar lengths together
    out = np.zeros((len(rows), model.cfg.d_model), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = embed_batch(model, [rows[i] for i in idx], s, device).cpu().numpy()
    return out, truncated


def as_query(s: EmbedConfig) -> EmbedConfig:
    """The settings a search query is encoded with: the index's, behind the query prefix."""
    return replace(s, prefix=s.query_prefix)


# --- a retrieval set and its measurement -----------------------------------------------------------


@dataclass
class RetrievalSet:
    """Queries, the corpus searched, and the corpus rows that answer each query."""

    queries: list[str]
    corpus: list[str]
    relevant: list[frozenset[int]]

    @classmethod
    def from_examples(cls, examples: Sequence[Example], extra: Sequence[str] = ()) -> RetrievalSet:
        """Each example's positives answer its query; the corpus is every positive and negative (and
        ``extra`` distractors), each distinct text once, in first-seen order."""
        rows: dict[str, int] = {}
        for text in [t for e in examples for t in (*e.positives, *e.negatives)] + list(extra):
            rows.setdefault(text, len(rows))
        relevant = [frozenset(rows[t] for t in e.positives) for e in examples]
        return cls([e.text for e in examples], list(rows), relevant)


def unit_rows(corpus: np.ndarray) -> torch.Tensor:
    """The corpus as unit rows (N, C), fp32: one copy (a memory map is read-only). A caller that
    searches many times (the server) keeps it and passes it to ``top_k``."""
    docs = torch.from_numpy(np.array(corpus, dtype=np.float32))
    return docs / docs.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.autocast("cpu", enabled=False)  # scores in fp32 even when called inside a bf16 training step
def top_k(
    queries: np.ndarray, corpus: np.ndarray | torch.Tensor, k: int, *, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search: scores and corpus rows (Q, k) of each query's k nearest, best first.
    ``corpus`` is vectors, or ``unit_rows`` of them made once. Queries go in blocks so the score
    matrix held is (block, N), whatever the number of queries."""
    docs = corpus if isinstance(corpus, torch.Tensor) else unit_rows(corpus)  # (N, C)
    k = min(k, docs.size(0))
    scores, rows = [], []
    for start in range(0, len(queries), block):
        q = F.normalize(torch.from_numpy(np.array(queries[start : start + block], dtype=np.float32)), dim=-1)
        s, i = (q @ docs.T).topk(k, dim=-1)  # (b, N) -> (b, k)
        scores.append(s.numpy())
        rows.append(i.numpy())
    return np.concatenate(scores), np.concatenate(rows)


def retrieval_scores(ranked: Sequence[Sequence[int]], relevant: Sequence[frozenset[int]]) -> dict[str, float]:
    """recall@1, recall@10 (share of a query's relevant rows in its top k), MRR@10 (1 / rank of the
    first relevant row, 0 past 10) and nDCG@10 (binary gains, log2 discount), averaged over queries."""
    totals = dict.fromkeys(("recall@1", "recall@10", "mrr@10", "ndcg@10"), 0.0)
    for ranking, rel in zip(ranked, relevant):
        hits = [row in rel for row in list(ranking)[:10]]
        totals["recall@1"] += sum(hits[:1]) / len(rel)
        totals["recall@10"] += sum(hits) / len(rel)
        first = next((i for i, h in enumerate(hits) if h), None)
        totals["mrr@10"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(1.0 / math.log2(i + 2) for i, h in enumerate(hits) if h)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), 10)))
        totals["ndcg@10"] += dcg / ideal
    return {name: value / max(len(relevant), 1) for name, value in totals.items()}


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Sequence[int]]], k: int = 60) -> list[list[int]]:
    """One ranking per query from several systems' rankings: each row scores sum(1 / (k + rank))
    over the systems that returned it (Cormack et al., 2009). It reads ranks only, so BM25's
    unbounded scores and cosine similarities need no common scale; k = 60 damps the top ranks."""
    fused = []
    for per_system in zip(*rankings):
        score: dict[int, float] = {}
        for ranking in per_system:
            for rank, row in enumerate(ranking, 1):
                score[int(row)] = score.get(int(row), 0.0) + 1.0 / (k + rank)
        fused.append(sorted(score, key=lambda row: (-score[row], row)))
    return fused


def encode_set(
    model, tok, rset: RetrievalSet, s: EmbedConfig, *, batch_size: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """Query vectors (Q, C) and corpus vectors (N, C) of a retrieval set, each behind its prefix."""
    queries, _ = embed_items(model, tok, rset.queries, as_query(s), batch_size=batch_size, device=device)
    corpus, _ = embed_items(model, tok, rset.corpus, s, batch_size=batch_size, device=device)
    return queries, corpus


@torch.autocast("cpu", enabled=False)
def retrieval_report(
    queries: np.ndarray,
    corpus: np.ndarray,
    rset: RetrievalSet,
    *,
    center: bool = False,
    temperature: float | None = None,
) -> dict[str, Any]:
    """The metrics of exact search over a set's vectors. ``center`` removes the corpus mean from
    both sides first: a decoder's mean-pooled states share one dominant direction that makes every
    cosine near 1. With ``temperature``, also the contrastive loss of each query's first relevant
    row against the whole corpus (``val_loss``)."""
    if center:
        mean = corpus.mean(0, keepdims=True)  # (1, C)
        queries, corpus = queries - mean, corpus - mean
    scores, ranked = top_k(queries, corpus, 10)
    out: dict[str, Any] = {
        **retrieval_scores(ranked.tolist(), rset.relevant),
        "queries": len(rset.queries),
        "corpus": len(rset.corpus),
        "top1_score": float(scores[:, 0].mean()),
        "spread@10": float((scores[:, 0] - scores[:, -1]).mean()),
    }
    if temperature is not None:
        q = F.normalize(torch.from_numpy(queries), dim=-1)
        d = F.normalize(torch.from_numpy(corpus), dim=-1)
        gold = torch.tensor([min(rel) for rel in rset.relevant])
        out["val_loss"] = F.cross_entropy(q @ d.T / temperature, gold).item()
    return out


# --- training ---------------------------------------------------------------------------------------


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None = None,
    *,
    temperature: float,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive loss of unit vectors: query i against passages [p; n], its own p_i the answer.

    q (B, C), p (B, C), n (M, C) hard negatives or None; ``same`` (B, B) bool marks p_j equal to
    p_i as a text (two questions on one paragraph): such a p_j is not a negative for query i."""
    candidates = p if n is None else torch.cat([p, n])  # (B + M, C)
    logits = (q @ candidates.T).float() / temperature  # (B, B + M)
    B = q.size(0)
    if same is not None:
        others = same & ~torch.eye(B, dtype=torch.bool, device=same.device)  # (B, B)
        logits[:, :B] = logits[:, :B].masked_fill(others, float("-inf"))
    return F.cross_entropy(logits, torch.arange(B, device=q.device))


class EmbedTask:
    """Query -> passage pairs trained with InfoNCE; validated by retrieval over the dev set's
    passages (nDCG@10 picks best/ by default)."""

    def __init__(self, train: list[Example], dev: list[Example], cfg: RunConfig, tok, device):
        self.cfg, self.tok, self.device = cfg, tok, device
        task, limit = cfg.task, cfg.model.context
        self.queries, _ = text_rows(tok, [e.text for e in train], limit, task.query_prefix)
        self.positives, self.lengths = text_rows(tok, [e.positives[0] for e in train], limit, task.passage_prefix)
        self.negatives = [text_rows(tok, list(e.negatives), limit, task.passage_prefix)[0] for e in train]
        ids: dict[str, int] = {}
        self.group = [ids.setdefault(e.positives[0], len(ids)) for e in train]  # same passage, same group
        self.dev = RetrievalSet.from_examples(dev)
        self.settings = EmbedConfig(
            pooling=task.pooling, normalize=True, prefix=task.passage_prefix, query_prefix=task.query_prefix
        )
        self.order = batch_order([len(r) for r in self.positives], cfg, labelled=True)  # random in-batch negatives

    def batch_tokens(self, batch_size: int) -> int:
        """Queries, positives and (one each) negatives, each padded to its longest."""
        negatives = [len(r) for rows in self.negatives for r in rows]
        return batch_size * (max(map(len, self.queries)) + max(map(len, self.positives)) + max(negatives, default=0))

    def train_batch(self, step: int, part: int, parts: int):
        B = self.cfg.train.batch_size
        idx = self.order((step * parts + part) * B, B)
        # A row with several hard negatives offers one per step, in turn: (step, row) decides which.
        negatives = [self.negatives[i][step % len(self.negatives[i])] for i in idx if self.negatives[i]]
        # Lists, row by row, so that the first rows of a batch are a batch (the speed probe's slice).
        return [self.queries[i] for i in idx], [self.positives[i] for i in idx], negatives, [self.group[i] for i in idx]

    def _loss(self, model, queries, positives, negatives, group):
        def vectors(rows):
            return F.normalize(pooled_hidden(model, rows, pooling=self.cfg.task.pooling, device=self.device), dim=-1)

        g = torch.tensor(group, device=self.device)
        same = g[:, None] == g[None, :]  # (B, B): the same passage
        n = vectors(negatives) if negatives else None
        return info_nce(vectors(queries), vectors(positives), n, temperature=self.cfg.task.temperature, same=same)

    def loss(self, forward, batch):
        queries, positives, negatives, group = batch
        tokens = sum(map(len, queries)) + sum(map(len, positives)) + sum(map(len, negatives))
        return forward(self._loss, queries, positives, negatives, group), tokens

    def evaluate(self, net):
        B = self.cfg.train.batch_size
        queries, corpus = encode_set(net, self.tok, self.dev, self.settings, batch_size=B, device=self.device)
        return retrieval_report(queries, corpus, self.dev, temperature=self.cfg.task.temperature)
