"""The budget-sized recipe: the model to train when a run gives a budget but no preset.

``llmkit pretrain corpus.txt --time 30m`` should not ask its user to know that `tiny` underfits
16 MB of text or that `small` sees 40% of it in 30 CPU-minutes. Given a time (or token) budget,
this module picks a shape — width, depth, heads, context, batch, learning rate and warmup — from a
ladder of tested shapes, by a compute-optimal rule fitted on recorded runs (docs/pretrain.md,
"Sized to the budget", has the table of runs and the fit):

    the largest shape whose expected training tokens reach ``TOKENS_PER_PARAM`` x its
    non-embedding parameters.

Expected tokens come from this machine: the speed probe (``core/training/speed.py``, cached) times the
smallest shape of the ladder, and the others are scaled by their training FLOPs per token
(matmuls of the blocks and the LM head, and attention). Bigger matmuls run a little more
efficiently than small ones, so this estimate errs towards smaller models; the run's own probe
then times the chosen shape for its precision and compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmkit.core.config import ModelConfig, RunConfig

TOKENS_PER_PARAM = 4.0
"""Fitted on the runs of docs/pretrain.md ("Sized to the budget"), tiny shakespeare on one core:
at 3 minutes the 2.4M-parameter shape, at 0.8 tokens per parameter, lost to the 0.8M one by 0.13
bits per byte; at 10 minutes, at 3.0 tokens per parameter, it tied (2.150 against 2.137, within
the 0.04 standard error). A shape is worth its size from about there: 4, the first budget where
the larger one is expected to win rather than tie. (Chinchilla's 20 is for budgets and models
thousands of times larger; at these sizes the optimum sits lower, as the runs show.)"""


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    context: int
    batch_size: int
    lr: float
    warmup_steps: int

    def model(self, base: ModelConfig, vocab: int) -> ModelConfig:
        return ModelConfig(
            **{
                **base.__dict__,
                "vocab_size": vocab,
                "d_model": self.d_model,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_kv_head": self.n_kv_head,
                "context": self.context,
                "d_ff": 0,
                "d_head": 0,
            }
        )


SHAPE_KEYS = frozenset(
    f"model.{k}" for k in ("d_model", "n_layer", "n_head", "n_kv_head", "context", "d_ff", "d_head", "vocab_size")
)
"""The settings that make a model's size: one given by the user means the user chose the model, and
the recipe steps aside (the other model options, e.g. the MLP's kind, apply to the sized shape)."""

LADDER = (
    Shape("d128-l4", 128, 4, 4, 2, 128, 16, 2e-3, 50),
    Shape("d192-l6", 192, 6, 6, 2, 128, 16, 1.5e-3, 100),
    Shape("d256-l6", 256, 6, 8, 2, 256, 16, 1e-3, 100),
    Shape("d384-l6", 384, 6, 6, 2, 256, 16, 1e-3, 200),  # the `small` preset
    Shape("d512-l8", 512, 8, 8, 4, 512, 16, 6e-4, 300),
    Shape("d768-l12", 768, 12, 12, 4, 1024, 16, 6e-4, 1000),  # the `base` preset
)


def params(cfg: ModelConfig) -> int:
    """Parameters of a model of this config (the tied LM head counted once), without building it."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    attn = d * cfg.n_head * cfg.head_dim * 2 + d * cfg.kv_heads * cfg.head_dim * 2
    block = attn + (3 if cfg.gated_mlp else 2) * d * cfg.ff_dim + 2 * d  # gated MLPs have three matrices
    return V * d * (1 if cfg.tie_embeddings else 2) + L * block + d


def non_embedding(cfg: ModelConfig) -> int:
    """Parameters outside the embedding table and LM head: the measure the rule counts (Kaplan
    et al. 2020), so a larger vocabulary does not make a model look bigger than it computes."""
    return params(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (forward and backward), LM head
    included, plus attention's scores and mixing (12 * layers * width * context / 2, causal)."""
    return 6.0 * (non_embedding(cfg) + cfg.vocab_size * cfg.d_model) + 6.0 * cfg.n_layer * cfg.d_model * cfg.context


@dataclass
class Sizing:
    shape: Shape
    tokens: float
    """Training tokens the budget is expected to buy for the chosen shape."""
    table: list[dict[str, Any]]

    def reason(self) -> str:
        row = next(r for r in self.table if r["shape"] == self.shape.name)
        return (
            f"{self.shape.name}, {row['params'] / 1e6:.1f}M parameters ({row['non_embedding'] / 1e6:.1f}M outside "
            f"the embeddings): ~{self.tokens / 1e6:.1f}M tokens in the budget, {row['tokens_per_param']:.1f} per "
            f"parameter (the rule wants {TOKENS_PER_PARAM:g})"
        )


def size_for_budget(
    cfg: RunConfig, vocab: int, *, seconds: float | None, tokens: int | None, rate: Callable[[ModelConfig, int], float]
) -> Sizing:
    """The shape for a budget of ``seconds`` (or ``tokens``); ``rate(model_cfg, batch)`` is the
    measured training tokens/s of a shape (the smallest of the ladder is the one measured)."""
    ref = LADDER[0].model(cfg.model, vocab)
    ref_rate = rate(ref, LADDER[0].batch_size) if seconds else 0.0
    table, chosen = [], LADDER[0]
    for shape in LADDER:
        m = shape.model(cfg.model, vocab)
        expected = float(tokens) if tokens else ref_rate * flops_per_token(ref) / flops_per_token(m) * seconds
        p = non_embedding(m)
        table.append(
            {
                "shape": shape.name,
                "params": params(m),
                "non_embedding": p,
                "expected_tokens": expected,
                "tokens_per_param": expected / p,
            }
        )
        if expected >= TOKENS_PER_PARAM * p:
            chosen = shape
    expected = next(r["expected_tokens"] for r in table if r["shape"] == chosen.name)
    return Sizing(chosen, expected, table)


LEVERS = {"optim": {"optimizer": "muon", "schedule": "wsd"}, "model": {"mlp": "relu2"}}
"""What the recipe trains its shape with: the speedruns' levers that paid on it, each measured
against the recipe without it (docs/benchmarks.md, "Pretraining levers"): Muon, the warm-down
schedule and the squared-ReLU MLP. QK-norm did nothing at these sizes, zero-initialised projections
cost, an untied soft-capped head paid too little for its 10% of speed; the presets keep AdamW, the
cosine and SwiGLU, as do fine-tuning and LoRA."""


def apply(cfg: RunConfig, sizing: Sizing, given: frozenset[str] = frozenset()) -> RunConfig:
    """The config with the chosen shape and the recipe's levers; ``given`` ("section.key") are the
    user's and stay."""
    s = sizing.shape
    chosen = {
        "model": {k: getattr(s, k) for k in ("d_model", "n_layer", "n_head", "n_kv_head", "context")},
        "train": {"batch_size": s.batch_size},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup_steps},
    }
    for section in chosen:
        values = {
            k: v for k, v in {**chosen[section], **LEVERS.get(section, {})}.items() if f"{section}.{k}" not in given
        }
        if values:
            cfg = cfg.replace(section, **values)
    return cfg


def levers_in(cfg: RunConfig) -> str:
    """The recipe's levers a config trains with, as its ``--set`` options ('' for none)."""
    on = [f"{s}.{k}={v}" for s, values in LEVERS.items() for k, v in values.items() if getattr(getattr(cfg, s), k) == v]
    return ", ".join(on)
