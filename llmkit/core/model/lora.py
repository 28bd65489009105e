"""LoRA (Hu et al. 2021) by swapping nn.Linear modules in place: no copy of the model class.

A wrapped layer computes ``base(x) + dropout(x) @ A.T @ B.T * (alpha / rank)``. ``B`` starts at
zero, so a freshly wrapped model computes exactly what the base model did. Only A and B train;
``merge`` folds them into plain nn.Linear weights for inference or export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.core.config import LoRAConfig, default_of

DEFAULT_TARGETS: tuple[str, ...] = default_of(LoRAConfig, "targets")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError("LoRA rank must be positive")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., rank) -> (..., out): the low-rank update never forms a full matrix
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        out = type(self.base)(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in ``targets``; freeze everything else.

    Returns the dotted names of the wrapped modules (an error when none matched).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not wrapped:
        raise ValueError(f"no linear layer named {', '.join(targets)} to adapt")
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by the equivalent plain nn.Linear, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors only (what adapter.safetensors holds)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def split_state(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a LoRA model's state into (base, adapter).

    base: every non-LoRA tensor under the name it has in the plain model (``q_proj.base.weight``
    -> ``q_proj.weight``), so model.safetensors loads into an unwrapped Transformer. adapter: the
    LoRA tensors plus any other trained tensor (e.g. a classification head): what a run learned.
    """
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    base, adapter = {}, {}
    for key, value in state.items():
        if key.endswith((".lora_a", ".lora_b")):
            adapter[key] = value
            continue
        module, _, leaf = key.rpartition(".")
        plain = key
        if module.endswith(".base") and module[: -len(".base")] in wrapped:
            plain = f"{module[: -len('.base')]}.{leaf}"
        base[plain] = value
        if key in trained:
            adapter[key] = value
    return base, adapter


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a LoRA-wrapped model; every tensor must find its place."""
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise ValueError(f"adapter tensors do not fit the model: {unknown[:3]}")
    model.load_state_dict(tensors, strict=False)
