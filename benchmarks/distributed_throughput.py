"""Training throughput on 1 and 2 processes (torchrun, gloo, CPU), same global batch.

    .venv/bin/python benchmarks/distributed_throughput.py [--preset small] [--steps 30] [--rounds 2]

On a 2-core machine the point is overhead, not speed-up: one process uses both cores for its
matmuls; two processes use one core each and add a gradient all-reduce per step. Runs alternate
(1, 2, 1, 2, …) so drifting machine load hits both alike; each reports the median tokens/s of its
steps after the first five (warm-up), from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, emit, machine


def one_run(nproc: int, strategy: str, out: Path, args) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *(launcher if nproc > 1 else [sys.executable]),
        "-m",
        "llmkit",
        "pretrain",
        "-o",
        str(out),
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--global-batch-size",
        str(args.global_batch),
        "--batch-size",
        str(args.global_batch // 2),
        "--strategy",
        strategy,
        "-q",
        "--set",
        "train.eval_every=100000",
        "--set",
        "train.save_every=100000",
        "--set",
        "train.samples=0",
        "--set",
        "train.log_every=1",
        "--set",
        "train.dtype=fp32",
        "--set",
        "train.device=cpu",
    ]
    threads = {"OMP_NUM_THREADS": str(max(os.cpu_count() // nproc, 1))}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **threads})
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    rates = [
        json.loads(line)["tokens_per_s"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"event": "step"' in line
    ]
    return statistics.median(rates[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    emit(event="machine", **machine(), cores=os.cpu_count())
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for nproc, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
                name = f"{nproc} process{'es' if nproc > 1 else ''}" + (f" ({strategy})" if nproc > 1 else "")
                rate = one_run(nproc, strategy, Path(tmp) / f"{r}-{nproc}-{strategy}", args)
                results.setdefault(name, []).append(rate)
    base = statistics.median(results["1 process"])
    for name, rates in results.items():
        emit(
            preset=args.preset,
            global_batch=args.global_batch,
            setting=name,
            tokens_per_s=round(statistics.median(rates), 1),
            vs_one_process=round(statistics.median(rates) / base, 3),
            rounds=[round(x, 1) for x in rates],
        )


if __name__ == "__main__":
    main()
