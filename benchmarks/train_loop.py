"""The training loop against the bare step, and against nanoGPT's loop, at two shapes.

For each shape, on one core with one thread, interleaved:
- llmkit bare step: forward, backward, clipping, AdamW on a fixed batch, in the mode the speed
  probe picks for that shape (the same mode the real loop then uses);
- llmkit loop: the real ``llmkit pretrain`` command with its default evaluation, checkpoint,
  logging and report cadence, on real text, for ``--seconds``; its steady rate is measured from
  the wall-clock times in metrics.jsonl after the first 10% of steps (so start-up and compilation
  are not counted, as they are not in the bare step);
- nanoGPT's loop (benchmarks/nanogpt_ref.py: its model, its loop, its CPU recipe: fp32, no
  compile) for the same seconds, its steady rate measured after its first evaluation (at
  iteration 0, as nanoGPT does), and nanoGPT's bare step.

Shapes: ``nano`` is nanoGPT's CPU command (4 layers, width 128, 4 heads, context 64, batch 12) on
tiny shakespeare with a character vocabulary; ``small`` is llmkit's preset (6 layers, width 384,
context 256, batch 16, vocabulary 8192) on corpus_fr.

    .venv/bin/python benchmarks/train_loop.py [--shapes nano,small] [--seconds 60] [--core 0] [--isa avx2]

``--isa avx2`` caps torch's kernel libraries to AVX2 (common.cap_isa): on an AVX-512 machine it
measures what an AVX2-only one runs (the speed probe then finds bf16 slow and keeps fp32). It is
the same processor otherwise (caches, clock), so it stands in for, not equals, an AVX2 machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nanogpt_ref
import torch
from common import ISA_CAPS, ROOT, SHARED_DATA, cap_isa, emit, machine

from llmkit.core.config import ModelConfig
from llmkit.core.training import speed

SHAPES = {
    "nano": {
        "corpus": "shakespeare/input.txt",
        "vocab": 65,
        "recipe": nanogpt_ref.Recipe(),
        "sets": [
            "tokenizer.model_type=char",
            "tokenizer.byte_fallback=false",
            "model.context=64",
            "model.d_model=128",
            "model.n_layer=4",
            "model.n_head=4",
            "model.n_kv_head=4",
            "model.dropout=0.0",
            "optim.lr=1e-3",
            "optim.beta2=0.99",
            "optim.warmup_steps=100",
            "train.batch_size=12",
            "train.patience=0",
            "train.steps=0",
        ],
    },
    "small": {
        "corpus": "corpus_fr",
        "vocab": 8192,
        "recipe": nanogpt_ref.Recipe(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
        "sets": ["--preset", "small", "train.patience=0", "train.steps=0", "tokenizer.vocab_size=8192"],
    },
}


def llmkit_args(sets: list[str]) -> list[str]:
    out, it = [], iter(sets)
    for s in it:
        out += [s, next(it)] if s == "--preset" else ["--set", s]
    return out


def time_steps(step, seconds: float) -> float:
    """Steps per second over ``seconds`` after three warm-up steps."""
    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def loop_llmkit(work: Path, shape: dict, seconds: float, core: int) -> dict:
    out = work / f"llmkit-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "llmkit",
        "pretrain",
        str(SHARED_DATA / shape["corpus"]),
        "-o",
        str(out),
        "--time",
        f"{seconds}s",
        "--quiet",
        "--set",
        "train.threads=1",
        *llmkit_args(shape["sets"]),
    ]
    subprocess.run(
        ["taskset", "-c", str(core), *cmd],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    first = steps[len(steps) // 10]
    last = steps[-1]
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    return {
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
        "steps": last["step"],
        "evals": sum(r["event"] == "eval" for r in rows),
        "precision": state.get("precision"),
        "compiled": state.get("compiled"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="nano,small")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each loop run")
    ap.add_argument("--bare-seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument(
        "--isa",
        choices=sorted(ISA_CAPS),
        help="cap torch's kernels to this instruction set (measure an AVX2-only machine's code on an AVX-512 one)",
    )
    args = ap.parse_args()
    cap_isa(args.isa)
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    emit(event="machine", **machine())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            r = shape["recipe"]
            cfg = ModelConfig(
                vocab_size=shape["vocab"],
                context=r.block_size,
                d_model=r.n_embd,
                n_layer=r.n_layer,
                n_head=r.n_head,
                n_kv_head=r.n_head if name == "nano" else 2,
                dropout=0.0,
            )
            tokens_per_step = r.batch_size * r.block_size
            choice = speed.choose(cfg, r.batch_size, budget_s=args.seconds, tokens_per_step=tokens_per_step)
            ours = speed.step_fn(cfg, r.batch_size, speed.Mode(choice.precision, choice.compiled))
            theirs = nanogpt_ref.bare_step(shape["vocab"], r)
            ids = torch.randint(0, shape["vocab"], (2_000_000,))
            got: dict[str, list[float]] = {
                k: [] for k in ("llmkit_bare", "llmkit_loop", "nanogpt_bare", "nanogpt_loop")
            }
            loop_info = {}
            for _ in range(args.rounds):
                got["llmkit_bare"].append(time_steps(ours, args.bare_seconds) * tokens_per_step)
                got["nanogpt_bare"].append(time_steps(theirs, args.bare_seconds) * tokens_per_step)
                loop_info = loop_llmkit(work, shape, args.seconds, args.core)
                got["llmkit_loop"].append(loop_info["tokens_per_s"])
                ng = nanogpt_ref.run(ids[:1_800_000], ids[1_800_000:], shape["vocab"], args.seconds, work, r)
                got["nanogpt_loop"].append(ng["steady_tokens_per_s"])  # after its first evaluation
            med = {k: statistics.median(v) for k, v in got.items()}
            emit(
                event="train_loop",
                shape=name,
                mode=f"{choice.precision}{'+compile' if choice.compiled else ''}",
                **{k: round(v) for k, v in med.items()},
                loop_vs_bare=round(med["llmkit_loop"] / med["llmkit_bare"], 3),
                loop_vs_nanogpt_loop=round(med["llmkit_loop"] / med["nanogpt_loop"], 3),
                nanogpt_loop_vs_bare=round(med["nanogpt_loop"] / med["nanogpt_bare"], 3),
                llmkit_steps=loop_info["steps"],
                llmkit_evals=loop_info["evals"],
                probe=choice.reason,
            )


if __name__ == "__main__":
    main()
