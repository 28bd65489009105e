"""Device, precision and threads: what runs where, and how fast.

Precision 'auto' picks the fastest correct choice for the device:
- CUDA: bf16 autocast where the GPU supports it, else fp16 with a gradient scaler;
- CPU: bf16 autocast when the processor has native bf16 matrix units (AMX or AVX512-BF16) and
  the model is wide enough for the matmuls to dominate (measured: docs/benchmarks.md), else fp32.
Weights and optimizer state stay fp32 in every case (mixed precision, not bf16 training).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.core.errors import ConfigError
from llmkit.core.host.machine import cpu_flags

# Below this width the bf16 casts cost more than the matmuls gain on a CPU (measured on an AMX
# CPU: see docs/benchmarks.md, "precision").
CPU_BF16_MIN_WIDTH = 256


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {spec} requested but CUDA is not available here")
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("train.device: mps requested but it is not available here")
    return torch.device(spec)


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(spec: str, device: torch.device, d_model: int) -> Precision:
    if spec != "auto":
        if spec == "fp16" and device.type == "cpu":
            raise ConfigError("train.dtype: fp16 is not supported on the CPU; use bf16 or fp32")
        return Precision(spec, "requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "GPU supports bf16")
        return Precision("fp16", "GPU lacks bf16")
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            return Precision("fp32", "CPU has no native bf16 units")
        if d_model < CPU_BF16_MIN_WIDTH:
            return Precision("fp32", f"model width {d_model} < {CPU_BF16_MIN_WIDTH}: bf16 casts outweigh the gain")
        return Precision("bf16", "CPU has AMX/AVX512-BF16 matrix units")
    return Precision("fp32", "default")


def autocast(device: torch.device, precision: Precision):
    dtype = precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """How many other tasks are running right now: the median count of runnable tasks in
    /proc/loadavg over a few short samples, less this one. 0 where it cannot be read.

    Instantaneous on purpose: the 1-minute load average still counts the set-up or the test that
    just finished, which would starve a run on a machine that is idle now.
    """
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return 0
        counts.append(int(running))
        if i + 1 < samples:
            time.sleep(interval)
    return max(sorted(counts)[len(counts) // 2] - 1, 0)


def machine_busy() -> bool:
    """Whether other work holds at least half the cores now: a speed measured then is provisional
    (the speed probe and the decoding layout probe measure again once the machine is quiet)."""
    return busy_cores() >= max(1, (os.cpu_count() or 1) // 2)


def set_threads(n: int) -> tuple[int, str]:
    """Set torch's CPU threads: ``n`` when given; else one per core that is free now.

    torch's default (one per core) collapses when other programs already use the cores: on a
    2-core machine under a load of 8, one thread ran 4-8x faster than two. Returns (threads, why).
    """
    if n > 0:
        torch.set_num_threads(n)
        return n, "requested (train.threads)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default = torch.get_num_threads()
    busy = busy_cores()
    if busy and busy >= cores - default + 1:
        threads = max(1, min(default, cores - busy))
        torch.set_num_threads(threads)
        return threads, f"{busy} other task(s) running on {cores} cores: fewer threads than cores"
    return default, "one per core"
