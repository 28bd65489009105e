"""The speedrun's levers, each tried on the budget-sized recipe against the recipe without it.

    cd benchmarks && ../.venv/bin/python levers.py shakespeare --time 3m --seeds 0,1
    cd benchmarks && ../.venv/bin/python levers.py corpus_fr --time 30m --levers base,muon --seeds 0

Every run is ``llmkit pretrain CORPUS --time T --seed S`` with no preset (the model sized to the
budget) plus the lever's ``--set`` options, one thread pinned to one core. ``base`` is the recipe
without the levers it adopted (AdamW, a cosine, SwiGLU: ``PLAIN``), and every lever is set on top
of it; ``recipe`` is the recipe as it is (the adopted levers on). Two runs go at a time,
one per core, so each lever and the baseline meet the same machine. Each run is scored as
recipe_vs_nanogpt.py scores llmkit (bits per byte over every window of the held-out tails) and its
training tokens/s is read from its own trainer state. One JSON line per run, then one per lever
with the mean over seeds and its difference from the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common import ROOT, SHARED_DATA, emit, machine
from recipe_vs_nanogpt import CORPORA, llmkit_score

from llmkit.core.config import SECTIONS, default_of
from llmkit.core.training import recipe

PLAIN = [f"{s}.{k}={default_of(SECTIONS[s], k)}" for s, values in recipe.LEVERS.items() for k in values]
"""The recipe without the levers it adopted (each at its config default: AdamW, cosine, SwiGLU): what
each lever is measured against (a later --set wins)."""

LEVERS = {
    "base": [],
    "recipe": None,  # the recipe as llmkit runs it now, PLAIN left out
    "muon": ["optim.optimizer=muon"],
    "wsd": ["optim.schedule=wsd"],
    "relu2": ["model.mlp=relu2"],
    "qk_norm": ["model.qk_norm=true"],
    "zero_init": ["model.zero_init=true"],
    "untied_softcap": ["model.tie_embeddings=false", "model.logit_softcap=15"],
}
"""Each lever as the ``--set`` options that turn it on (value embeddings, U-net skips and
sequence-length warm-up are not options of llmkit yet)."""


def run_one(corpus: Path, budget: str, seed: int, sets: list[str], core: int, out: Path, cache: Path) -> dict:
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "llmkit", "pretrain", str(corpus), "-o", str(out),
           "--time", budget, "--seed", str(seed), "--quiet", "--set", "train.threads=1"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "LLMKIT_CACHE": str(cache)}  # one probe figure shared by every run of the job
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    score = llmkit_score(out, corpus)
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    score["tokens_per_s"] = round(state["tokens_seen"] / max(state["elapsed_s"], 1e-9))
    return score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=sorted(CORPORA))
    ap.add_argument("--time", default="3m")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from {', '.join(LEVERS)}, "
                    "or NAME=key=value+key=value for a combination")  # fmt: skip
    ap.add_argument("--cores", default="0,1")
    ap.add_argument("--no-base", action="store_true", help="skip the base runs (measured by an earlier job)")
    args = ap.parse_args()
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    levers, own = {}, {}
    for item in args.levers.split(","):
        name, _, options = item.partition("=")
        sets = options.split("+") if options else LEVERS[name]
        levers[name], own[name] = ([], []) if sets is None else (PLAIN + sets, sets)
    if not args.no_base:
        levers.setdefault("base", PLAIN)
        own.setdefault("base", [])
    seeds = [int(s) for s in args.seeds.split(",")]
    emit(event="machine", **machine(), command=" ".join(["levers.py", *sys.argv[1:]]))
    corpus = CORPORA[args.which]
    # Seed-major order, the baseline first: each pair of runs on the two cores is of one seed.
    jobs = [(name, seed) for seed in seeds for name in levers]
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work, lock = Path(tmp), threading.Lock()

        def worker(core: int) -> None:
            while True:
                with lock:
                    if not jobs:
                        return
                    name, seed = jobs.pop(0)
                row = run_one(corpus, args.time, seed, levers[name], core, work / f"{name}-{seed}", work / "cache")
                row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                with lock:
                    results[name, seed] = row
                    emit(event="run", lever=name, sets=own[name], seed=seed, core=core, budget=args.time, **row)

        threads = [threading.Thread(target=worker, args=(int(c),)) for c in args.cores.split(",")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    based = "base" in levers
    base = statistics.mean(results["base", s]["val_bpb"] for s in seeds) if based else None
    base_speed = statistics.mean(results["base", s]["tokens_per_s"] for s in seeds) if based else None
    for name in levers:
        bpb = [results[name, s]["val_bpb"] for s in seeds]
        speed = statistics.mean(results[name, s]["tokens_per_s"] for s in seeds)
        emit(
            event="lever",
            corpus=args.which,
            budget=args.time,
            lever=name,
            sets=own[name],
            seeds=len(seeds),
            val_bpb=round(statistics.mean(bpb), 4),
            val_bpb_spread=round(max(bpb) - min(bpb), 4),
            delta_bpb=round(statistics.mean(bpb) - base, 4) if based else None,
            tokens_per_s=round(speed),
            speed_ratio=round(speed / base_speed, 3) if based else None,
            shape=sorted({results[name, s]["shape"] for s in seeds}),
        )


if __name__ == "__main__":
    main()
