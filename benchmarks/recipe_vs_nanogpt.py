"""The budget-sized recipe against nanoGPT's CPU recipe: same text, same wall-clock, same scoring.

    cd benchmarks && ../.venv/bin/python recipe_vs_nanogpt.py shakespeare --time 3m
    cd benchmarks && ../.venv/bin/python recipe_vs_nanogpt.py corpus_fr --time 30m
    cd benchmarks && ../.venv/bin/python recipe_vs_nanogpt.py corpus_fr --time 30m --nanogpt-only --cores 1,0

(the last: nanoGPT alone on core 0, beside ``levers.py corpus_fr --time 10m --cores 1``: issue 32's
"in 10 minutes what nanoGPT reaches in 30", both sides measured at the same time.)

In one job, at the same time, each on its own core with one thread:
- llmkit: ``llmkit pretrain CORPUS --time T`` with no preset (the model sized to the budget,
  its default tokenizer, evaluation and checkpoints);
- nanoGPT's CPU recipe (benchmarks/nanogpt_ref.py: its model, loop and hyper-parameters) on the
  characters of the same training text, its ``max_iters`` (and so its cosine) set from its own
  measured step rate so that it, too, anneals at the deadline.

Both are then scored the same way on the same held-out bytes — llmkit's own validation split
(the last 10% of every document) — over every non-overlapping window of each model's context:
bits per byte = mean loss / ln 2 × tokens / bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nanogpt_ref
import numpy as np
import torch
from common import ROOT, SHARED_DATA, emit, machine

CORPORA = {"shakespeare": SHARED_DATA / "shakespeare" / "input.txt", "corpus_fr": SHARED_DATA / "corpus_fr"}


def seconds_of(text: str) -> float:
    from llmkit.core.config import TrainConfig

    return TrainConfig(time=text).time_s


def char_split(corpus: Path, work: Path):
    """llmkit's own split of the corpus, in characters: (train ids, val ids, vocab, val bytes)."""
    from llmkit.core.config import DataConfig, TokenizerConfig
    from llmkit.core.text.mix import load_corpus, plan_sources
    from llmkit.core.text.tokenizer import train_on_files

    data_cfg = DataConfig()
    sources, val, _ = plan_sources([str(corpus)], data_cfg)
    files = [f for s in sources for f in s.files]
    tok, _ = train_on_files(files, TokenizerConfig(model_type="char", byte_fallback=False, vocab_size=4096), seed=0)
    data = load_corpus(sources, val, tok, data_cfg)
    train = torch.from_numpy(np.concatenate([p.train for p in data.parts]).astype("int64"))
    val_ids = torch.from_numpy(np.concatenate([v for _, v in data.val_parts]).astype("int64"))
    return train, val_ids, tok.vocab_size, data.val_bytes


@torch.no_grad()
def windows_loss(forward, ids: torch.Tensor, context: int, batch: int = 32) -> float:
    """Mean next-token loss over every non-overlapping window of ``context`` + 1 ids."""
    n = (ids.numel() - 1) // context
    x = ids[: n * context].view(n, context)  # (N, T)
    y = ids[1 : n * context + 1].view(n, context)  # (N, T)
    total = 0.0
    for i in range(0, n, batch):
        logits = forward(x[i : i + batch])  # (b, T, V)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"
        ).item()
    return total / (n * context)


def nanogpt_side(train, val, vocab, val_bytes, seconds, core, out_file, work):
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    r = nanogpt_ref.Recipe()
    step = nanogpt_ref.bare_step(vocab, r)
    for _ in range(3):
        step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 5:
        step()
        n += 1
    rate = n / (time.perf_counter() - t0)
    # Its schedule is in iterations: size it to the deadline (its evaluations take ~5% more).
    r.max_iters = max(int(rate * seconds * 0.95), r.warmup_iters + 1)
    result = nanogpt_ref.run(train, val, vocab, seconds, work, r)
    model = result["model"].eval()
    loss = windows_loss(lambda x: model(x)[0], val, r.block_size)
    json.dump(
        {
            "iters": result["iters"],
            "max_iters": r.max_iters,
            "tokens": result["tokens"],
            "tokens_per_s": round(result["tokens_per_s"]),
            "val_loss": loss,
            "val_bpb": loss / math.log(2) * val.numel() / val_bytes,
        },
        open(out_file, "w"),
    )


def llmkit_score(run: Path, corpus: Path) -> dict:
    from llmkit.core.config import DataConfig
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.text.mix import load_corpus, plan_sources

    model, ckpt = open_model(run / "best")
    sources, val, _ = plan_sources([str(corpus)], DataConfig())
    data = load_corpus(sources, val, ckpt.tokenizer, DataConfig())
    ids = torch.from_numpy(np.concatenate([v for _, v in data.val_parts]).astype("int64"))
    loss = windows_loss(model, ids, model.cfg.context)
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    return {
        "params": model.num_params(),
        "shape": f"d{model.cfg.d_model}-l{model.cfg.n_layer}-T{model.cfg.context}",
        "steps": state["step"],
        "tokens": state["tokens_seen"],
        "precision": state.get("precision"),
        "compiled": state.get("compiled"),
        "val_loss": loss,
        "val_bpb": loss / math.log(2) * ids.numel() / data.val_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=sorted(CORPORA))
    ap.add_argument("--time", default="3m")
    ap.add_argument("--cores", default="0,1", help="llmkit's core, nanoGPT's core")
    ap.add_argument("--nanogpt-only", action="store_true",
                    help="run nanoGPT's side alone (its core), e.g. its 30 minutes beside levers.py's 10")  # fmt: skip
    args = ap.parse_args()
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    emit(event="machine", **machine())
    corpus, seconds = CORPORA[args.which], seconds_of(args.time)
    ours_core, their_core = args.cores.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, val, vocab, val_bytes = char_split(corpus, work)
        theirs = mp.get_context("spawn").Process(
            target=nanogpt_side, args=(train, val, vocab, val_bytes, seconds, int(their_core), work / "ng.json", work)
        )
        if args.nanogpt_only:
            theirs.start()
            theirs.join()
            ng = json.loads((work / "ng.json").read_text())
            emit(event="nanogpt", corpus=args.which, budget=args.time,
                 nanogpt={k: (round(v, 4) if isinstance(v, float) else v) for k, v in ng.items()})  # fmt: skip
            return
        run = work / "llmkit"
        cmd = [
            "taskset",
            "-c",
            ours_core,
            sys.executable,
            "-m",
            "llmkit",
            "pretrain",
            str(corpus),
            "-o",
            str(run),
            "--time",
            args.time,
            "--quiet",
            "--set",
            "train.threads=1",
        ]
        theirs.start()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        theirs.join()
        ng = json.loads((work / "ng.json").read_text())
        ours = llmkit_score(run, corpus)
        emit(
            event="recipe_vs_nanogpt",
            corpus=args.which,
            budget=args.time,
            llmkit={k: (round(v, 4) if isinstance(v, float) else v) for k, v in ours.items()},
            nanogpt={k: (round(v, 4) if isinstance(v, float) else v) for k, v in ng.items()},
            bpb_reduction_pct=round(100 * (1 - ours["val_bpb"] / ng["val_bpb"]), 1),
        )


if __name__ == "__main__":
    main()
