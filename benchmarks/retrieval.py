"""Retrieval on the shared French data: BM25, frozen encoders and `finetune --task embed`, same splits.

    .venv/bin/python benchmarks/retrieval.py sets                      # write the two sets
    .venv/bin/python benchmarks/retrieval.py baselines [--bases smollm2,gemma3-270m]
    .venv/bin/python benchmarks/retrieval.py finetune BASE --on piaf --time 10m [--batch 32] [--lora]
    .venv/bin/python benchmarks/retrieval.py table                     # the markdown of every row

The sets (written under --work, default .bench/retrieval):

- piaf: the shared PIAF questions split by article as `llmkit split --dev 10% --by title` splits
  them (seed 0): train pairs {question -> its paragraph}; dev: each dev question searches all the
  dev split's paragraphs.
- bitext: train on tico19 dev + test (French -> English), dev on ntrex128: each French sentence
  searches the English side of all 1,997 pairs for its translation.

Systems, scored by the same `retrieval_scores` on the same dev sets: BM25 (bm25s, French
stopwords and Snowball stemmer), each base frozen (mean pooling, with and without centring), each
fine-tuned model (`llmkit finetune BASE --task embed`, its best checkpoint scored as `llmkit eval`
scores it), and a hybrid of
BM25 and the fine-tuned model by reciprocal rank fusion (k = 60). A fine-tuning row also keeps the
run's evaluations (nDCG@10 against training pairs seen): the curve. Rows go to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED_DATA, machine, peak_of

from llmkit.core.config import TaskConfig, embed_settings
from llmkit.core.tasks.retrieval import RetrievalSet, reciprocal_rank_fusion, retrieval_scores, top_k
from llmkit.core.text.examples import read_examples

LLMKIT = [sys.executable, "-m", "llmkit"]
DEPTH = 100
"""Rankings fused by RRF are each system's top DEPTH."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_sets(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    piaf = SHARED_DATA / "instruct_fr" / "piaf_qa_fr.jsonl"
    subprocess.run(LLMKIT + ["split", str(piaf), "--dev", "10%", "--by", "title", "-o", str(work)], check=True)
    for part in ("train", "dev"):
        rows = read_jsonl(work / f"piaf_qa_fr.{part}.jsonl")
        write_jsonl(work / f"piaf.{part}.jsonl", [{"query": r["question"], "positive": r["context"]} for r in rows])
    pairs = SHARED_DATA / "translate_fr_en"
    train = read_jsonl(pairs / "tico19_dev.jsonl") + read_jsonl(pairs / "tico19_test.jsonl")
    write_jsonl(work / "bitext.train.jsonl", train)
    write_jsonl(work / "bitext.dev.jsonl", read_jsonl(pairs / "ntrex128.jsonl"))
    for name in ("piaf", "bitext"):
        rset = dev_set(work, name)
        print(f"{name}: {len(read_jsonl(work / f'{name}.train.jsonl'))} training pairs; dev: "
              f"{len(rset.queries)} queries over {len(rset.corpus)} passages")  # fmt: skip


def dev_set(work: Path, name: str) -> RetrievalSet:
    return RetrievalSet.from_examples(read_examples(work / f"{name}.dev.jsonl", TaskConfig(kind="embed")).examples)


def bm25_ranking(rset: RetrievalSet, depth: int = DEPTH) -> list[list[int]]:
    import bm25s
    import Stemmer

    stem = Stemmer.Stemmer("french")
    index = bm25s.BM25()
    index.index(bm25s.tokenize(rset.corpus, stopwords="fr", stemmer=stem, show_progress=False), show_progress=False)
    queries = bm25s.tokenize(rset.queries, stopwords="fr", stemmer=stem, show_progress=False)
    rows, _ = index.retrieve(queries, k=min(depth, len(rset.corpus)), show_progress=False)
    return rows.tolist()


def dense_vectors(ckpt: str, rset: RetrievalSet):
    """A checkpoint's own encoding (an embedding model's settings, a language model's mean pooling)."""
    from dataclasses import replace

    from llmkit.core.interop.resolve import open_model
    from llmkit.core.tasks.retrieval import encode_set

    model, opened = open_model(ckpt, "cpu")
    settings = embed_settings(opened.task)
    if opened.kind != "embed":
        settings = replace(settings, pooling="mean")
    return encode_set(model, opened.tokenizer, rset, settings, batch_size=16, device="cpu")


def dense_ranking(vectors, *, center: bool = False, depth: int = DEPTH) -> list[list[int]]:
    queries, corpus = vectors
    if center:
        mean = corpus.mean(0, keepdims=True)
        queries, corpus = queries - mean, corpus - mean
    return top_k(queries, corpus, depth)[1].tolist()


def emit(work: Path, **row) -> None:
    row = {**row, "machine": machine(), "command": " ".join(sys.argv)}
    with open(work / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "curve")}, ensure_ascii=False), flush=True)


def scores(ranked: list[list[int]], rset: RetrievalSet) -> dict:
    return {k: round(v, 4) for k, v in retrieval_scores(ranked, rset.relevant).items()}


def baselines(work: Path, bases: list[str]) -> None:
    for name in ("piaf", "bitext"):
        rset = dev_set(work, name)
        t = time.perf_counter()
        ranked = bm25_ranking(rset)
        emit(work, set=name, system="BM25 (bm25s, fr stopwords + stemmer)", seconds=round(time.perf_counter() - t, 2),
             **scores(ranked, rset))  # fmt: skip
        for base in bases:
            t = time.perf_counter()
            vectors = dense_vectors(base, rset)
            seconds = round(time.perf_counter() - t, 1)
            for center in (False, True):
                ranked = dense_ranking(vectors, center=center)
                system = f"{base} frozen, mean pooling" + (", centred" if center else "")
                emit(work, set=name, system=system, seconds=seconds, **scores(ranked, rset))


def finetune(work: Path, base: str, on: str, budget: list[str], batch: int, lora: bool, extra: list[str]) -> None:
    tag = f"{Path(base).name}-{on}" + ("-lora" if lora else "")
    out = work / "runs" / tag
    cmd = ["finetune", base, "--task", "embed", "--data", str(work / f"{on}.train.jsonl"),
           "--val", str(work / f"{on}.dev.jsonl"), "--batch-size", str(batch), "--out", str(out), *budget,
           "--quiet", *(["--lora"] if lora else []), *[a for s in extra for a in ("--set", s)]]  # fmt: skip
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    seconds, peak = peak_of(LLMKIT + cmd)
    best = out / "best"
    curve = [
        {"step": r["step"], "pairs": r["step"] * batch, "ndcg@10": round(r["ndcg@10"], 4)}
        for r in read_jsonl(out / "metrics.jsonl")
        if r.get("event") == "eval" and "ndcg@10" in r
    ]
    rset = dev_set(work, on)
    report = json.loads(
        subprocess.run(
            LLMKIT + ["eval", str(best), str(work / f"{on}.dev.jsonl"), "--json", "--quiet"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    system = f"{Path(base).name} fine-tuned ({'LoRA' if lora else 'full'}, {' '.join(budget)}, batch {batch})"
    common = {"set": on, "base": base, "train_seconds": seconds, "peak_mb": peak, "steps_seen": curve[-1]["step"]}
    emit(work, system=system, **{k: round(report[k], 4) for k in ("recall@1", "recall@10", "mrr@10", "ndcg@10")},
         curve=curve, **common)  # fmt: skip
    dense = dense_ranking(dense_vectors(str(best), rset))
    fused = reciprocal_rank_fusion([bm25_ranking(rset), dense])
    emit(work, system=f"hybrid: BM25 + {system}, RRF k=60", **scores(fused, rset), **common)


def table(work: Path) -> None:
    rows = read_jsonl(work / "results.jsonl")
    keys = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
    for name in ("piaf", "bitext"):
        mine = [r for r in rows if r["set"] == name]
        if not mine:
            continue
        print(f"\n{name}\n\n| system | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for r in mine:
            print(f"| {r['system']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
        for r in mine:
            if r.get("curve"):
                points = ", ".join(f"{c['pairs']}: {c['ndcg@10']:.3f}" for c in r["curve"])
                print(f"\ncurve of {r['system']} (pairs seen: nDCG@10): {points}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sets", "baselines", "finetune", "table"))
    ap.add_argument("base", nargs="?")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "retrieval")
    ap.add_argument("--bases", default="smollm2")
    ap.add_argument("--on", choices=("piaf", "bitext"), default="piaf")
    ap.add_argument("--time", default=None)
    ap.add_argument("--epochs", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    a = ap.parse_args()
    if a.what == "sets":
        make_sets(a.work)
    elif a.what == "baselines":
        baselines(a.work, [b for b in a.bases.split(",") if b])
    elif a.what == "finetune":
        if not a.base:
            ap.error("finetune needs BASE")
        budget = ["--time", a.time] if a.time else ["--epochs", a.epochs or "1"]
        finetune(a.work, a.base, a.on, budget, a.batch, a.lora, a.sets)
    else:
        table(a.work)


if __name__ == "__main__":
    main()
