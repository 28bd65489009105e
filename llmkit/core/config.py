"""Configuration: one frozen dataclass per concern, YAML presets, dotted overrides, coercion.

Precedence, lowest first: dataclass defaults < preset < ``--config FILE`` < ``--set a.b=c``
< the few dedicated flags. Each function in core receives only the section it needs.

No torch here: the CLI imports this module to print help and resolve configs instantly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmkit.core.errors import ConfigError

# --- the value lists, each defined once and imported wherever it is checked or offered ----------

POOLINGS = ("mean", "last", "max", "first")
"""How a sequence's hidden states become one vector (encode); over real tokens only."""
CLASSIFIER_POOLINGS = ("last", "mean")
"""The poolings a classification head reads."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a block, by attribute name: what LoRA may adapt."""
RETRIEVAL_METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
"""What a retrieval evaluation reports for each query, averaged (``tasks.retrieval``)."""
METRICS = ("val_loss", "accuracy", "macro_f1", "chrf", "bleu", "exact_match", "token_f1", *RETRIEVAL_METRICS)
"""Validation metrics a run can select its best checkpoint by."""
HIGHER_IS_BETTER = frozenset(METRICS) - {"val_loss"}
RECOMPUTE = ("auto", "on", "off")
"""train.recompute: activation recomputation chosen by memory, always, or never."""
STRATEGIES = ("ddp", "fsdp")
"""Data-parallel strategies under torchrun."""
DTYPES = ("auto", "fp32", "bf16", "fp16")
TOKENIZER_MODELS = ("bpe", "unigram", "char")
EMBED_DTYPES = ("float32", "float16")
ROPE_SCALINGS = ("", "linear", "llama3")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    vocab_size: int = 4096
    """Target vocabulary size; reduced with a warning when the corpus is too small for it."""
    model_type: str = "bpe"
    """bpe, unigram or char."""
    character_coverage: float = 0.9995
    """Share of characters covered by the vocabulary; the rare rest go through byte fallback."""
    user_symbols: tuple[str, ...] = ()
    """Extra symbols always kept whole (e.g. ``<sep>``)."""
    byte_fallback: bool = True
    """Unknown characters become UTF-8 byte tokens instead of <unk>: nothing is ever lost."""
    max_sentences: int = 2_000_000
    """Cap on the lines the tokenizer trains on: a seeded sample of the whole corpus's lines."""
    sample_mb: int = 128
    """Cap on the text, in MB, of that sample (fewer lines when they are long): bounded memory."""
    max_sentence_length: int = 16384
    """Lines longer than this many bytes are skipped by the trainer (not by encoding)."""
    threads: int = 0
    """Trainer threads; 0 means all cores."""

    def __post_init__(self) -> None:
        _check(
            self.model_type in TOKENIZER_MODELS,
            "tokenizer.model_type",
            f"must be {_one_of(TOKENIZER_MODELS)}, not {self.model_type!r}",
        )
        _check(self.vocab_size >= 8, "tokenizer.vocab_size", "must be at least 8")
        _check(0.9 <= self.character_coverage <= 1.0, "tokenizer.character_coverage", "must be between 0.9 and 1.0")
        _check(self.max_sentences > 0, "tokenizer.max_sentences", "must be positive")
        _check(self.sample_mb > 0, "tokenizer.sample_mb", "must be positive")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    val_fraction: float = 0.1
    """Share held out for validation: the tail of each text file (cut at a line break), or that
    share of the records of JSON-lines and parquet files (whole, chosen by their hash)."""
    cache_dir: str = ""
    """Where token caches live; empty means $LLMKIT_CACHE or ~/.cache/llmkit."""
    sources: tuple[str, ...] = ()
    """Several corpora mixed by weight, each 'PATH=WEIGHT' (weights sum to 1); --mix sets it."""
    val: tuple[str, ...] = ()
    """Files held out for validation instead of each document's tail; --val sets it."""
    text_field: str = "text"
    """The field (JSON lines) or column (parquet) that holds the text."""
    workers: int = 0
    """Processes that tokenize the corpus; 0 means one per core."""
    dedup: bool = True
    """Drop exact-duplicate documents (same bytes) when building the token cache."""
    trust_mtime: bool = True
    """Take a file whose size and modification time are unchanged to be unchanged (no re-read);
    false hashes every file before looking the cache up."""
    shard_tokens: int = 1 << 24
    """Token ids per cache shard file (16M: 32 MB at uint16)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
        _check(self.workers >= 0, "data.workers", f"must not be negative, not {self.workers}")
        _check(self.shard_tokens >= 1024, "data.shard_tokens", f"must be at least 1024, not {self.shard_tokens}")
        _check(bool(self.text_field), "data.text_field", "must name a field")


MODEL_LIMITS = {
    "vocab_size": 1 << 22,
    "context": 1 << 21,
    "d_model": 1 << 16,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "d_ff": 1 << 20,
    "d_head": 1 << 12,
}
"""The largest network llmkit builds: far above any model it runs (a 4M vocabulary, a 2M-token
context, width 65,536, 1,024 layers), far below what a crafted header would ask for (a 10^8-layer
model, a 2^40-token cache). docs/reliability.md states them."""
MODEL_CHOICES = {
    "norm": ("rms", "layer"),
    "mlp": ("swiglu", "geglu", "gelu", "relu2"),
    "positions": ("rope", "learned"),
}
"""The named architecture options and their values."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 0
    """Set from the tokenizer; 0 in presets means 'take the tokenizer's'."""
    context: int = 256
    """Maximum sequence length (training block size)."""
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means n_head (plain multi-head)."""
    d_ff: int = 0
    """SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    """Dropout on each block's two residual branches while training (none on attention weights)."""
    tie_embeddings: bool = True
    d_head: int = 0
    """Size of one attention head; 0 means d_model / n_head (imported models may differ)."""
    attn_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    rope_scaling: str = ""
    """'' (none), linear, or llama3 (Llama 3.1+: long wavelengths stretched, short ones kept)."""
    rope_factor: float = 1.0
    """How much the context was stretched (rope_scaling linear and llama3)."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 0
    """The context the model was pretrained with before scaling (llama3)."""
    # The parts where other families differ from Llama (docs/architecture.md, "one network, named
    # options"): each default is Llama's, each is one field of a Hugging Face config.
    norm: str = "rms"
    """rms (RMSNorm) or layer (LayerNorm with a bias: GPT-2)."""
    norm_offset: float = 0.0
    """RMSNorm scales by (norm_offset + weight): 1 for Gemma, which stores weights around zero."""
    post_norms: bool = False
    """Norms after attention and after the MLP too, before each residual add (Gemma 2 and 3)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotary embedding (Qwen3, Gemma 3)."""
    attn_scale: float = 0.0
    """Queries scaled by attn_scale ** -0.5 (Gemma's query_pre_attn_scalar); 0: the head size."""
    mlp: str = "swiglu"
    """swiglu (SiLU-gated: Llama), geglu (GELU-tanh-gated: Gemma), gelu (ungated GELU-tanh: GPT-2)
    or relu2 (ungated squared ReLU: the modded-nanogpt speedruns; width 4 x d_model by default, the
    parameters of a SwiGLU of 8/3)."""
    bias: bool = False
    """Biases on every projection, attention output and MLP included (GPT-2)."""
    positions: str = "rope"
    """rope (rotary) or learned (an embedding per position, added to the tokens': GPT-2)."""
    embed_scale: bool = False
    """Token embeddings multiplied by sqrt(d_model) (Gemma)."""
    window: int = 0
    """Sliding-window attention: a token sees itself and the window - 1 tokens before it; 0: none."""
    global_every: int = 0
    """With a window, every global_every-th layer (the last of each group) sees everything
    (Gemma 3: 6, Gemma 2: 2); 0: every layer is windowed (Mistral)."""
    rope_local_theta: float = 0.0
    """RoPE base of the windowed layers (Gemma 3: 10,000); 0: rope_theta."""
    attn_softcap: float = 0.0
    """Attention scores squashed to (-cap, cap) by cap * tanh(s / cap) (Gemma 2); 0: none."""
    logit_softcap: float = 0.0
    """The same for the output logits (Gemma 2); 0: none."""
    zero_init: bool = False
    """Start each block's output projections (attention's o_proj, the MLP's down_proj) at zero, so
    every block begins as the identity (the speedruns); false: GPT-2's depth-scaled normal init."""

    def __post_init__(self) -> None:
        for key in ("context", "d_model", "n_layer", "n_head"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        for key, high in MODEL_LIMITS.items():  # a header from a stranger never sizes an allocation unchecked
            value = getattr(self, key)
            _check(isinstance(value, int) and value <= high, f"model.{key}",
                   f"must be a whole number of at most {high}, not {value!r}")  # fmt: skip
        _check(self.vocab_size >= 0, "model.vocab_size", "must not be negative")
        _check(self.d_head >= 0, "model.d_head", "must not be negative")
        if not self.d_head:
            _check(
                self.d_model % self.n_head == 0,
                "model.d_model",
                f"{self.d_model} is not divisible by model.n_head={self.n_head}",
            )
        _check(
            self.head_dim % 2 == 0 or self.positions != "rope",
            "model.d_model",
            "head size (d_model / n_head, or model.d_head) must be even for rotary embeddings",
        )
        _check(
            self.rope_scaling in ROPE_SCALINGS,
            "model.rope_scaling",
            f"must be {_one_of(ROPE_SCALINGS)}, not {self.rope_scaling!r}",
        )
        _check(self.rope_factor >= 1.0, "model.rope_factor", "must be at least 1")
        _check(
            self.n_head % self.kv_heads == 0,
            "model.n_kv_head",
            f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        for key, allowed in MODEL_CHOICES.items():
            value = getattr(self, key)
            _check(value in allowed, f"model.{key}", f"must be {_one_of(allowed)}, not {value!r}")
        for key in ("norm_offset", "attn_scale", "rope_local_theta", "attn_softcap", "logit_softcap"):
            value = getattr(self, key)
            _check(isinstance(value, (int, float)) and 0 <= value < 1e9, f"model.{key}",
                   f"must be a number in [0, 1e9), not {value!r}")  # fmt: skip
        _check(
            0 <= self.window <= MODEL_LIMITS["context"], "model.window", f"must be in [0, context], not {self.window}"
        )
        _check(0 <= self.global_every <= self.n_layer or not self.window, "model.global_every",
               f"must be in [0, n_layer], not {self.global_every}")  # fmt: skip

    def windowed(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window (else it sees every earlier token)."""
        if not self.window:
            return False
        return not self.global_every or (layer + 1) % self.global_every != 0

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "relu2":
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 64) * 64


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """Decoupled (AdamW); never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    optimizer: str = "adamw"
    """adamw, or muon: the blocks' weight matrices follow Muon (momentum orthogonalised by
    Newton-Schulz, its step scaled to AdamW's size so lr carries over), everything else AdamW."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    schedule: str = "cosine"
    """cosine (warmup, then cosine decay to lr x min_lr_ratio) or wsd (warmup, constant, then a
    linear warm-down to lr x min_lr_ratio over the last ``cooldown`` of the budget)."""
    cooldown: float = 0.4
    """The share of the budget the wsd schedule spends decaying."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be positive, not {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must not be negative")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must not be negative")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must not be negative")
        named = f"must be {_one_of(OPTIMIZERS)}, not {self.optimizer!r}"
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", named)
        _check(0 <= self.muon_momentum < 1, "optim.muon_momentum", "must be in [0, 1)")
        _check(self.schedule in SCHEDULES, "optim.schedule", f"must be {_one_of(SCHEDULES)}, not {self.schedule!r}")
        _check(0 < self.cooldown <= 1, "optim.cooldown", "must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process); derived from global_batch_size when that is set."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all processes and micro-batches (0: batch_size x grad_accum
    x processes). Keeps its meaning under any number of processes that divides it evenly."""
    strategy: str = "ddp"
    """Under torchrun: ddp (replicated weights, DistributedDataParallel) or fsdp (sharded, FSDP2)."""
    recompute: str = "auto"
    """Recompute each block's activations in the backward pass instead of keeping them: about a
    third more compute for a fraction of the memory. auto: on when a micro-batch's activations
    would take more than half the memory available as the run starts; on; off."""
    steps: int = 0
    """Stop after this many optimizer steps (0: no step limit)."""
    tokens: int = 0
    """Stop after this many training tokens (0: no token limit)."""
    time: str = ""
    """Stop after this much training time, e.g. 90s, 10m, 1h30m ('': no time limit)."""
    eval_every: int = 100
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 0
    """Batches of validation data per evaluation (a fixed, evenly spread set); 0: eval_every / 12
    within 2..20, so evaluating costs about 3% of the training compute (its standard error is
    reported with the loss)."""
    patience: int = 5
    """Stop after this many evaluations without improvement; 0 disables early stopping."""
    min_delta: float = 0.0
    """A validation loss counts as an improvement only when it beats the best by more than this."""
    save_every: int = 500
    """Write a step checkpoint (and last/) every this many steps."""
    keep_checkpoints: int = 2
    """Step checkpoints kept besides best/ and last/; 0 keeps all."""
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (fastest correct for the device), fp32, bf16 or fp16."""
    compile: str = "auto"
    """torch.compile the model: auto (when the speed probe finds that it pays within the run's
    budget, on a CPU), true or false."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    samples: int = 3
    """Sample lines generated at the end of training."""
    report: bool = True
    """Write report.html in the run directory: at the end, and at evaluations (every 30 s at most,
    under 2% of the run's time)."""
    epochs: float = 0.0
    """Stop after this many passes over the training data (0: no epoch limit)."""
    length_buckets: int = -1
    """Fine-tuning: batches of similar lengths, sorted within buckets of this many batches of the
    shuffled epoch (less padding), on sets of at least two buckets; 0: the plain shuffle; -1: 50
    for instruct and translate, 0 for classification (where lengths may follow the labels)."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "train.batch_size", f"must be positive, not {self.batch_size}")
        _check(self.grad_accum > 0, "train.grad_accum", f"must be positive, not {self.grad_accum}")
        _check(self.recompute in RECOMPUTE, "train.recompute", f"must be {_one_of(RECOMPUTE)}, not {self.recompute!r}")
        _check(self.steps >= 0, "train.steps", f"must not be negative, not {self.steps}")
        _check(self.tokens >= 0, "train.tokens", f"must not be negative, not {self.tokens}")
        _check(self.eval_every > 0, "train.eval_every", "must be positive")
        _check(self.eval_batches >= 0, "train.eval_batches", "must not be negative")
        _check(self.patience >= 0, "train.patience", "must not be negative")
        _check(self.min_delta >= 0, "train.min_delta", "must not be negative")
        _check(self.save_every > 0, "train.save_every", "must be positive")
        _check(self.log_every > 0, "train.log_every", "must be positive")
        _check(self.epochs >= 0, "train.epochs", f"must not be negative, not {self.epochs}")
        _check(self.length_buckets >= -1, "train.length_buckets", "must be -1 (auto), 0 or more")
        _check(self.global_batch_size >= 0, "train.global_batch_size", "must not be negative")
        _check(self.strategy in STRATEGIES, "train.strategy", f"must be {_one_of(STRATEGIES)}, not {self.strategy!r}")
        switch = {
            "true": "true",
            "yes": "true",
            "on": "true",
            "1": "true",
            "false": "false",
            "no": "false",
            "off": "false",
            "0": "false",
        }
        object.__setattr__(self, "compile", switch.get(str(self.compile).lower(), str(self.compile).lower()))
        _check(
            self.compile in ("auto", "true", "false"),
            "train.compile",
            f"must be auto, true or false, not {self.compile!r}",
        )
        _check(self.dtype in DTYPES, "train.dtype", f"must be {_one_of(DTYPES)}, not {self.dtype!r}")
        _check(
            bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)),
            "train.device",
            f"must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}",
        )
        if self.time:
            parse_duration(self.time, "train.time")

    @property
    def time_s(self) -> float:
        return parse_duration(self.time, "train.time") if self.time else 0.0

    def accumulation(self, world: int) -> int:
        """Micro-batches per process per optimizer step, for a world of ``world`` processes."""
        if not self.global_batch_size:
            return self.grad_accum
        per = self.batch_size * world
        _check(
            self.global_batch_size % per == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of train.batch_size {self.batch_size} x {world} "
            f"process(es) = {per}",
        )
        return self.global_batch_size // per

    @property
    def eval_sample(self) -> int:
        """Validation batches per evaluation: eval_batches, or the automatic size. A forward pass
        costs about a third of a training step, so eval_every / 12 batches is ~3% of the steps'."""
        return self.eval_batches or min(max(round(self.eval_every / 12), 2), 20)

    def global_batch(self, world: int) -> int:
        return self.batch_size * self.accumulation(world) * world

    @property
    def has_budget(self) -> bool:
        return bool(self.steps or self.tokens or self.time or self.epochs)

    def budget_text(self) -> str:
        """The stopping budget in words, e.g. '20000 steps' or '90s or 500 steps'."""
        parts = [
            f"{self.steps} steps" if self.steps else "",
            f"{self.tokens:,} tokens" if self.tokens else "",
            self.time,
            f"{self.epochs:g} epochs" if self.epochs else "",
        ]
        return " or ".join(p for p in parts if p) or "none"


BUDGET_KEYS = ("steps", "tokens", "time", "epochs")
"""train keys that together make the stopping budget: one given replaces the others of a base."""


TASK_KINDS = ("lm", "classify", "instruct", "translate", "embed")
DEFAULT_TEMPLATES = {
    "instruct": "### Instruction :\n{prompt}\n\n### Réponse :\n",
    "translate": "Texte :\n{prompt}\nTraduction :\n",
}
DEFAULT_METRICS = {
    "lm": "val_loss",
    "classify": "macro_f1",
    "instruct": "val_loss",
    "translate": "chrf",
    "embed": "ndcg@10",
}
EMBED_PREFIXES = {"query_prefix": "query: ", "passage_prefix": "passage: "}
"""An embedding run's default instruction prefixes (the E5 convention): a question and the passage
that answers it are different kinds of text, and the model is told which one it reads."""


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What a checkpoint was trained to do; later commands read it instead of asking for flags."""

    kind: str = "lm"
    """lm (next-token prediction), classify, instruct, translate or embed (retrieval vectors)."""
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    src_field: str = "src"
    tgt_field: str = "tgt"
    query_field: str = "query"
    positive_field: str = "positive"
    negative_field: str = "negative"
    labels: tuple[str, ...] = ()
    """The classifier's label map (index -> label), taken from the training data."""
    pooling: str = "last"
    """Classifier or embedding input: the hidden state of the last real token, or the mean over
    real tokens (an embedding run's default)."""
    query_prefix: str = ""
    """embed: text put before every query (a question, a search) when it is encoded."""
    passage_prefix: str = ""
    """embed: text put before every passage (a document of the collection) when it is encoded."""
    temperature: float = 0.05
    """embed: the contrastive loss's temperature (cosine similarities are divided by it)."""
    class_weights: str = "none"
    """none, or balanced (weights inversely proportional to class frequency)."""
    freeze_trunk: bool = False
    """Train the classification head only (a linear probe)."""
    mask_prompt: bool = True
    """instruct/translate: the loss covers the response only."""
    template: str = ""
    """The prompt template ({prompt} marks the input); 'chat' uses the model's own chat template,
    'chat:TEXT' too with each input put through TEXT first (an instruction, say); '' means the
    task's default (the chat template for instruct when the model has one)."""
    val_fraction: float = 0.1
    """Share of the training examples held out when no --val file is given."""
    eval_limit: int = 200
    """Validation examples decoded per evaluation (translate) or generated as samples (instruct: 3)."""
    max_new_tokens: int = 64
    """Length limit when decoding during validation and eval."""
    metric: str = ""
    """The validation metric that picks best/ ('' means the task's: val_loss, macro_f1 or chrf)."""
    init_from: str = ""
    """The checkpoint fine-tuning started from (recorded for provenance)."""

    def __post_init__(self) -> None:
        _check(self.kind in TASK_KINDS, "task.kind", f"must be one of {', '.join(TASK_KINDS)}, not {self.kind!r}")
        _check(
            self.pooling in CLASSIFIER_POOLINGS,
            "task.pooling",
            f"must be {_one_of(CLASSIFIER_POOLINGS)}, not {self.pooling!r}",
        )
        _check(
            self.class_weights in ("none", "balanced"),
            "task.class_weights",
            f"must be none or balanced, not {self.class_weights!r}",
        )
        _check(
            not self.template or self.template == "chat" or self.template.removeprefix("chat:").count("{prompt}") == 1,
            "task.template",
            "must contain {prompt} exactly once (or be 'chat': the model's chat template, or "
            "'chat:TEXT' with {prompt} in TEXT: an instruction inside the model's chat format)",
        )
        _check(0.0 < self.val_fraction < 0.5, "task.val_fraction", "must be in (0, 0.5)")
        _check(0.0 < self.temperature <= 1.0, "task.temperature", f"must be in (0, 1], not {self.temperature}")
        _check(self.eval_limit > 0, "task.eval_limit", "must be positive")
        _check(self.max_new_tokens > 0, "task.max_new_tokens", "must be positive")
        _check(
            not self.metric or self.metric in METRICS,
            "task.metric",
            f"must be one of {', '.join(METRICS)}, not {self.metric!r}",
        )

    @property
    def prompt_template(self) -> str:
        return self.template or DEFAULT_TEMPLATES.get(self.kind, "{prompt}")

    @property
    def best_metric(self) -> str:
        return self.metric or DEFAULT_METRICS[self.kind]

    @property
    def uses_template(self) -> bool:
        return self.kind in ("instruct", "translate")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    enabled: bool = False
    """Train low-rank adapters instead of every weight."""
    rank: int = 8
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers to adapt, by name (any of LORA_TARGETS)."""

    def __post_init__(self) -> None:
        _check(self.rank > 0, "lora.rank", f"must be positive, not {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be positive, not {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(
            bool(self.targets) and not bad,
            "lora.targets",
            f"unknown layer {bad[0]!r}" if bad else "must name at least one layer",
        )


def _shown(value: float) -> str:
    """A number in a message: integers whole (1000000, not 1e+06), others as %g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


MIN_TEMPERATURE = 1e-3
"""The smallest temperature that samples (0 is greedy): logits divided by less overflow float32."""
SAMPLE_LIMITS: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 1_000_000),
    "temperature": (0, 100),
    "top_k": (0, 1 << 20),
    "min_p": (0, 1),
    "repetition_penalty": (0, 100),
    "presence_penalty": (-100, 100),
    "frequency_penalty": (-100, 100),
    "no_repeat_ngram": (0, 1024),
    "num_beams": (1, 64),
    "length_penalty": (-10, 10),
    "seed": (0, (1 << 63) - 1),
    "num_samples": (1, 1024),
    "batch_size": (1, 4096),
    "lookup": (0, 64),
    "draft_tokens": (0, 64),
}
"""Every numeric decoding setting's range, checked before any work (a request or a flag out of
range is one line, never a failure in the middle of a batch or an allocation of gigabytes):
docs/reliability.md states them."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Decoding settings (docs/generate.md says what each does to a small model)."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    """0 means greedy."""
    top_k: int = 50
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches p; 1 disables."""
    min_p: float = 0.0
    """Keep tokens at least min_p times as likely as the most likely one; 0 disables."""
    repetition_penalty: float = 1.0
    """> 1 discourages any token already in the text (CTRL); 1 disables."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already present."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence so far."""
    no_repeat_ngram: int = 0
    """Never repeat an n-gram of this size; 0 disables."""
    num_beams: int = 1
    """Beam search with this many beams (deterministic); 1 is greedy or sampling."""
    length_penalty: float = 1.0
    """Beam scores are log-probability / length ** length_penalty: > 1 favours longer outputs."""
    early_stopping: bool = True
    """Beam search stops once num_beams hypotheses have ended."""
    stop: tuple[str, ...] = ()
    """Text that ends the output (not included)."""
    seed: int | None = None
    num_samples: int = 1
    """Outputs per prompt."""
    batch_size: int = 8
    """Prompts decoded together."""
    lookup: int = 0
    """Prompt lookup decoding: guess the next tokens by matching the last n-gram (up to this n)
    earlier in the text, checked by the model in one pass; greedy only; 0 disables."""
    draft_tokens: int = 0
    """Tokens guessed per pass by --draft or --lookup; 0: 4 for a draft model (each guess costs
    a draft pass), 8 for lookup (guesses are free; the pacer trims passes where they do not pay)."""

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "length_penalty",
        ):
            value = getattr(self, name)
            _check(math.isfinite(value), f"--{name.replace('_', '-')}", f"must be a finite number, not {value}")
        for name, (low, high) in SAMPLE_LIMITS.items():
            value = getattr(self, name)
            if value is not None:
                _check(
                    low <= value <= high,
                    f"--{name.replace('_', '-')}",
                    f"must be in [{_shown(low)}, {_shown(high)}], not {_shown(value)}",
                )
        _check(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, "--temperature",
               f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, not {self.temperature:g}: below that "
               "sampling is greedy in all but name, and the scaled logits overflow")  # fmt: skip
        _check(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], not {self.top_p}")
        _check(self.repetition_penalty > 0, "--repetition-penalty", "must be positive")
        _check(all(self.stop), "--stop", "must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether any setting depends on the tokens generated so far."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram > 0
        )


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """How ``encode`` turns items into vectors (recorded in every index it writes)."""

    pooling: str = "mean"
    """mean, last, max or first, over real tokens."""
    layer: int = -1
    """Hidden layer: 0 the embeddings, n_layer (= -1) the final normalised states."""
    normalize: bool = False
    """Unit-length vectors."""
    max_length: int = 0
    """Truncate items to this many tokens (0: the model's context)."""
    dtype: str = "float32"
    """Stored vectors: float32 or float16."""
    pad_side: str = "right"
    """Padding side inside a batch (the vectors are the same either way)."""
    prefix: str = ""
    """Text put before every item (an embedding model's passage prefix)."""
    query_prefix: str = ""
    """Text put before a search query (an embedding model's query prefix)."""

    def __post_init__(self) -> None:
        _check(self.pooling in POOLINGS, "--pooling", f"must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        _check(self.dtype in EMBED_DTYPES, "--dtype", f"must be {_one_of(EMBED_DTYPES)}, not {self.dtype!r}")
        _check(self.max_length >= 0, "--max-length", f"must not be negative, not {self.max_length}")
        _check(self.pad_side in ("left", "right"), "pad_side", "must be left or right")


def embed_settings(task: TaskConfig, **given: Any) -> EmbedConfig:
    """How a checkpoint's texts become vectors: an embedding model's own pooling, prefixes and unit
    length (recorded by ``finetune --task embed``), otherwise EmbedConfig's defaults; ``given``
    (options the user set, None = not set) wins over both."""
    own = (
        {"pooling": task.pooling, "normalize": True, "prefix": task.passage_prefix, "query_prefix": task.query_prefix}
        if task.kind == "embed"
        else {}
    )
    return EmbedConfig(**{**own, **{k: v for k, v in given.items() if v is not None}})


EXACT_BELOW = 50_000
"""Vectors under which ``encode`` builds no approximate index by default: exact search of them
takes about 10 ms on one core (41 ms for 200,000 of dimension 576: docs/benchmarks.md,
"Approximate nearest neighbours"), within what a search through the index may take."""


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "num_samples")


def sample_config(given: Mapping[str, Any]) -> SampleConfig:
    """Build decoding settings from the options a user actually gave (None = not given).

    Beam search is deterministic: combining it with sampling options is refused rather than
    silently ignoring them.
    """
    values = {k: v for k, v in given.items() if v is not None}
    if values.get("num_beams", 1) > 1:
        clash = [
            f"--{k.replace('_', '-')}"
            for k in SAMPLING_KEYS
            if k in values and not (k == "temperature" and values[k] == 0)
        ]
        if clash:
            raise ConfigError(
                f"--num-beams {values['num_beams']} cannot be combined with {', '.join(clash)}: "
                "beam search is deterministic (use --num-beams 1 to sample)"
            )
        values["temperature"] = 0.0
    hints = typing.get_type_hints(SampleConfig)
    return SampleConfig(**{k: _coerce(v, hints[k], f"--{k.replace('_', '-')}") for k, v in values.items()})


def parse_duration(text: str, key: str = "time") -> float:
    """'90s', '10m', '1h30m', '2.5h' or a bare number of seconds -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|s)", s)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
            raise ConfigError(f"{key}: cannot read {text!r} as a duration (try 90s, 10m or 1h30m)")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be positive, not {text!r}")
    return seconds


# Fine-tuning starts from a trained model: a short warmup, a lower rate, frequent validation.
FINETUNE_DEFAULTS = {
    "optim": {"lr": 3e-4, "warmup_steps": 20, "weight_decay": 0.0},
    "train": {"batch_size": 16, "eval_every": 50, "save_every": 200, "patience": 5, "samples": 0},
}
LORA_LR = 1e-3
"""Fine-tuning's rate with LoRA: adapters start at zero and are small, so they take a higher one."""
LARGE_BASE_PARAMS = 100_000_000
LARGE_BASE_LR = 5e-5
"""Full fine-tuning's rate for a base of LARGE_BASE_PARAMS or more: a pretrained model of hundreds
of millions of parameters forgets what it knew at 3e-4 (Gemma 3 270M on SIB-200: 0.74 accuracy at
3e-4, val loss rising from step 25; 0.83 by step 100 at 5e-5, docs/benchmarks.md)."""
EMBED_LR = 2e-4
"""An embedding run's rate for a large base: contrastive training must first spread vectors that
all point one way (SmolLM2's PIAF passages: the first ten hits within 0.02 cosine), and at
LARGE_BASE_LR it barely starts (nDCG@10 0.26 after 8 steps of 32 pairs, against 0.43 after 6 at
2e-4: docs/benchmarks.md "Retrieval")."""
FINETUNE_EPOCHS = 3.0
"""Fine-tuning's budget when none is given."""


# --- the run config: the sections a run composes -------------------------------------------------

SECTIONS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "task": TaskConfig,
    "lora": LoRAConfig,
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.optim.optimizer == "muon" and self.train.strategy == "fsdp"),
            "optim.optimizer",
            "muon needs each weight matrix whole, and --strategy fsdp shards them: use --strategy ddp",
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, section: str, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _one_of(values: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def default_of(cls: type, name: str) -> Any:
    """A field's default value: help texts and constants take it from here, never repeat it."""
    f = cls.__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        text = str(value).replace("_", "").strip()
        scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1.0) if text else 1.0
        try:
            # YAML reads 1e5 as a string; accept it (and 5M, 200k) when it is a whole number.
            number = float(text[:-1] if scale != 1.0 else text) * scale
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            # PyYAML reads 3e-4 (no dot) as a string: coerce by the declared type instead.
            number = float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan and inf pass every comparison check silently
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return "" if value is None else str(value)
    return value


def build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Instantiate one section dataclass from a mapping, coercing types; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the name check above
        raise ConfigError(f"{section}: {e}") from None


def _merge(base: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown config section '{section}'{_suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping of keys")
        base.setdefault(section, {}).update(values)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file with safe_load; errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return data


def cache_home() -> Path:
    """Where llmkit keeps what it can rebuild (token caches, imported models, speed probes):
    ``$LLMKIT_CACHE``, else ~/.cache/llmkit."""
    env = os.environ.get("LLMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmkit"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("llmkit.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, names)}; presets: {', '.join(names)}")
    return yaml.safe_load(resources.files("llmkit.presets").joinpath(f"{name}.yaml").read_text("utf-8")) or {}


def parse_set(item: str) -> tuple[str, str, str]:
    """'train.steps=100' -> ('train', 'steps', '100')."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, value = item.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. train.steps=100)")
    section, key = dotted.strip().split(".")
    return section, key, value.strip()


def resolve_run_config(
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    base: Mapping[str, Any] | None = None,
    defaults: Callable[[RunConfig], Mapping[str, Mapping[str, Any]]] | None = None,
) -> RunConfig:
    """Layer defaults < base < preset < config file < --set < flags into a RunConfig.

    ``defaults(cfg)`` adds defaults that depend on what the user chose (fine-tuning with LoRA
    takes a higher learning rate): it sees the config resolved without them, and what it returns
    is layered under the user's own layers (config file, --set, flags), so a value the user gave
    always wins. One precedence system: nothing re-reads the user's files to find what was given.
    """
    below: dict[str, dict[str, Any]] = {}
    if base:
        _merge(below, base, "base config")
    if preset:
        _merge(below, load_preset(preset), f"preset {preset}")
    user: dict[str, dict[str, Any]] = {}
    if config_file:
        _merge(user, load_yaml(config_file), str(config_file))
    for item in sets:
        section, key, value = parse_set(item)
        # A --set value is parsed as YAML so lists and booleans work; coercion follows the field.
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        _merge(user, {section: {key: parsed}}, f"--set {item}")
    for section, values in (flags or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            _merge(user, {section: given}, "flags")
    if any(k in user.get("train", {}) for k in BUDGET_KEYS):
        # A budget given now replaces the base's whole budget (a resumed run's --time 90s must not
        # outlive a new --steps 20000), while other base values stay.
        below["train"] = {k: v for k, v in below.get("train", {}).items() if k not in BUDGET_KEYS}
    cfg = _build(below, user)
    extra = defaults(cfg) if defaults else None
    if extra:
        _merge(below, extra, "derived defaults")
        cfg = _build(below, user)
    return cfg


def _build(*layers: Mapping[str, Mapping[str, Any]]) -> RunConfig:
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return RunConfig(**{name: build_section(cls, merged.get(name, {}), name) for name, cls in SECTIONS.items()})


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved in a run directory or checkpoint."""
    return resolve_run_config(base=data)
