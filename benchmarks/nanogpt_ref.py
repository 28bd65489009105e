"""nanoGPT's CPU recipe, re-implemented for side-by-side runs (its model and its training loop).

nanoGPT (github.com/karpathy/nanoGPT, MIT) is not on PyPI, so this file rebuilds what its
``train.py`` does with ``config/train_shakespeare_char.py`` and the README's CPU overrides
(``--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``):

- the model: GPT-2 blocks (LayerNorm without bias, causal SDPA, GELU MLP of 4x width, no biases),
  learned positions, LM head tied to the embedding, N(0, 0.02) init with the residual projections
  scaled by 1/sqrt(2 * n_layer);
- the loop: random windows of the training ids, AdamW (weight decay 0.1 on matrices only,
  betas 0.9/0.99), warmup 100 then cosine to 1e-4 over ``max_iters``, gradient clipping at 1.0,
  ``estimate_loss`` on 20 train and 20 val batches every 250 iterations, a checkpoint
  (``torch.save`` of model and optimizer) when the val loss improves, a ``loss.item()`` every
  iteration (log_interval 1).

It trains on the ids the caller gives (llmkit's own tokenisation of the same text) so both sides
read the same tokens; ``run`` stops at a wall-clock deadline with the schedule laid over
``max_iters``, as nanoGPT does (its schedule does not know about time).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Recipe:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    dropout: float = 0.0
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    max_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 1


class Block(nn.Module):
    def __init__(self, r: Recipe):
        super().__init__()
        self.n_head = r.n_head
        self.ln_1 = nn.LayerNorm(r.n_embd, bias=False)
        self.c_attn = nn.Linear(r.n_embd, 3 * r.n_embd, bias=False)
        self.attn_proj = nn.Linear(r.n_embd, r.n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(r.n_embd, bias=False)
        self.c_fc = nn.Linear(r.n_embd, 4 * r.n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * r.n_embd, r.n_embd, bias=False)
        self.dropout = r.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        x = x + F.dropout(self.attn_proj(y), self.dropout, self.training)
        return x + F.dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, r: Recipe, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, r.n_embd)
        self.wpe = nn.Embedding(r.block_size, r.n_embd)
        self.blocks = nn.ModuleList(Block(r) for _ in range(r.n_layer))
        self.ln_f = nn.LayerNorm(r.n_embd, bias=False)
        self.lm_head = nn.Linear(r.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.drop = r.dropout
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * r.n_layer))

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = F.dropout(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)), self.drop, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def _optimizer(model: GPT, r: Recipe) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=r.learning_rate, betas=(r.beta1, r.beta2))


def _lr(r: Recipe, it: int) -> float:
    if it < r.warmup_iters:
        return r.learning_rate * it / r.warmup_iters
    if it > r.max_iters:
        return r.min_lr
    ratio = (it - r.warmup_iters) / (r.max_iters - r.warmup_iters)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.learning_rate - r.min_lr)


def run(
    train: torch.Tensor,
    val: torch.Tensor,
    vocab_size: int,
    seconds: float,
    out: Path,
    r: Recipe | None = None,
    seed: int = 1337,
) -> dict:
    """Train until ``seconds`` of wall-clock pass (or max_iters); the model and the loop's figures."""
    r = r or Recipe()
    torch.manual_seed(seed)
    model = GPT(r, vocab_size)
    opt = _optimizer(model, r)

    def batch(data: torch.Tensor):
        ix = torch.randint(len(data) - r.block_size, (r.batch_size,))
        x = torch.stack([data[i : i + r.block_size] for i in ix])  # (B, T)
        y = torch.stack([data[i + 1 : i + 1 + r.block_size] for i in ix])  # (B, T)
        return x, y

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        result = {}
        for split, data in (("train", train), ("val", val)):
            result[split] = sum(model(*batch(data))[1].item() for _ in range(r.eval_iters)) / r.eval_iters
        model.train()
        return result

    best, it, evals = 1e9, 0, []
    x, y = batch(train)
    start = time.perf_counter()
    steady = None  # (time, iteration) after the first evaluation: the loop's own pace from there
    while True:
        lr = _lr(r, it)
        for g in opt.param_groups:
            g["lr"] = lr
        if it % r.eval_interval == 0:
            losses = estimate_loss()
            evals.append({"iter": it, **losses})
            if losses["val"] < best:
                best = losses["val"]
                if it > 0:
                    torch.save(
                        {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it}, out / "ckpt.pt"
                    )
        if steady is None:
            steady = (time.perf_counter(), it)
        if time.perf_counter() - start >= seconds or it > r.max_iters:
            break
        _, loss = model(x, y)
        x, y = batch(train)  # nanoGPT fetches the next batch between forward and backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % r.log_interval == 0:
            loss.item()
        it += 1
    now = time.perf_counter()
    per_iter = r.batch_size * r.block_size
    return {
        "model": model,
        "iters": it,
        "tokens": it * per_iter,
        "seconds": now - start,
        "tokens_per_s": it * per_iter / (now - start),
        "steady_tokens_per_s": (it - steady[1]) * per_iter / max(now - steady[0], 1e-9),
        "evals": evals,
    }


def bare_step(vocab_size: int, r: Recipe | None = None):
    """One nanoGPT training step (forward, backward, clip, AdamW) on a fixed batch, for step timing."""
    r = r or Recipe()
    model = GPT(r, vocab_size).train()
    opt = _optimizer(model, r)
    x = torch.randint(0, vocab_size, (r.batch_size, r.block_size))
    y = torch.randint(0, vocab_size, (r.batch_size, r.block_size))

    def step():
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
