"""The transformer: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Shape legend:
    B  batch            T  tokens in this call      S  tokens attended to (cache + T)
    C  d_model          H  query heads              G  key/value heads (H % G == 0)
    D  head size (C/H)  V  vocabulary               F  SwiGLU hidden width

``forward`` returns logits (and the final hidden states on request); losses live in train.py.
With a :class:`KVCache`, a call processes T new tokens at positions [pos, pos + T) and attends to
everything cached before them, so decoding one token costs one small forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.core.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without the mean, cheaper."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares loses precision in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, D/2) (Su et al. 2021, RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (L, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, heads, T, D) by angles (T, D/2).

    The half-split pairing is the Llama / Hugging Face convention, so weights convert as they are.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, heads, T, D/2)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, heads, T, D)
    return out.type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: (n_layer, B, G, L, D) each, written in place."""

    def __init__(self, cfg: ModelConfig, batch_size: int, length: int, *, device=None, dtype=None):
        super().__init__()
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, length, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = length

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, G, T, D) at [pos, pos + T); return the filled prefix (B, G, pos + T, D)."""
        end = pos + k.size(2)
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None, pos: int, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k.to(cache.k.dtype), v.to(cache.v.dtype))  # (B, G, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        S = k.size(2)
        causal = False
        if mask is None:
            if T == S:
                causal = True  # no past: the plain causal triangle
            elif T > 1:
                # T new tokens after S - T cached ones: token i sees positions <= (S - T) + i.
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            # T == 1 without padding: the new token sees every cached position, no mask at all.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            # Grouped-query attention: each key/value head serves H/G query heads, without copies.
            enable_gqa=self.n_kv != self.n_head)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """The gated MLP of PaLM and Llama (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, pos, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, pos, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.context, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (L, D/2)
        self.apply(self._init)
        # GPT-2's scaled init: residual projections shrink with depth so activations stay O(1).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, pos: int = 0,
                positions: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                return_hidden: bool = False, last_only: bool = False):
        """idx (B, T) token ids written at cache slots [pos, pos + T) -> logits (B, T, V).

        For left-padded batches, ``positions`` (B, T) gives each token's rotary position (its
        index within its own row's text) and ``key_valid`` (B, pos + T) marks the slots holding real
        tokens; padding is then never attended to. ``last_only`` computes logits for the final
        position only (B, 1, V): all that decoding needs.
        """
        B, T = idx.shape
        if pos + T > self.cfg.context:
            raise ValueError(f"positions {pos}..{pos + T} exceed the context of {self.cfg.context}")
        if positions is None:
            cos, sin = self.rope_cos[pos: pos + T], self.rope_sin[pos: pos + T]  # (T, D/2)
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D/2)
        mask = None if key_valid is None else padding_mask(key_valid, T)  # (B, 1, T, S)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, cache, pos, mask)
        h = self.norm(x)  # (B, T, C)
        logits = self.lm_head(h[:, -1:] if last_only else h)  # (B, T, V)
        return (logits, h) if return_hidden else logits

    def hidden_states(self, idx: torch.Tensor, *, layer: int = -1, positions: torch.Tensor | None = None,
                      key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) after ``layer``: 0 is the embeddings, i the output of block i,
        n_layer (or -1) the final normalised states the LM head reads. Negative counts from the top."""
        n = self.cfg.n_layer
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} out of range {-(n + 1)}..{n}")
        layer = layer % (n + 1)
        B, T = idx.shape
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D/2)
        mask = None if key_valid is None else padding_mask(key_valid, T)  # (B, 1, T, T)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks[:layer]:
            x = block(x, cos, sin, None, 0, mask)
        return self.norm(x) if layer == n else x


def padding_mask(key_valid: torch.Tensor, T: int) -> torch.Tensor:
    """Attention mask (B, 1, T, S) for T queries at the last T of S slots: causal, real keys only.

    Every query also sees itself, so a padding query never has an empty row (an all-masked row
    would give NaN, and NaN values poison the keys and values of later layers).
    """
    S = key_valid.size(1)
    causal = torch.ones(T, S, dtype=torch.bool, device=key_valid.device).tril(diagonal=S - T)  # (T, S)
    self_key = torch.zeros(T, S, dtype=torch.bool, device=key_valid.device)
    self_key[torch.arange(T), torch.arange(S - T, S)] = True  # (T, S) the query's own slot
    return ((causal & key_valid[:, None, :]) | self_key)[:, None]  # (B, 1, T, S)


def param_groups(model: nn.Module, weight_decay: float, *, names: bool = False) -> list[dict]:
    """AdamW groups: decay matrices of linear layers only (not norms, biases or embeddings).

    With ``names``, each group lists parameter names instead of tensors (the same order): what
    a sharded optimizer state is keyed by."""
    decay, no_decay, seen = [], [], set()
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(name if names else p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
