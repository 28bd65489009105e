"""Approximate nearest-neighbour indexes for `encode`: usearch, faiss (HNSW, IVF) and exact search.

    .venv/bin/python benchmarks/ann_bench.py [--rows 1000000] [--dim 576] [--only usearch-f16,faiss-ivf]
        [--queries 1000] [--threads 2]

The vectors are synthetic, made to look like a model's embeddings rather than like noise (random
Gaussian vectors in 576 dimensions have no neighbours worth the name, and every index does badly
on them): points drawn around 2,000 centres in a 64-dimensional subspace, mapped into DIM
dimensions by a random orthonormal matrix, plus isotropic noise at a tenth of the signal and one
shared offset (the dominant direction a decoder's mean-pooled states share). Queries are fresh
draws from the same distribution. The truth is exact cosine search (`tasks.retrieval.top_k`).

Per system: build time, index size on disk, query latency p50/p99 at k = 10 (one query at a time,
as a search box sends them), recall@10 against the truth. Rows go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from llmkit.core.tasks.retrieval import top_k

K = 10


def synthetic(rows: int, dim: int, seed: int = 0, *, centres: int = 2000, rank: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))  # (dim, rank) orthonormal columns
    centre = rng.normal(size=(centres, rank)).astype(np.float32) * 3.0
    offset = rng.normal(size=dim).astype(np.float32) * 2.0
    out = np.empty((rows, dim), dtype=np.float32)
    for lo in range(0, rows, 100_000):
        n = min(100_000, rows - lo)
        z = centre[rng.integers(0, centres, n)] + rng.normal(size=(n, rank)).astype(np.float32)  # (n, rank)
        out[lo : lo + n] = z @ basis.T.astype(np.float32) + 0.1 * rng.normal(size=(n, dim)).astype(np.float32) + offset
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found.tolist(), truth.tolist())]))


def latencies(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    rows, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        rows.append(search(q[None]))
        times.append((time.perf_counter() - t0) * 1000)
    return np.concatenate(rows), times


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")))


def run_usearch(vectors, queries, work: Path, dtype: str, threads: int):
    from usearch.index import Index

    t0 = time.perf_counter()
    index = Index(ndim=vectors.shape[1], metric="cos", dtype=dtype, connectivity=16, expansion_add=128,
                  expansion_search=128)  # fmt: skip
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)
    path = work / f"usearch-{dtype}.ann"
    index.save(str(path))
    build = time.perf_counter() - t0
    del index
    view = Index.restore(str(path), view=True)

    def search(q, ef):
        view.expansion_search = ef  # a saved graph does not keep it
        return np.asarray(view.search(q, K, threads=1).keys).reshape(1, -1)

    return build, size_of(path), search, (64, 128, 256, 512, 1024, 2048)


def run_faiss_hnsw(vectors, queries, work: Path, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    norm = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    index.add(norm)
    path = work / "faiss-hnsw.index"
    faiss.write_index(index, str(path))
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)

    def search(q, ef):
        index.hnsw.efSearch = ef
        return index.search(q / np.linalg.norm(q, axis=1, keepdims=True), K)[1]

    return build, size_of(path), search, (64, 128, 256, 512, 1024, 2048)


def run_faiss_ivf(vectors, queries, work: Path, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    norm = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nlist = max(16, int(4 * np.sqrt(len(vectors))))
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFScalarQuantizer(quantizer, vectors.shape[1], nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    sample = norm[np.random.default_rng(1).choice(len(norm), min(len(norm), 50 * nlist), replace=False)]
    index.train(sample)
    index.add(norm)
    path = work / "faiss-ivf.index"
    faiss.write_index(index, str(path))
    build = time.perf_counter() - t0
    del index
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    faiss.omp_set_num_threads(1)

    def search(q, nprobe):
        index.nprobe = nprobe
        return index.search(q / np.linalg.norm(q, axis=1, keepdims=True), K)[1]

    return build, size_of(path), search, (16, 32, 64, 128, 256)


def emit(name, knob, build, size, times, rec, base) -> None:
    p50, p99 = (round(float(np.percentile(times, q)), 2) for q in (50, 99))
    row = {"system": name, "search_knob": knob, "build_s": round(build, 1), "size_mb": round(size / 1e6),
           "p50_ms": p50, "p99_ms": p99, "recall@10": round(rec, 4), **base}  # fmt: skip
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="exact,usearch-f16,usearch-i8,faiss-hnsw,faiss-ivf")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    vectors = synthetic(a.rows, a.dim)
    queries = synthetic(a.queries, a.dim, seed=1)[: a.queries]
    made = time.perf_counter() - t0
    truth = top_k(queries, vectors, K)[1]
    work = Path(a.work or tempfile.mkdtemp(prefix="ann-", dir=os.environ.get("TMPDIR")))
    work.mkdir(parents=True, exist_ok=True)
    base = {"rows": a.rows, "dim": a.dim, "queries": a.queries, "threads": a.threads, "made_s": round(made, 1),
            "machine": machine()}  # fmt: skip
    for name in a.only.split(","):
        if name == "exact":  # the vectors normalised once, then one product per query
            flat = torch.nn.functional.normalize(torch.from_numpy(vectors), dim=-1)
            build, size = 0.0, flat.numel() * 4
            torch.set_num_threads(1)

            def exact(q, flat=flat):
                return (flat @ torch.from_numpy(q[0] / np.linalg.norm(q[0]))).topk(K).indices.numpy()[None]

            found, times = latencies(exact, queries[:100])  # slow: 100 queries
            torch.set_num_threads(a.threads)
            emit(name, None, build, size, times, recall(found, truth[:100]), base)
            continue
        if name.startswith("usearch"):
            build, size, search, knobs = run_usearch(vectors, queries, work, name.split("-")[1], a.threads)
        elif name == "faiss-hnsw":
            build, size, search, knobs = run_faiss_hnsw(vectors, queries, work, a.threads)
        else:
            build, size, search, knobs = run_faiss_ivf(vectors, queries, work, a.threads)
        for knob in knobs:  # the search-time knob (HNSW's candidate list, IVF's lists probed): recall against time
            found, times = latencies(lambda q, knob=knob, search=search: search(q, knob), queries)
            emit(name, knob, build, size, times, recall(found, truth), base)
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
