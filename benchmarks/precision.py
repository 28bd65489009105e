"""fp32 against bf16 on this CPU: the measurement behind precision 'auto' (core/host/device.py).

Times square matmuls in fp32 and bf16, and one forward+backward of the llmkit `tiny` shape in fp32
and under bf16 autocast, interleaved. Prints one JSON line per result with the bf16/fp32 ratio.

    .venv/bin/python benchmarks/precision.py [--sizes 256,1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import emit, machine

from llmkit.core.config import ModelConfig
from llmkit.core.host.device import pick_precision
from llmkit.core.model.transformer import Transformer


def timed(fn, rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    emit(event="machine", **machine())
    for n in map(int, args.sizes.split(",")):
        a32, b32 = torch.randn(n, n), torch.randn(n, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        t32 = timed(lambda a=a32, b=b32: a @ b, args.rounds)
        t16 = timed(lambda a=a16, b=b16: a @ b, args.rounds)
        emit(
            event="matmul",
            n=n,
            fp32_gflops=round(2 * n**3 / t32 / 1e9, 2),
            bf16_gflops=round(2 * n**3 / t16 / 1e9, 2),
            bf16_speedup=round(t32 / t16, 3),
        )
    cfg = ModelConfig(vocab_size=2048, context=128, d_model=128, n_layer=4, n_head=4, n_kv_head=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 2048, (4, 128))

    def step(amp: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    t32 = timed(lambda: step(False), args.rounds)
    t16 = timed(lambda: step(True), args.rounds)
    emit(
        event="train_step_tiny",
        batch=4,
        context=128,
        fp32_s=round(t32, 4),
        bf16_autocast_s=round(t16, 4),
        bf16_speedup=round(t32 / t16, 3),
        auto_choice=pick_precision("auto", torch.device("cpu"), 384).name,
    )


if __name__ == "__main__":
    main()
