"""Decoding: one prefill pass over the prompt, then one cached forward pass per new token.

The KV cache is preallocated for prompt + new tokens (capped at the context), so nothing in the
decode loop grows or copies with the length of the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llmkit.core.config import SampleConfig
from llmkit.core.model import KVCache, Transformer
from llmkit.core.sampling import next_token


@dataclass
class Finished:
    reason: str  # "eos" | "length" | "context"


def fit_prompt(ids: list[int], context: int) -> tuple[list[int], bool]:
    """Keep the most recent context - 1 tokens of a prompt (room for one new token)."""
    if len(ids) < context:
        return ids, False
    return ids[-(context - 1):], True


@torch.inference_mode()
def generate_ids(model: Transformer, prompt: list[int], cfg: SampleConfig, *, eos_id: int | None,
                 device: torch.device | str = "cpu") -> Iterator[int | Finished]:
    """Yield new token ids one by one, then a :class:`Finished` with the reason decoding stopped."""
    context = model.cfg.context
    prompt, _ = fit_prompt(prompt or ([eos_id] if eos_id is not None else [0]), context)
    length = min(context, len(prompt) + cfg.max_new_tokens)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, length, device=device, dtype=dtype)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
    logits = model(idx, cache=cache, pos=0, last_only=True)[:, -1]  # (1, V)
    pos = len(prompt)
    for produced in range(cfg.max_new_tokens):
        tok = next_token(logits, temperature=cfg.temperature, top_k=cfg.top_k, generator=generator)  # (1,)
        t = int(tok.item())
        if eos_id is not None and t == eos_id:
            yield Finished("eos")
            return
        yield t
        if produced + 1 == cfg.max_new_tokens:
            break
        if pos >= length:
            yield Finished("context")
            return
        logits = model(tok.view(1, 1), cache=cache, pos=pos, last_only=True)[:, -1]  # (1, V)
        pos += 1
    yield Finished("length")
