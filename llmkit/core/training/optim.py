"""The optimizers and the learning-rate schedule a run trains with.

AdamW (torch's fused kernel) for every parameter, or Muon for the blocks' weight matrices beside
AdamW for the rest (embeddings, an untied head, norms and biases), in one ``torch.optim.Optimizer``
so that checkpoints, resume and gradient scaling see a single object whatever was chosen.

Muon (Jordan et al. 2024, the modded-nanogpt speedruns): the update of a weight matrix is its
Nesterov momentum made orthogonal (U V^T of its SVD, approximated by five Newton-Schulz steps), so
every direction of the matrix moves by the same amount instead of the few that dominate the
gradient. The step is scaled by 0.2 x sqrt(max(rows, cols)) (Liu et al. 2025, "Muon is scalable
for LLM training"): an update of the size AdamW's has, so the learning rates, warmups and schedules
tuned for AdamW carry over and one ``optim.lr`` drives both halves.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adam import adam

from llmkit.core.config import OptimConfig
from llmkit.core.errors import ConfigError
from llmkit.core.host.device import cpu_has_native_bf16
from llmkit.core.model.transformer import param_groups

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton-Schulz iteration's coefficients (Keller Jordan's): chosen to push small
singular values up fast rather than to converge exactly; 0.7-1.2 in place of 1 costs nothing."""
NS_STEPS = 5


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where this machine multiplies it natively (a GPU, AVX512-BF16 or AMX: 1.3-2.4x fp32 on
    the blocks' matrices here); fp32 elsewhere, where bf16 products are emulated and far slower."""
    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32


def orthogonalize(
    g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T: every singular value brought near 1."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or ns_dtype(g.device))
    wide = x.size(0) > x.size(1)
    if wide:
        x = x.T  # (cols, rows): the Gram matrix below is the smaller side's
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x  # (r, c)
    return (x.T if wide else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups marked ``muon``, AdamW (decoupled decay) for the others."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, momentum: float):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "momentum": momentum, "muon": False})
        self.ns_dtype: dict[torch.device, torch.dtype] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, decay, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            dtype = self.ns_dtype.setdefault(p.device, ns_dtype(p.device))  # decided once, not per matrix and step
            update = orthogonalize(p.grad.add(buf, alpha=mu), dtype=dtype)  # Nesterov: one momentum step ahead
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def muon_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups (``param_groups``) with the blocks' weight matrices moved into a Muon group:
    Muon is for the hidden layers' linear maps, not for lookups (embeddings) or the output head."""
    hidden = {id(p) for name, p in model.named_parameters() if p.ndim == 2 and ".blocks." in f".{name}"}
    decay, no_decay = param_groups(model, weight_decay)
    muon = [p for p in decay["params"] if id(p) in hidden]
    adamw = [p for p in decay["params"] if id(p) not in hidden]
    return [
        {"params": muon, "weight_decay": weight_decay, "muon": True},
        {"params": adamw, "weight_decay": weight_decay, "muon": False},
        {**no_decay, "muon": False},
    ]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    plain = bool(params) and all(type(p) is torch.nn.Parameter for p in params)
    if cfg.optimizer == "muon":
        if not plain:  # Muon needs each matrix whole; a sharded (FSDP) weight is a slice of one
            raise ConfigError("optim.optimizer=muon needs whole weight matrices: train with --strategy ddp")
        groups = muon_groups(model, cfg.weight_decay)
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum)
    # torch's fused AdamW (one kernel over all tensors, 2% of a small CPU step) where every
    # parameter is a plain tensor on a CPU or GPU; sharded (DTensor) weights keep the default.
    fused = plain and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


def lr_at(cfg: OptimConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then the schedule from lr to lr * min_lr_ratio as
    progress -> 1: a cosine, or (wsd) flat until the last ``cooldown`` of the budget and linear
    down from there.

    ``progress`` is the share of the budget used (steps, tokens or time: whichever is furthest),
    so a run stopped by --time still finishes its decay at the deadline.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        return cfg.lr - (cfg.lr - floor) * max(0.0, (p - (1.0 - cfg.cooldown)) / cfg.cooldown)
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * p))
