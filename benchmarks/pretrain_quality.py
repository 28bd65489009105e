"""Validation quality after a fixed wall-clock budget on this machine, through the real CLI.

    .venv/bin/python benchmarks/pretrain_quality.py shakespeare            # 3 minutes
    .venv/bin/python benchmarks/pretrain_quality.py corpus_fr --times 10m,30m

shakespeare: nanoGPT's CPU configuration (4 layers, 4 heads, width 128, block 64, batch 12,
lr 1e-3, beta2 0.99, warmup 100, no dropout) with a character tokenizer; train on the first 90%,
validate on the last 10% (cut at a line boundary). nanoGPT publishes 1.88 after ~3 minutes.
corpus_fr: the `small` preset on ../shared/data/corpus_fr for each budget, as separate runs (the
cosine schedule follows the time budget, so each run anneals at its own deadline).
Prints one JSON line per run: best validation loss, bits per byte, steps, tokens/s, precision.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, SHARED_DATA, emit, machine

LLMKIT = [sys.executable, "-m", "llmkit"]


def run(args: list[str]) -> None:
    subprocess.run(LLMKIT + args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def summarize(out: Path, **extra) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    steps = [r for r in rows if r["event"] == "step"]
    best = min(evals, key=lambda r: r["val_loss"])
    tps = sorted(r["tokens_per_s"] for r in steps[len(steps) // 10 :])  # skip warm-up
    emit(
        **extra,
        best_val_loss=round(best["val_loss"], 4),
        best_val_bpb=round(best["val_bpb"], 4),
        best_step=best["step"],
        steps=steps[-1]["step"],
        tokens=steps[-1]["tokens"],
        train_seconds=round(steps[-1]["elapsed_s"], 1),
        median_tokens_per_s=round(tps[len(tps) // 2]),
        precision=_precision(out),
    )


def _precision(out: Path) -> str:
    return json.loads((out / "last" / "trainer_state.json").read_text())["precision"]


def shakespeare(work: Path, time: str) -> None:
    corpus = SHARED_DATA / "shakespeare" / "input.txt"
    out = work / "shakespeare"
    sets = [
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
        "optim.min_lr_ratio=0.1",
        "train.batch_size=12",
        "train.eval_every=250",
        "train.eval_batches=20",
        "train.patience=0",
        "train.steps=0",
        "train.save_every=100000",
    ]
    run(["pretrain", str(corpus), "-o", str(out), "--time", time, "--quiet", *[a for s in sets for a in ("--set", s)]])
    summarize(
        out,
        event="quality",
        corpus="shakespeare",
        tokenizer="char",
        budget=time,
        reference="nanoGPT CPU config: 1.88 after ~3 min on a laptop",
    )


def corpus_fr(work: Path, times: list[str]) -> None:
    corpus = SHARED_DATA / "corpus_fr"
    tok = work / "tok_fr"
    run(["tokenize", "train", str(corpus), "-o", str(tok), "--vocab-size", "8192", "--quiet"])
    for t in times:
        out = work / f"fr_small_{t}"
        run(
            [
                "pretrain",
                str(corpus),
                "-o",
                str(out),
                "--preset",
                "small",
                "--tokenizer",
                str(tok),
                "--time",
                t,
                "--quiet",
                "--set",
                "train.steps=0",
                "--set",
                "train.eval_every=25",
                "--set",
                "train.eval_batches=8",
                "--set",
                "train.patience=0",
                "--set",
                "optim.warmup_steps=30",
            ]
        )
        summarize(out, event="quality", corpus="corpus_fr", preset="small", budget=t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["shakespeare", "corpus_fr"])
    ap.add_argument("--time", default="3m")
    ap.add_argument("--times", default="10m,30m")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    emit(event="machine", **machine())
    with tempfile.TemporaryDirectory() as tmp:
        work = (Path(args.work) if args.work else Path(tmp)).resolve()
        if args.which == "shakespeare":
            shakespeare(work, args.time)
        else:
            corpus_fr(work, args.times.split(","))


if __name__ == "__main__":
    main()
