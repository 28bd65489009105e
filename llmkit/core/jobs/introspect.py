"""Looking inside a model on one text: its tokens, its attention, its surprise, its logit lens.

Every view is numbers first (plain dataclasses, JSON-ready); ``core/jobs/pictures.py`` draws them.

- ``tokens``: the text cut into pieces, ids, byte-fallback pieces marked, characters per token;
- ``attention``: every layer's and head's attention probabilities (softmax(q·k/√d) under the
  causal mask, recomputed from the block's own projections and rotary positions), with each
  head's mean attention distance and entropy — the numbers that point at "previous-token" heads
  (distance ≈ 1) and "beginning-of-text" heads (mass on position 0);
- ``surprise``: each token's probability under the model given what precedes it, its surprisal in
  bits and the most likely alternatives; the mean surprisal in nats is the text's loss;
- ``logit_lens``: at each position, the token every layer would predict if the final norm and the
  LM head were applied to its hidden state — how the prediction forms through the depth;
- ``embedding_map``: a 2-D PCA of vectors (``llmkit encode``'s), and how often a point's nearest
  neighbour shares its label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmkit.core.errors import ConfigError, DataError


def model_ids(tok, text: str, context: int) -> list[int]:
    """The ids the model reads for ``text`` (refused when empty or longer than its context)."""
    if not text.strip():
        raise DataError("nothing to inspect: the text is empty")
    ids = tok.encode_text(text)
    if len(ids) > context:
        raise DataError(f"the text is {len(ids)} tokens, over the model's context of {context}: give a shorter one")
    return ids


# --- tokens -----------------------------------------------------------------------------------------


@dataclass
class Tokens:
    ids: list[int]
    pieces: list[str]
    byte_fallback: list[bool]
    chars_per_token: float


def tokens(tok, text: str) -> Tokens:
    ids = tok.encode(text)
    if not ids:
        raise DataError("nothing to inspect: the text is empty")
    return Tokens(ids, [tok.token_text(i) for i in ids], [tok.is_byte(i) for i in ids], len(text) / len(ids))


# --- attention --------------------------------------------------------------------------------------


@dataclass
class Attention:
    pieces: list[str]
    weights: np.ndarray
    """(layers, heads, T, T): row i is how position i spreads its attention over positions 0..i."""
    distance: np.ndarray
    """(layers, heads): mean |i - j| under each row's attention (1 for a previous-token head)."""
    entropy: np.ndarray
    """(layers, heads): mean entropy of the rows, in bits (0: all on one token)."""
    first: np.ndarray
    """(layers, heads): mean attention on position 0 (the beginning-of-text heads)."""

    def heads(self) -> list[dict[str, Any]]:
        L, H = self.distance.shape
        return [
            {
                "layer": layer,
                "head": h,
                "distance": float(self.distance[layer, h]),
                "entropy": float(self.entropy[layer, h]),
                "first": float(self.first[layer, h]),
            }
            for layer in range(L)
            for h in range(H)
        ]


def notable_heads(att: Attention) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head that best attends to the previous token (mean distance nearest 1, sharp), and the
    one that puts most of its attention on the first token (a "sink")."""
    heads = att.heads()
    previous = min(heads, key=lambda x: abs(x["distance"] - 1) + x["entropy"] / 10)
    first = max(heads, key=lambda x: x["first"])
    return previous, first


def load_vectors(path) -> np.ndarray:
    """Vectors saved by ``llmkit encode`` (.npy), never unpickled."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a .npy array of vectors ({e})") from None
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise DataError(f"{path}: not a (rows, dimensions) array of numbers (shape {vectors.shape}, {vectors.dtype})")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: row {bad[0]} holds NaN or infinity ({bad.size} such rows): no map can place it")
    return vectors


@torch.inference_mode()
def attention(model, tok, text: str) -> Attention:
    ids = model_ids(tok, text, model.cfg.context)
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    T = x.size(1)
    # The model's own pieces: each layer's rotary table and mask (a windowed layer's shows its window).
    ropes, masks = model.layer_inputs(T, 0, T, None, None, x.device)
    h = model.embeddings(x)  # (1, T, C)
    maps = []
    for block in model.blocks:
        rope, mask = ropes[block.windowed], masks[block.windowed]
        q, k, _ = block.attn.project(block.attn_norm(h), rope)  # (1, H, T, D), (1, G, T, D)
        maps.append(block.attn.probabilities(q, k, mask)[0])  # (H, T, T)
        h = block(h, rope, mask)  # the block's own forward carries the state on
    w = torch.stack(maps).cpu().numpy()  # (L, H, T, T)
    pos = np.arange(T)
    dist = np.abs(pos[:, None] - pos[None, :])  # (T, T)
    distance = (w * dist).sum(-1).mean(-1)  # (L, H)
    entropy = -(w * np.log2(np.clip(w, 1e-30, 1))).sum(-1).mean(-1)  # (L, H)
    first = w[..., 1:, 0].mean(-1) if T > 1 else w[..., 0]  # position 0 attends to itself: left out
    return Attention([tok.token_text(i) for i in ids], w, distance, entropy, first)


# --- surprise ---------------------------------------------------------------------------------------


@dataclass
class Surprise:
    pieces: list[str]
    prob: list[float]
    """p(token i | tokens before it), for tokens 1..T-1 (the first has no prefix)."""
    bits: list[float]
    top: list[list[tuple[str, float]]]
    mean_nats: float
    """The mean -log p: the text's next-token loss, as ``llmkit eval`` computes it."""


@torch.inference_mode()
def surprise(model, tok, text: str, top: int = 5) -> Surprise:
    ids = model_ids(tok, text, model.cfg.context)
    if len(ids) < 2:
        raise DataError("the text is one token: there is nothing to predict")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # (T-1, V): position i predicts token i+1
    target = x[0, 1:]
    chosen = logp.gather(1, target[:, None])[:, 0]  # (T-1,)
    alt_p, alt_i = logp.exp().topk(min(top, logp.size(-1)), dim=-1)  # (T-1, k)
    return Surprise(
        [tok.token_text(i) for i in ids],
        chosen.exp().tolist(),
        (-chosen / math.log(2)).tolist(),
        [
            [(tok.token_text(int(i)), float(p)) for i, p in zip(ii, pp)]
            for ii, pp in zip(alt_i.tolist(), alt_p.tolist())
        ],
        float(-chosen.mean()),
    )


# --- logit lens -------------------------------------------------------------------------------------


@dataclass
class LogitLens:
    pieces: list[str]
    predicted: list[list[str]]
    """[layer][position]: the token layer l's state would predict at each position (layer 0: the
    embeddings; the last: the model's own prediction)."""
    prob: np.ndarray
    """(layers + 1, T): the probability of that prediction."""
    final_logits: np.ndarray = field(repr=False, default=None)
    """(T, V): the last layer's logits through the lens (equal to the model's own)."""


@torch.inference_mode()
def logit_lens(model, tok, text: str) -> LogitLens:
    ids = model_ids(tok, text, model.cfg.context)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    predicted, probs, last = [], [], None
    for layer in range(model.cfg.n_layer + 1):
        h = model.hidden_states(x, layer=layer)  # (1, T, C); the final layer's already normalised
        logits = model.lm_head(h if layer == model.cfg.n_layer else model.norm(h))[0].float()  # (T, V)
        p, i = torch.softmax(logits, -1).max(-1)  # (T,) each
        predicted.append([tok.token_text(int(t)) for t in i])
        probs.append(p.cpu().numpy())
        last = logits
    return LogitLens([tok.token_text(i) for i in ids], predicted, np.stack(probs), last.cpu().numpy())


# --- embeddings -------------------------------------------------------------------------------------


@dataclass
class EmbeddingMap:
    points: np.ndarray
    """(N, 2): the vectors projected on their first two principal components."""
    labels: list[str]
    neighbour_agreement: float | None
    """Share of points whose nearest neighbour (cosine, in the full space) has the same label."""
    explained: tuple[float, float]
    """Share of the variance along each of the two axes."""


def embedding_map(vectors: np.ndarray, labels: list[str] | None = None, method: str = "pca") -> EmbeddingMap:
    """The 2-D map: PCA (always there), or UMAP (``method='umap'``, with the optional umap-learn)."""
    if method not in ("pca", "umap"):
        raise ConfigError(f"--method must be pca or umap, not {method!r}")
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 3:
        raise DataError(f"an embedding map needs at least 3 vectors of one size, got an array of shape {v.shape}")
    if labels is not None and len(labels) != v.shape[0]:
        raise ConfigError(f"{len(labels)} labels for {v.shape[0]} vectors: give one label per vector")
    centred = v - v.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T  # (N, 2)
    var = s**2 / max((s**2).sum(), 1e-30)
    if method == "umap":
        try:
            import umap  # optional dependency (umap-learn)
        except ImportError:
            raise ConfigError(
                "--method umap needs the umap-learn package (pip install umap-learn); PCA needs nothing"
            ) from None
        points = umap.UMAP(n_components=2, random_state=0, n_neighbors=min(15, v.shape[0] - 1)).fit_transform(v)
        var = np.array([0.0, 0.0])  # no share of variance for a non-linear map
    agreement = None
    if labels is not None:
        unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        nearest = sim.argmax(1)
        agreement = float(np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]))
    return EmbeddingMap(points, list(labels or []), agreement, (float(var[0]), float(var[1]) if len(var) > 1 else 0.0))
