"""This machine, as measurements are keyed: its processor (model and the flags that decide kernels),
torch, llmkit and the thread count; and the file where per-machine measurements are kept.

The speed probe (``speed.py``: precision and compilation of a training step) and the few-row
probe (``few_rows.py``: the layout of decoding's products) both measure instead of guessing, and
both remember: ``<cache>/speed.json`` holds ``{machine_key: {shape or probe key: figures}}``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from llmkit import __version__
from llmkit.core.atomic import atomic_write
from llmkit.core.config import ModelConfig, cache_home

CACHE_VERSION = 1
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
# Variables that cap the instruction set torch's kernel libraries use (ATen's own kernels report
# theirs through get_cpu_capability): the same processor under a cap runs another machine's code.
_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is no such file)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block ends; the others repeat it
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name", "unknown")


def machine_key() -> str:
    flags = ",".join(f for f in _FLAGS if f in cpu_flags())

    # llmkit's version too: a new release may run the same shape differently (attention, kernels).
    key = f"{cpu_model()}|{flags}|torch {torch.__version__}|llmkit {__version__}|threads {torch.get_num_threads()}"
    return key + f"|kernels {kernels()}"


def kernels() -> str:
    """The instruction set torch's kernels run here: ATen's dispatch level (``ATEN_CPU_CAPABILITY``
    lowers it), plus any cap set on oneDNN or MKL, e.g. ``AVX512`` or ``AVX2 ONEDNN_MAX_CPU_ISA=AVX2``."""
    caps = [f"{name}={os.environ[name]}" for name in _ISA_CAPS if os.environ.get(name)]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *caps])


def shape_key(cfg: ModelConfig, batch: int) -> str:
    fields = (
        cfg.vocab_size,
        cfg.context,
        cfg.d_model,
        cfg.n_layer,
        cfg.n_head,
        cfg.kv_heads,
        cfg.ff_dim,
        cfg.head_dim,
        cfg.dropout > 0,
        cfg.tie_embeddings,
        batch,
    )
    return "v{}|T{}|d{}|L{}|H{}|G{}|F{}|D{}|drop{}|tie{}|B{}".format(*fields)


def cache_path() -> Path:
    return cache_home() / "speed.json"


def read_cache() -> dict[str, Any]:
    """Every machine's recorded figures; empty when absent, unreadable or of another version."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("version") == CACHE_VERSION else {}


def write_cache(data: dict[str, Any]) -> None:
    path = cache_path()
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run a probe
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({**data, "version": CACHE_VERSION}, indent=1))
