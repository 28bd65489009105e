"""Sequence-level reads of the trunk: padding token rows, pooling hidden states, and the
classification head.

Pooling reads real tokens only, under right padding (causal attention never looks right, so
trailing padding is invisible to real tokens) and under left padding (each row gets its own
rotary positions and a mask that hides its padding), so a text's pooled vector is the same alone
or inside any batch. ``encode`` and the classifier share this code.

The classifier is a linear layer ``cls_head`` attached to the Transformer itself: its weights sit
beside the trunk's in model.safetensors under ``cls_head.*``, so a classifier checkpoint is also a
valid trunk for ``encode``.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.core.model.transformer import pad_batch


def pool(hidden: torch.Tensor, valid: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, T, C), valid (B, T) bool -> (B, C), reading only the real tokens."""
    h = hidden.float()
    if how == "mean":
        w = valid.to(h.dtype)[..., None]  # (B, T, 1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1)
    if how == "max":
        return h.masked_fill(~valid[..., None], float("-inf")).amax(1)
    idx = torch.arange(valid.size(1), device=valid.device).expand_as(valid)  # (B, T)
    if how == "last":
        pick = torch.where(valid, idx, -1).amax(1)  # (B,) last real position
    else:  # first
        pick = torch.where(valid, idx, valid.size(1)).amin(1)  # (B,) first real position
    return h[torch.arange(h.size(0), device=h.device), pick]  # (B, C)


def pooled_hidden(
    model, rows: list[list[int]], *, pooling: str, layer: int = -1, side: str = "right", device="cpu"
) -> torch.Tensor:
    """Token rows -> pooled hidden states (B, C) after ``layer``."""
    ids, valid, positions = pad_batch(rows, side, device)
    if positions is None:
        hidden = model.hidden_states(ids, layer=layer)  # (B, T, C)
    else:
        hidden = model.hidden_states(ids, layer=layer, positions=positions, key_valid=valid)  # (B, T, C)
    return pool(hidden, valid, pooling)


def attach_classifier(model: nn.Module, n_labels: int) -> nn.Linear:
    """Give the model a fresh classification head (d_model -> n_labels) as ``model.cls_head``."""
    ref = model.embed.weight
    head = nn.Linear(model.cfg.d_model, n_labels, device=ref.device, dtype=ref.dtype)
    nn.init.normal_(head.weight, mean=0.0, std=0.02)
    nn.init.zeros_(head.bias)
    model.cls_head = head
    return head


def classify_logits(model, rows: list[list[int]], *, pooling: str, side: str = "right", device="cpu") -> torch.Tensor:
    """Token rows -> class logits (B, n_labels) from the final normalised hidden states."""
    pooled = pooled_hidden(model, rows, pooling=pooling, side=side, device=device)  # (B, C) fp32
    head = model.cls_head
    return head(pooled.to(head.weight.dtype))
