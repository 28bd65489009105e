"""Pure functions on logits: penalties, temperature, top-k, top-p, min-p, and the next token.

Every function takes logits (B, V) — one row per sequence being decoded — and returns new logits
(B, V), or token ids (B,). They apply in this order (``process_logits``):

1. repetition penalty (CTRL, Keskar et al. 2019): a token already in the sequence has its logit
   divided by the penalty when positive, multiplied when negative;
2. presence and frequency penalties (as in OpenAI's API): subtract ``presence`` once for every
   token already present and ``frequency`` times its count;
3. no-repeat-n-gram: a token that would complete an n-gram already in the sequence is banned;
4. temperature: logits / t (0 means greedy: the arg-max of the penalised logits);
5. top-k: keep the k most likely tokens;
6. top-p (nucleus, Holtzman et al. 2019): keep the smallest set whose probability reaches p;
7. min-p (Nguyen et al. 2024): keep tokens at least min_p times as likely as the most likely one.

Filters 5–7 see the temperature-scaled distribution, so a hot temperature widens what they keep.
"""

from __future__ import annotations

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.errors import CheckpointError

NEG_INF = float("-inf")


def token_counts(history: torch.Tensor, valid: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """history (B, L) ids, valid (B, L) bool -> counts (B, V) of each token in each row."""
    counts = torch.zeros(history.size(0), vocab, dtype=torch.float32, device=history.device)
    ones = torch.ones_like(history, dtype=torch.float32) if valid is None else valid.float()
    return counts.scatter_add_(1, history, ones)


def repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def no_repeat_ngram(logits: torch.Tensor, rows: list[list[int]], n: int) -> torch.Tensor:
    """Ban, per row, every token that would complete an n-gram already present in that row."""
    if n <= 0:
        return logits
    out = logits.clone()
    for b, seq in enumerate(rows):
        if len(seq) < n:
            continue
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if banned:
            out[b, banned] = NEG_INF
    return out


class NGramIndex:
    """The no-repeat-n-gram bans of one row, kept up to date in O(n) per token.

    Equivalent to :func:`no_repeat_ngram` on the whole row, without rescanning it at every step.
    """

    def __init__(self, n: int, seq: list[int]):
        self.n = n
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.tail: list[int] = []
        for t in seq:
            self.add(t)

    def add(self, token: int) -> None:
        self.tail.append(token)
        if len(self.tail) >= self.n:
            self.seen.setdefault(tuple(self.tail[-self.n : -1]), set()).add(token)
        del self.tail[: max(len(self.tail) - self.n, 0)]  # only the last n tokens matter

    def banned(self) -> list[int]:
        key = tuple(self.tail[len(self.tail) - self.n + 1 :]) if self.n > 1 else ()
        return sorted(self.seen.get(key, ())) if len(self.tail) >= self.n - 1 else []


def ban(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Set logits[b, t] to -inf for every t in banned[b]."""
    if not any(banned):
        return logits
    out = logits.clone()
    for b, tokens in enumerate(banned):
        if tokens:
            out[b, tokens] = NEG_INF
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the boundary kept); the rest become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability is at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of the tokens ranked above
    drop_sorted = mass_before >= p  # the first token is always kept (mass before it is 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def check_logits(logits: torch.Tensor) -> None:
    """Refuse logits no distribution can come from: NaN or +inf anywhere, or a row with no finite
    value. They come from a broken model (trained to divergence, damaged weights), never from a
    setting, and sampling from them would fail deep inside torch or return garbage."""
    # One reduction on the decoding hot path: a row's max is NaN if any value is NaN (max propagates
    # it), +inf if any is, and -inf only when no value is finite.
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        raise CheckpointError(
            "the model produced NaN or infinite scores: its weights are broken (was it trained "
            "until the loss diverged?); use an earlier checkpoint"
        )


def process_logits(
    logits: torch.Tensor, s: SampleConfig, *, counts: torch.Tensor | None = None, banned: list[list[int]] | None = None
) -> torch.Tensor:
    """All of the above in the documented order; the result is what gets sampled (or arg-maxed).

    ``counts`` (B, V) are the token counts of each row so far (penalties); ``banned`` lists each
    row's no-repeat-n-gram bans (from :class:`NGramIndex`).
    """
    logits = logits.float()
    check_logits(logits)
    if counts is not None:
        logits = repetition_penalty(logits, counts, s.repetition_penalty)
        logits = presence_frequency_penalty(logits, counts, s.presence_penalty, s.frequency_penalty)
    if banned is not None:
        logits = ban(logits, banned)
    if s.temperature == 0:
        return logits
    logits = apply_temperature(logits, s.temperature)
    logits = top_k_filter(logits, s.top_k)
    logits = top_p_filter(logits, s.top_p)
    return min_p_filter(logits, s.min_p)


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Processed logits (B, V) -> ids (B,): arg-max when temperature is 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> ids (B,) without history-based penalties."""
    s = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return pick(process_logits(logits, s), temperature, generator)
