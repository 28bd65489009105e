"""Products of a few rows by a large weight: the shape of decoding, made as fast as the memory allows.

A decoding step multiplies a handful of rows (one per sequence, or the few positions that check
speculative guesses) by every weight of the model, once: it is bound by reading the weights.
torch's ``F.linear`` computes such a product as ``x @ W.T``; measured on the CPUs here (MKL
kernels), that layout reaches about half the memory bandwidth that the same product computed as
``(W @ x.T).T`` does — 33 ms against 16 ms for SmolLM2-135M's 513 MB of fp32 weights at one
row, 55 against 16 ms at two (docs/benchmarks.md). One row is padded to two, since a single row
takes the matrix-vector kernel either way, which is the slow one.

Whether it pays depends on the processor, the thread count and whether the weights stay in
cache (a tiny model's do, and there one row is faster as it is), so it is not assumed: ``tune``
times both layouts on the model's own weights, for 1, 2, 4, 8 and 16 rows, once per machine
and model shape, and caches the answer beside the speed probe's figures; a row count between two
probed ones follows the one above it. Only ``FewRowLinear`` layers of a tuned model take the
other layout, only in the main thread (``tune`` says why) and only for inference (no autograd,
no autocast, fp32 on a CPU, not compiled): training and its products of thousands of rows never
change.
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.core.host import machine
from llmkit.core.host.device import machine_busy

MARGIN = 1.1
"""The transposed layout must be this much faster to be taken (timings on a shared machine are noisy)."""
PROBED_ROWS = (1, 2, 4, 8, 16)
"""The row counts timed; a count between two follows the one above it, and above the last none
takes the transposed layout."""


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as (W @ x.T).T: the same numbers up to rounding."""
    flat = x.reshape(-1, x.size(-1))  # (M, K)
    rows = flat.size(0)
    if rows == 1:
        flat = torch.cat([flat, flat])  # (2, K): one row would take the matrix-vector kernel
    y = (weight @ flat.T).T[:rows].contiguous()  # (M, N)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.size(0))  # (..., N)


class FewRowLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that multiplies few rows in the transposed
    layout when ``tune`` found it faster for its model on this machine."""

    fast_rows: frozenset[int] = frozenset()
    """The row counts that take the transposed layout (set by ``tune``)..."""
    tuned_in: int | None = None
    """...in the thread that ``tune`` measured in (``threading.get_ident()``), and only there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.fast_rows
            and not torch.compiler.is_compiling()  # a compiled graph decides its own products
            and x.numel() // max(x.size(-1), 1) in self.fast_rows
            and threading.get_ident() == self.tuned_in
            and _inference_fp32_cpu(x, self.weight)
        ):
            return transposed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _inference_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every ``FewRowLinear`` weight of ``model`` once (a tied head is the embedding)."""
    return list({id(m.weight): m.weight.detach() for m in model.modules() if isinstance(m, FewRowLinear)}.values())


def pass_seconds(weights: list[torch.Tensor], rows: int, products, repeats: int = 3) -> list[float]:
    """For each product, the fastest of ``repeats`` passes of ``rows`` rows through every weight
    (the products take turns, so a busy moment of a shared machine slows both)."""
    inputs = {w.size(1): torch.randn(rows, w.size(1)) for w in weights}
    best = [math.inf] * len(products)
    for _ in range(repeats):
        for i, product in enumerate(products):
            t0 = time.perf_counter()
            for w in weights:
                product(inputs[w.size(1)], w, None)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def probe(weights: list[torch.Tensor]) -> dict:
    """Time both layouts over ``weights`` (each read once per pass, as a decoding step does):
    ``{"faster": [probed row counts where the transposed layout wins], "timings": …}``."""
    timings, faster = {}, []
    for rows in PROBED_ROWS:
        plain, other = pass_seconds(weights, rows, (F.linear, transposed_linear))
        timings[str(rows)] = {"linear_ms": round(plain * 1e3, 3), "transposed_ms": round(other * 1e3, 3)}
        if other * MARGIN < plain:
            faster.append(rows)
    return {"rows": list(PROBED_ROWS), "faster": faster, "timings": timings, "busy": machine_busy()}


def fast_rows(faster: list[int]) -> frozenset[int]:
    """Every row count that takes the transposed layout: those whose probed count above wins."""
    return frozenset(m for m in range(1, PROBED_ROWS[-1] + 1) if min(p for p in PROBED_ROWS if p >= m) in faster)


def tune(model: nn.Module) -> None:
    """Set the model's ``FewRowLinear`` layers for decoding in the main thread from this machine's
    cached answer for the model's shape, probing on its own weights the first time. Once per
    model object.

    Other threads keep ``F.linear``: in a second thread (a server's decoding thread), once the main
    one has run torch's parallel work, MKL's multi-threaded products ran 2-4x slower here and
    varied from run to run (each thread has its own OpenMP team, and this machine wakes threads
    slowly), while the matrix-vector kernel did not — no answer measured there held."""
    if threading.current_thread() is not threading.main_thread() or getattr(model, "_few_rows_tuned", False):
        return
    model._few_rows_tuned = True
    layers = [m for m in model.modules() if isinstance(m, FewRowLinear)]
    weights = linear_weights(model)
    if not weights or any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return
    cfg = getattr(model, "cfg", None)
    key = "few_rows|" + (
        machine.shape_key(cfg, 0) if cfg is not None else ",".join(f"{w.size(0)}x{w.size(1)}" for w in weights)
    )
    data = machine.read_cache()
    here = data.setdefault(machine.machine_key(), {})
    entry = here.get(key)
    stale = entry is None or entry.get("rows") != list(PROBED_ROWS)  # none yet, or probed otherwise
    if stale or (entry.get("busy") and not machine_busy()):  # a busy machine's answer is provisional
        with torch.inference_mode():
            fresh = probe(weights)
        if stale or not fresh["busy"]:  # a busy answer never replaces a quiet one
            here[key] = fresh
            machine.write_cache(data)
        entry = fresh
    rows = fast_rows(entry["faster"])
    for m in layers:
        m.fast_rows, m.tuned_in = rows, threading.get_ident()
