"""The transformer: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Other families are the same network with named options of ``ModelConfig`` (each default is
Llama's): Gemma 2/3's four norms per block, (1 + w) norm weights, per-head query/key norms, query
scale, GELU-tanh gate, sliding-window layers with their own RoPE base and soft-capped scores;
Qwen3's query/key norms; GPT-2's LayerNorm, learned positions, ungated GELU and biases everywhere.

Shape legend:
    B  batch            T  tokens in this call      S  key slots (T, or the cache length L)
    C  d_model          H  query heads              G  key/value heads (H % G == 0)
    D  head size (C/H)  V  vocabulary               F  MLP hidden width

``forward`` returns logits (and the final hidden states on request); losses live in ``training/loop.py``.
With a :class:`KVCache`, a call processes T new tokens at positions [pos, pos + T) and attends to
everything cached before them, so decoding one token costs one small forward pass. The cache is
indexed by position and always read whole; the attention mask (``attention_mask``, one policy for
training, padding and decoding) decides what each query sees.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.core.config import ModelConfig


class Norm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019: LayerNorm without the mean, cheaper), scaled
    by ``offset + weight``; or, with ``kind="layer"``, LayerNorm with a bias (GPT-2)."""

    def __init__(self, dim: int, eps: float, *, kind: str = "rms", offset: float = 0.0):
        super().__init__()
        self.eps, self.offset, self.layer = eps, offset, kind == "layer"
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # a scale of one either way
        self.bias = nn.Parameter(torch.zeros(dim)) if self.layer else None

    @classmethod
    def of(cls, dim: int, cfg: ModelConfig) -> Norm:
        return cls(dim, cfg.norm_eps, kind=cfg.norm, offset=cfg.norm_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer:
            return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)
        if self.offset:
            # Gemma's order: scaled in fp32, then cast (its weights sit around zero; 1 + w in bf16 would round).
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * (self.offset + self.weight.float())).type_as(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: the same result in one pass forward and one backward, instead of
            # the four element-wise operations below.
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Normalise in fp32 even under autocast: the mean of squares loses precision in bf16.
        # (Scaled after the cast, as Hugging Face's Llama does: bf16 models match it exactly.)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotary frequencies (D/2,), with the model's context scaling applied.

    linear: every frequency divided by the factor (positions stretched evenly). llama3 (Llama 3.1):
    wavelengths longer than original_context / low_freq_factor are divided by the factor, those
    shorter than original_context / high_freq_factor kept, and those between blended smoothly —
    the formula of Meta's reference code, which Hugging Face's ``rope_type: llama3`` follows.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # (D/2,)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        old = cfg.rope_original_context or cfg.context
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(between, blended, scaled)
    return inv_freq


def rope_tables(
    cfg: ModelConfig, length: int | None = None, *, local: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, D/2) (Su et al. 2021, RoFormer). ``local``:
    the windowed layers' tables, with their own base and no context scaling (Gemma 3)."""
    length = length or cfg.context
    if local:
        cfg = replace(cfg, rope_theta=cfg.rope_local_theta or cfg.rope_theta, rope_scaling="")
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(cfg))  # (L, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, heads, T, D) by angles (T, D/2).

    The half-split pairing is the Llama / Hugging Face convention, so weights convert as they are.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, heads, T, D/2)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, heads, T, D)
    return out.type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: (n_layer, B, G, L, D) each, written in place.

    Indexed by slot (gpt-fast's ``input_pos``): ``update`` writes the new keys at their slots and
    hands back the whole buffer; attention reads the slots up to the last one written (the mask's
    width), and the mask alone decides which of them a query sees. A slot is not a position: rows
    decoded together may hold masked-out slots (left padding, rejected speculative guesses), and
    each row's rotary positions count its own tokens only, so a cache may be longer than the
    model's context.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, length: int, *, device=None, dtype=None):
        super().__init__()
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, length, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = length

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, G, T, D) at slots ``input_pos`` (T,); return all slots (B, G, L, D) each."""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (B,) of the batch, in that order (beam search's reshuffle)."""
        self.k.copy_(self.k.index_select(1, rows))  # (n_layer, B, G, L, D)
        self.v.copy_(self.v.index_select(1, rows))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only rows ``rows`` (b,) of the batch, in that order: a smaller batch from now on."""
        self.k = self.k.index_select(1, rows)  # (n_layer, b, G, L, D)
        self.v = self.v.index_select(1, rows)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query heads (H queries share G
    key/value heads). Which keys a query may see is the caller's decision, passed in as ``mask``
    (None for the plain triangle of training): this module only computes."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.attn_bias or cfg.bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = Norm(cfg.head_dim, cfg.norm_eps, offset=cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = Norm(cfg.head_dim, cfg.norm_eps, offset=cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale**-0.5 if cfg.attn_scale else None  # None: SDPA's 1/sqrt(D)
        self.softcap = cfg.attn_softcap

    def forward(
        self,
        x,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
    ):
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)  # (B, H, T, D), (B, G, T, D), (B, G, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k.to(cache.k.dtype), v.to(cache.v.dtype))  # (B, G, L, D)
            # Only the slots up to the newest can be seen: the mask is that wide (S = pos + T).
            S = mask.size(-1) if mask is not None else T
            k, v = k[:, :, :S].to(q.dtype), v[:, :, :S].to(q.dtype)  # (B, G, S, D)
        y = self.attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(y)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """Queries (B, H, T, D), keys and values (B, G, T, D) of x (B, T, C): normed per head
        where the model says so, then rotated (no rotation with learned positions)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v, (B, H, T, D). No dropout on the attention
        probabilities (model.dropout acts on the residual branches): with it, SDPA leaves its fused
        kernel for the math path, 2.5x slower on a CPU (docs/benchmarks.md), and Llama-style models
        train without it."""
        if self.softcap:  # soft-capped scores (Gemma 2): no fused kernel takes them
            p = self.probabilities(q, k, mask).to(v.dtype)  # (B, H, T, S)
            B, G, S, D = v.shape
            p = p.view(B, G, self.n_head // G, -1, S)  # (B, G, H/G, T, S): each value head serves H/G queries
            return (p @ v[:, :, None]).view(B, self.n_head, -1, D)  # (B, H, T, D)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            # Grouped-query attention: each key/value head serves H/G query heads, without copies.
            enable_gqa=self.n_kv != self.n_head,
        )

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention weights (B, H, T, S) in fp32, written out: what ``attend`` weighs the
        values by (``inspect`` draws them). k may have G heads (B, G, S, D) or H."""
        if k.size(1) != self.n_head:
            k = k.repeat_interleave(self.n_head // k.size(1), dim=1)  # (B, H, S, D)
        scores = (q.float() @ k.float().transpose(-1, -2)) * (self.scale or self.head_dim**-0.5)  # (B, H, T, S)
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S) causal
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class MLP(nn.Module):
    """The feed-forward layer. Gated (Shazeer 2020): down(act(gate(x)) * up(x)), with SiLU
    (SwiGLU: PaLM, Llama) or GELU-tanh (GeGLU: Gemma); or plain, down(act(up(x))), with GELU-tanh
    (GPT-2) or squared ReLU (So et al. 2021, "Primer"; the modded-nanogpt speedruns)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias) if cfg.gated_mlp else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, F)
        elif self.kind == "geglu":
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)  # (B, T, F)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()  # (B, T, F)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, F)
        return self.down_proj(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with ``post_norms``
    (Gemma) each branch's output is normed again before it is added."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.windowed = cfg.windowed(layer)
        self.attn_norm = Norm.of(cfg.d_model, cfg)
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = Norm.of(cfg.d_model, cfg) if cfg.post_norms else None
        self.mlp_norm = Norm.of(cfg.d_model, cfg)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = Norm.of(cfg.d_model, cfg) if cfg.post_norms else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        a = self.attn(self.attn_norm(x), rope, mask, cache, input_pos)  # (B, T, C)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        x = x + self.drop(a)
        m = self.mlp(self.mlp_norm(x))  # (B, T, C)
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return x + self.drop(m)


class Transformer(nn.Module):
    """The decoder: token embedding, ``n_layer`` blocks, final RMSNorm, LM head (tied to the
    embedding by default).

    Two reads of the same trunk: ``forward`` (logits, optionally through a KV cache: training,
    scoring, decoding) and ``hidden_states`` (the states after any layer: pooling, classifier
    heads, embeddings). Both go through ``_trunk``, which owns positions and the attention mask.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = Norm.of(cfg.d_model, cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.set_rope_tables()
        self._init_weights()

    def set_rope_tables(self) -> None:
        """The rotary tables (none with learned positions): buffers, never saved (a checkpoint
        holds weights only), (L, D/2) each; the windowed layers' own where their base differs
        (Gemma 3)."""
        cfg, rope = self.cfg, self.cfg.positions == "rope"
        cos, sin = rope_tables(cfg) if rope else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (L, D/2)
        own = rope and cfg.window and cfg.rope_local_theta and cfg.rope_local_theta != cfg.rope_theta
        cos, sin = rope_tables(cfg, local=True) if own else (None, None)
        self.register_buffer("rope_local_cos", cos, persistent=False)  # (L, D/2)
        self.register_buffer("rope_local_sin", sin, persistent=False)  # (L, D/2)

    def _init_weights(self) -> None:
        self.apply(self._init)
        # GPT-2's scaled init: residual projections shrink with depth so activations stay O(1);
        # or zero, so each block starts as the identity and its gradient still reaches it.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                if self.cfg.zero_init:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def _trunk(
        self,
        idx: torch.Tensor,
        n_blocks: int,
        *,
        cache: KVCache | None,
        pos: int,
        positions: torch.Tensor | None,
        key_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embed idx (B, T) and run the first ``n_blocks`` blocks -> (B, T, C), not normalised."""
        B, T = idx.shape
        if positions is None and pos + T > self.cfg.context:
            raise ValueError(f"positions {pos}..{pos + T} exceed the context of {self.cfg.context}")
        if cache is not None and pos + T > cache.length:
            raise ValueError(f"slots {pos}..{pos + T} exceed the cache's {cache.length}")
        input_pos = None
        if cache is not None:
            input_pos = torch.arange(pos, pos + T, device=idx.device)  # (T,) the cache slots written
        S = pos + T if cache is not None else T  # the key slots anyone here can see
        ropes, masks = self.layer_inputs(T, pos, S, positions, key_valid, idx.device)
        x = self.embeddings(idx, pos, positions)  # (B, T, C)
        for block in self.blocks[:n_blocks]:
            x = block(x, ropes[block.windowed], masks[block.windowed], cache, input_pos)
        return x

    def embeddings(self, idx: torch.Tensor, pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the first block for idx (B, T): token embeddings (B, T, C), scaled by
        sqrt(C) (Gemma) or plus the learned position embeddings (GPT-2) where the model has them."""
        x = self.embed(idx)  # (B, T, C)
        if self.cfg.embed_scale:  # the scale in the weights' dtype, as Gemma rounds it
            x = x * torch.tensor(math.sqrt(self.cfg.d_model), dtype=x.dtype)
        if self.pos_embed is not None:
            T = idx.size(1)
            where = torch.arange(pos, pos + T, device=idx.device) if positions is None else positions  # (T,) or (B, T)
            x = x + self.pos_embed(where)  # (B, T, C)
        return x

    def layer_inputs(
        self, T: int, pos: int, S: int, positions: torch.Tensor | None, key_valid: torch.Tensor | None, device
    ):
        """The rotary tables and attention masks of T queries at slots [pos, pos + T) over S key
        slots, each a pair (full-attention layers, windowed layers)."""
        ropes: list = [None, None]
        for i, (cos, sin) in enumerate(((self.rope_cos, self.rope_sin), (self.rope_local_cos, self.rope_local_sin))):
            if cos is None:  # no table of its own: the windowed layers rotate as the others (or nothing does)
                ropes[i] = ropes[0]
            elif positions is None:
                ropes[i] = cos[pos : pos + T], sin[pos : pos + T]  # each (T, D/2)
            else:
                ropes[i] = cos[positions][:, None], sin[positions][:, None]  # each (B, 1, T, D/2)
        if key_valid is not None:
            key_valid = key_valid[:, :S]  # (B, S)
        mask = attention_mask(T, pos, S, key_valid, device)
        local = window_mask(T, pos, S, key_valid, self.cfg.window, device, mask) if self.cfg.window else mask
        return ropes, [mask, local]

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        pos: int = 0,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        logits_where: torch.Tensor | None = None,
    ):
        """idx (B, T) token ids at positions [pos, pos + T) -> logits (B, T, V).

        With a ``cache``, the new keys and values go to slots [pos, pos + T) and the tokens attend
        to every earlier slot. For left-padded batches, ``positions`` (B, T) gives each token's
        rotary position (its index within its own row's text, below the context) and ``key_valid``
        marks the slots holding real tokens, (B, L) with a cache of length L, else (B, T): padding
        is then never attended to. ``last_only`` computes logits for the final position only (B, 1, V): all
        that decoding needs. ``logits_where`` (B, T) bool computes them only where it is true,
        (N, V) in row-major order: fine-tuning scores responses, not prompts or padding, and the
        LM head is a fifth of a small model's work (a third of SmolLM2's, vocabulary 49,152).
        """
        x = self._trunk(idx, self.cfg.n_layer, cache=cache, pos=pos, positions=positions, key_valid=key_valid)
        h = self.norm(x)  # (B, T, C)
        if logits_where is not None:
            h = h[logits_where]  # (N, C)
        elif last_only:
            h = h[:, -1:]  # (B, 1, C)
        logits = self.lm_head(h)  # (B, T, V), or (N, V)
        if self.cfg.logit_softcap:
            logits = torch.tanh(logits / self.cfg.logit_softcap) * self.cfg.logit_softcap
        return (logits, h) if return_hidden else logits

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        layer: int = -1,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, C) after ``layer``: 0 is the embeddings, i the output of block i,
        n_layer (or -1) the final normalised states the LM head reads. Negative counts from the top."""
        n = self.cfg.n_layer
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} out of range {-(n + 1)}..{n}")
        layer = layer % (n + 1)
        x = self._trunk(idx, layer, cache=None, pos=0, positions=positions, key_valid=key_valid)
        return self.norm(x) if layer == n else x


def pad_batch(rows: list[list[int]], side: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token rows -> ids (B, T), valid (B, T) bool, positions (B, T) for left padding (else None)."""
    T = max(len(r) for r in rows)
    pads = [T - len(r) for r in rows]
    if side == "right":
        ids = torch.tensor([r + [0] * p for r, p in zip(rows, pads)], device=device)  # (B, T)
        valid = torch.tensor([[True] * len(r) + [False] * p for r, p in zip(rows, pads)], device=device)
        return ids, valid, None
    ids = torch.tensor([[0] * p + r for r, p in zip(rows, pads)], device=device)  # (B, T)
    valid = torch.tensor([[False] * p + [True] * len(r) for r, p in zip(rows, pads)], device=device)
    pad = torch.tensor(pads, device=device)
    positions = (torch.arange(T, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    return ids, valid, positions


def attention_mask(T: int, pos: int, S: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
    """Which of S key slots each of T queries (at slots [pos, pos + T)) may see: (B or 1, 1, T, S)
    bool, or None for the plain causal triangle (no cache, no padding: SDPA's fastest path).

    Causal: a query sees slots up to its own. With ``key_valid`` (B, S), padding slots are hidden,
    but every query still sees itself, so a padding query never has an empty row (an all-masked
    row gives NaN, and NaN values poison the keys and values of later layers).
    """
    if key_valid is None and S == T and pos == 0:
        return None
    slots = torch.arange(S, device=device)  # (S,)
    own = pos + torch.arange(T, device=device)  # (T,) each query's slot
    causal = slots[None, :] <= own[:, None]  # (T, S)
    if key_valid is None:
        return causal[None, None]  # (1, 1, T, S)
    self_key = slots[None, :] == own[:, None]  # (T, S)
    return ((causal & key_valid[:, None, :]) | self_key)[:, None]  # (B, 1, T, S)


def window_mask(
    T: int, pos: int, S: int, key_valid: torch.Tensor | None, window: int, device, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """``mask`` (see ``attention_mask``) narrowed to the last ``window`` tokens of each query,
    itself included: (B or 1, 1, T, S), or None where the window hides nothing.

    Distances count real tokens, not slots (the valid slots between a key and its query), so a row
    with masked-out slots inside it (padding, rejected speculative guesses) keeps its full window;
    without holes this is Hugging Face's ``kv_idx > q_idx - window``.
    """
    if mask is None and S <= window:
        return None
    if key_valid is None:
        counts = torch.arange(1, S + 1, device=device)[None]  # (1, S) tokens up to each slot
    else:
        counts = key_valid.long().cumsum(-1)  # (B, S)
    near = counts[:, pos : pos + T, None] - counts[:, None, :] < window  # (B or 1, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]  # (1, 1, T, S)
    return mask & near[:, None]


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
