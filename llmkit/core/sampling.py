"""Pure functions on logits: temperature, top-k, and drawing the next token.

Order of application: temperature, then top-k, then sampling from the renormalised rest.
Temperature 0 means greedy (argmax). Every function takes logits (B, V) and returns (B, V) or (B,).
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the boundary kept); the rest become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def next_token(logits: torch.Tensor, *, temperature: float, top_k: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy when temperature is 0, else filtered sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_filter(apply_temperature(logits, temperature), top_k)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
