"""The one switch for llmkit's performance machinery, kept outside the model's definition.

``transformer.py`` is plain PyTorch that reads like the paper: ``nn.Linear`` layers, one
``scaled_dot_product_attention`` call, modules initialised as they are built. What makes it fast on
the machines llmkit meets lives here, applied to a built model by the code that runs it:

- ``for_decoding``: the linear layers take decoding's few-row products in the layout this machine
  reads fastest (``few_rows.py``: probed per machine and shape, main thread only);
- ``for_training``: under bf16 autocast on a CPU, attention alone runs in fp32 — torch's CPU
  attention kernel is ~4x slower backward in bf16 (docs/benchmarks.md), and fp32 is also the more
  precise of the two;
- ``building``: modules built without initialising weights that a checkpoint overwrites next;
- ``recompute``: blocks that keep only their input for the backward pass and run their forward
  again there (activation checkpointing) — memory, not speed: chosen by ``train.recompute``, not
  by the switch below.

Each is a swap of a module's class (``nn.Linear`` -> ``FewRowLinear``, ``Attention`` ->
``Fp32CpuAttention``): the same parameters, the same state dict, so checkpoints, LoRA, int8 and
interop see no difference. ``LLMKIT_PLAIN=1`` turns the first three off: in fp32 every output is
identical either way (``tests/test_model.py``), only slower.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmkit.core.model import few_rows
from llmkit.core.model.transformer import Attention, Block, Transformer


def enabled() -> bool:
    """The switch: on unless the environment says ``LLMKIT_PLAIN=1``."""
    return os.environ.get("LLMKIT_PLAIN", "") in ("", "0")


class Fp32CpuAttention(Attention):
    """Attention computed in fp32 when its inputs are bf16 on a CPU (autocast off around it)."""

    def attend(self, q, k, v, mask):
        if q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return super().attend(q, k, v, mask)
        with torch.autocast("cpu", enabled=False):
            return super().attend(q.float(), k.float(), v.float(), mask).to(q.dtype)  # (B, H, T, D)


def for_decoding(model: nn.Module) -> nn.Module:
    """Decoding's products in this machine's fastest layout (a probe, cached, the first time)."""
    if enabled():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = few_rows.FewRowLinear
        few_rows.tune(model)
    return model


def for_training(model: nn.Module) -> nn.Module:
    """Attention in fp32 under CPU bf16 autocast."""
    if enabled():
        for m in model.modules():
            if type(m) is Attention:
                m.__class__ = Fp32CpuAttention
    return model


class RecomputedBlock(Block):
    """A block whose activations are recomputed in the backward pass (training only): what it
    keeps for backward is its input, (B, T, C), instead of every intermediate of attention and MLP.
    The gradients are the same: the forward runs again with the same inputs and RNG state."""

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        if not (self.training and torch.is_grad_enabled() and cache is None):
            return super().forward(x, rope, mask, cache, input_pos)
        return checkpoint(super().forward, x, rope, mask, use_reentrant=False)


def recompute(model: nn.Module) -> nn.Module:
    """Every block of ``model`` recomputes its activations in the backward pass."""
    for m in model.modules():
        if type(m) is Block:
            m.__class__ = RecomputedBlock
    return model


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Build modules without initialising their weights (the checkpoint's come next).

    The same saving as building on the ``meta`` device, without its cost: a meta-device context
    imports torch's decomposition machinery on first use, about two seconds of start-up for every
    command that loads a model. It patches the classes' initialisers for the duration, so it is
    for the main thread's loading code only.
    """
    if not enabled():
        yield
        return
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    saved_init = Transformer._init_weights
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        Transformer._init_weights = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn
        Transformer._init_weights = saved_init
