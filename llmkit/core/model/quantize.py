"""Int8 weight-only quantization for decoding (``--quantize int8``).

Decoding one token reads every weight once, so at batch 1 it is bound by memory bandwidth: int8
weights are a quarter of the bytes of fp32. Each linear layer's weight (N, K) is stored as int8
with one fp32 scale per output row (symmetric, round to nearest: w ≈ q * scale, scale =
max|w_row| / 127), and multiplied by torch's int8 weight-only kernel
(``aten._weight_int8pack_mm``, the kernel gpt-fast's int8 mode uses), which takes bf16 inputs on
a CPU: activations are cast to bf16 for the product and back. Norms, embeddings and the KV cache
stay as they were; a tied LM head gets its own int8 copy (the embedding table stays exact).

Quantization changes the numbers: ``llmkit eval``'s perplexity on a fixed text measures by how
much (docs/generate.md gives the figures; a test bounds it). ``int8_copy`` keeps the model as it is
and makes an int8 twin beside it — the draft of speculative decoding (``--draft int8``): the twin
guesses, the exact model checks, so the output stays the exact model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A linear layer without bias whose weight is int8 rows times fp32 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        # The kernel takes bf16 scales: round each up (bf16 keeps 8 bits) so that the largest
        # weight still fits in 127 steps, and quantize against the rounded scale itself.
        scale = ((w.abs().amax(dim=1) / 127).clamp(min=1e-12) * (1 + 2**-7)).to(torch.bfloat16)  # (N,)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)  # (N, K)
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)  # (M, N)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]  # (N, K)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear; returns the model.

    For inference only: the model is put in eval mode and its weights no longer train.
    """
    if not available():
        raise RuntimeError("this torch build has no int8 weight-only kernel (aten._weight_int8pack_mm)")
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def int8_copy(model: nn.Module) -> nn.Module:
    """An int8 twin of ``model``, which stays as it was: the twin's linear layers are int8, and every
    other tensor (embeddings, norms, rotary tables) is the model's own, shared, not copied — the
    twin costs the int8 weights only (a quarter of the linear layers' fp32 bytes)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return quantize_int8(copy.deepcopy(model, memo=shared))
