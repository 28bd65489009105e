"""The corpus path at size: seconds to the first training step, MB/s and peak memory of building
the token cache from a 1 GB and a 4 GB corpus, with 1 and 2 tokenizer workers, beside the raw
SentencePiece encode rate measured in the same run.

    .venv/bin/python benchmarks/corpus_bench.py [--sizes 1,4] [--workers 1,2] [--work DIR]

The corpus is generated from ../shared/data/corpus_fr (never committed): files of ~16 MB, each a
seeded shuffle of all the novels' paragraphs, so no two documents are duplicates. Each measurement is
the real command (`llmkit pretrain CORPUS --tokenizer T --steps 1`) in its own process with an
empty cache; peak memory is sampled over the whole process tree (the main process and its
workers, summed) and the main process's own peak comes from wait4.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, SHARED_DATA, emit, machine

LLMKIT = [sys.executable, "-m", "llmkit"]
FILE_MB = 64


def generate(folder: Path, gigabytes: float) -> Path:
    """~``gigabytes`` of distinct documents from the shared novels (kept between runs)."""
    target = int(gigabytes * 1e9)
    done = folder / "DONE"
    if done.is_file() and int(done.read_text()) == target:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paragraphs = [
        p
        for f in sorted((SHARED_DATA / "corpus_fr").glob("*.txt"))
        for p in f.read_text(encoding="utf-8").split("\n")
        if p.strip()
    ]
    written, i = 0, 0
    while written < target:
        rng = random.Random(i)
        rng.shuffle(paragraphs)
        text, size = [], 0
        for p in paragraphs:
            text.append(p)
            size += len(p.encode("utf-8")) + 1
            if size >= FILE_MB << 20 or written + size >= target:
                break
        data = ("\n".join(text) + "\n").encode("utf-8")
        (folder / f"part-{i:04d}.txt").write_bytes(data)
        written += len(data)
        i += 1
    done.write_text(str(target))
    return folder


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def measured(cmd: list[str]) -> dict:
    """Wall time, the main process's peak RSS (wait4) and the sampled peak of the whole tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    sampler.join()
    if status:
        sys.exit(proc.stderr.read())
    main = usage.ru_maxrss / 1024
    return {
        "seconds": round(seconds, 1),
        "peak_rss_main_mb": round(main),
        "peak_rss_tree_mb": round(max(peak[0], main)),
    }  # sampled every 0.25 s: never below the main's own


def raw_encode_rate(tokenizer: Path, corpus: Path, threads: int) -> float:
    """SentencePiece's own encode rate (MB/s) on the first file, its lines in one call."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    data = sorted(corpus.glob("*.txt"))[0].read_bytes()
    lines = data.decode("utf-8").split("\n")
    t0 = time.perf_counter()
    sp.encode(lines, num_threads=threads)
    return len(data) / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4", help="corpus sizes in GB")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "corpus"))
    args = parser.parse_args()
    if not SHARED_DATA.exists():
        sys.exit(f"skipped: {SHARED_DATA} not present")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit(event="machine", **machine())
    tok = work / "tok"
    if not (tok / "tokenizer.yaml").is_file():
        subprocess.run(
            LLMKIT
            + ["tokenize", "train", str(SHARED_DATA / "corpus_fr"), "-o", str(tok), "--vocab-size", "4096", "--quiet"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    for gb in (float(s) for s in args.sizes.split(",")):
        corpus = generate(work / f"corpus-{gb:g}gb", gb)
        size_mb = sum(p.stat().st_size for p in corpus.glob("*.txt")) / 1e6
        for threads in (1, 2):
            emit(
                corpus_gb=gb,
                method=f"raw SentencePiece encode, {threads} thread(s)",
                mb_per_s=round(raw_encode_rate(tok, corpus, threads), 2),
            )
        for workers in (int(w) for w in args.workers.split(",")):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            row = measured(
                LLMKIT
                + [
                    "pretrain",
                    str(corpus),
                    "--tokenizer",
                    str(tok),
                    "--preset",
                    "tiny",
                    "--steps",
                    "1",
                    "--workers",
                    str(workers),
                    "-o",
                    str(work / "run"),
                    "--quiet",
                    "--set",
                    f"data.cache_dir={cache}",
                    "--set",
                    "train.samples=0",
                    "--set",
                    "train.eval_batches=1",
                ]
            )
            emit(
                corpus_gb=gb,
                corpus_mb=round(size_mb),
                method=f"llmkit pretrain to step 1, {workers} worker(s)",
                mb_per_s=round(size_mb / row["seconds"], 2),
                **row,
            )
            shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
