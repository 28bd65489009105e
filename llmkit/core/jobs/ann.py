"""An approximate-nearest-neighbour index beside the vectors ``encode`` wrote: ``OUT.ann``.

Exact search reads every vector for every query: 2.3 GB for a million vectors of dimension 576,
210 ms a query on one core. The index is faiss's inverted file (IVF) over half-precision copies of
the unit vectors: k-means cuts the space into ``4 sqrt(N)`` cells, and a query reads only the
``nprobe`` cells nearest to it (docs/architecture.md and docs/benchmarks.md say why this index and
this library: on a million vectors, recall@10 0.999 at 5.9 ms where usearch's HNSW reached 0.92 at 9).

- Built from OUT after the vectors are written: the cells are trained once on a sample, then the
  vectors added in blocks; after each block the index is saved and ``OUT.meta.json`` records how
  many rows it holds, so an interrupted build resumes there.
- Opened memory-mapped: a search process pages in the cells it reads, not the file.
- Its settings (library, metric, precision, cells, cells read per query) are recorded in ``OUT.meta.json``
  with the rows indexed; the model's identity is the vectors' own (``embed.check_index``), so a
  query encoded by another model is refused before the index is read.
- Below ``config.EXACT_BELOW`` rows exact search takes about 10 ms, and ``encode`` builds no index
  unless asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmkit.core.atomic import atomic_write
from llmkit.core.errors import ConfigError, DataError

BLOCK = 100_000
"""Rows added between two saves of an index being built (what an interruption can cost)."""
SETTINGS = {"library": "faiss", "index": "IVF,SQfp16", "metric": "cosine"}
"""Unit vectors in an inverted file of half-precision codes."""
TRAIN_PER_CELL = 50
"""k-means sample: this many vectors per cell (faiss asks for at least 39)."""


def ann_path(out: Path) -> Path:
    return out.with_name(out.name + ".ann")


def _faiss():
    import faiss  # optional dependency (the retrieval extra): imported when an index is used

    return faiss


def _meta(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".meta.json").read_text())


def _save_meta(out: Path, meta: dict) -> None:
    atomic_write(out.with_name(out.name + ".meta.json"), json.dumps(meta, indent=1))


def probes_for(cells: int) -> int:
    """Cells a query reads: a sixteenth of them, between 32 and 128. Measured (docs/benchmarks.md):
    128 of 1,788 cells gave recall@10 0.995 at 2.4 ms on 200k vectors, 128 of 4,000 0.999 at 5.9 ms
    on a million; 32 fell to 0.88 on 200k."""
    return min(cells, max(32, min(128, cells // 16)))


def cells_for(n: int) -> int:
    """Cells of an index of ``n`` vectors: 4 sqrt(n), and never so many that the k-means sample
    holds fewer than 39 vectors a cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _unit(block: np.ndarray) -> np.ndarray:
    block = np.array(block, dtype=np.float32)  # a copy: the vectors may be a read-only memory map
    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return block


def build_index(
    out: Path, vectors: np.ndarray, *, resume: bool = False, on_progress: Callable[[int, int], None] | None = None
) -> dict:
    """Index the rows of ``vectors`` (OUT's, memory-mapped) into OUT.ann; return its settings."""
    faiss = _faiss()
    meta = _meta(out)
    n, dim = vectors.shape
    cells = cells_for(n)
    settings = {**SETTINGS, "cells": cells, "nprobe": probes_for(cells), "rows": n, "dim": dim, "rows_indexed": 0}
    path = ann_path(out)
    old = meta.get("ann")
    same = old and all(old.get(k) == settings[k] for k in (*SETTINGS, "cells", "rows", "dim"))
    if resume and same and path.is_file():
        index = faiss.read_index(str(path))
        settings["rows_indexed"] = int(old["rows_indexed"])
        if index.ntotal != settings["rows_indexed"]:
            raise DataError(f"cannot resume {path}: it holds {index.ntotal} rows, {settings['rows_indexed']} "
                            "recorded; delete it to build it again")  # fmt: skip
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, settings["cells"], faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.cp.min_points_per_centroid = 1  # a set under 39 vectors has one cell: no warning about it
        sample = np.random.default_rng(0).choice(n, min(n, TRAIN_PER_CELL * settings["cells"]), replace=False)
        index.train(_unit(vectors[np.sort(sample)]))  # sorted rows: a memory map read in order
    start = settings["rows_indexed"]
    if on_progress:
        on_progress(start, n)
    for lo in range(start, n, BLOCK):
        hi = min(lo + BLOCK, n)
        index.add(_unit(vectors[lo:hi]))
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)  # the index first, then the count: a crash re-adds a block, never skips one
        settings["rows_indexed"] = hi
        _save_meta(out, {**meta, "ann": settings})
        if on_progress:
            on_progress(hi, n)
    if start == n:
        _save_meta(out, {**meta, "ann": settings})
    return settings


class Ann:
    """A finished index, memory-mapped, and its search."""

    def __init__(self, out: Path, meta: dict):
        settings = meta.get("ann")
        if not settings or not ann_path(out).is_file():
            raise DataError(f"no index beside {out} (build one with llmkit encode --ann)")
        if settings["rows_indexed"] != meta["rows_done"]:
            raise DataError(
                f"{ann_path(out)} holds {settings['rows_indexed']} of {meta['rows_done']} rows: "
                "finish it with llmkit encode … --ann --resume"
            )
        if settings.get("library") != SETTINGS["library"]:
            raise ConfigError(
                f"{ann_path(out)} was built by {settings.get('library')}, which this llmkit does not read: "
                "build it again with llmkit encode … --ann"
            )
        faiss = _faiss()
        self.settings = settings
        self.index = faiss.read_index(str(ann_path(out)), faiss.IO_FLAG_MMAP)
        self.index.nprobe = settings["nprobe"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and rows (Q, k) of each query's approximate k nearest, best first."""
        k = min(k, self.settings["rows_indexed"])
        scores, rows = self.index.search(_unit(queries), k)  # (Q, k) each; -1 where a cell ran short
        return scores, rows.astype(np.int64)
