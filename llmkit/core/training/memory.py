"""What a training step holds in memory, and whether blocks recompute their activations.

A step keeps every block's intermediate activations for the backward pass: for a pretrained base
of hundreds of millions of parameters and a batch of long passages that is tens of gigabytes
(SmolLM2-135M, 32 PIAF question/paragraph pairs in bf16 on a CPU: 17.9 GB resident, of which the
weights, gradients and AdamW's moments are 2.2 GB). ``train.recompute=auto`` estimates it from
the longest micro-batch the task can draw and recomputes when it would take more than half of the
memory available when the run starts (on a busy machine, less is available, and it turns on
sooner).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from llmkit.core.config import ModelConfig

ACT_BYTES = 80
"""Bytes kept per token, per layer and per model dimension by a training step: measured on
SmolLM2-135M under CPU bf16 autocast (15.7 GB for 11.8k padded tokens x 30 layers x 576)."""
SHARE = 0.5
"""The share of available memory a step's activations may take before blocks recompute them."""


def available_memory(device: torch.device) -> int:
    """Bytes this process can still take: the GPU's free memory, or the least of the machine's
    MemAvailable and the room left under a container's cgroup limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    room = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    if not room:  # no /proc: the physical memory, as the last resort
        room.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return max(min(room), 0)


def activation_bytes(cfg: ModelConfig, batch_tokens: int) -> int:
    """Estimated activations one micro-batch of ``batch_tokens`` padded tokens keeps for backward."""
    return batch_tokens * cfg.n_layer * cfg.d_model * ACT_BYTES


def plan_recompute(setting: str, cfg: ModelConfig, batch_tokens: int, device: torch.device) -> tuple[bool, str]:
    """Whether blocks recompute their activations, and why (for the run's model line)."""
    if setting != "auto":
        return setting == "on", f"train.recompute={setting}"
    need, room = activation_bytes(cfg, batch_tokens), available_memory(device)
    gb = 1 << 30
    if need > SHARE * room:
        return True, f"a micro-batch's activations ~{need / gb:.1f} GB, {room / gb:.1f} GB available"
    return False, f"activations ~{need / gb:.1f} GB fit in {room / gb:.1f} GB available"
