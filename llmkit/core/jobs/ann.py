"""An approximate-nearest-neighbour index beside the vectors ``encode`` wrote: ``OUT.ann``.

Exact search reads every vector for every query: 2.3 GB for a million vectors of dimension 576,
hundreds of milliseconds on a laptop. The index is an HNSW graph (usearch: docs/architecture.md
says why this library) over half-precision copies of the vectors, searched in a few milliseconds.

- Built from OUT after the vectors are written, in blocks; after each block the graph is saved
  and ``OUT.meta.json`` records how many rows it holds, so an interrupted build resumes there.
- Opened memory-mapped (``view``): a search process pages in what the walk touches, not the file.
- Its settings (library, metric, precision, graph degree) are recorded in ``OUT.meta.json`` with
  the rows indexed; the model's identity is the vectors' own (``embed.check_index``), so a query
  encoded by another model is refused before the index is read.
- Below ``config.EXACT_BELOW`` rows exact search is as fast, and ``encode`` builds no index unless asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmkit.core.atomic import atomic_write
from llmkit.core.errors import ConfigError, DataError

BLOCK = 100_000
"""Rows added between two saves of a graph being built (what an interruption can cost)."""
SETTINGS = {"library": "usearch", "metric": "cos", "dtype": "f16", "connectivity": 16, "expansion_add": 128,
            "expansion_search": 128}  # fmt: skip
"""The graph: cosine distance over f16 copies of the vectors, 16 links per node; the expansions
are the candidate lists kept while adding and while searching (recall against time)."""


def ann_path(out: Path) -> Path:
    return out.with_name(out.name + ".ann")


def _usearch():
    from usearch.index import Index  # optional dependency (the retrieval extra): imported when an index is used

    return Index


def _meta(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".meta.json").read_text())


def _save_meta(out: Path, meta: dict) -> None:
    atomic_write(out.with_name(out.name + ".meta.json"), json.dumps(meta, indent=1))


def build_index(
    out: Path, vectors: np.ndarray, *, resume: bool = False, on_progress: Callable[[int, int], None] | None = None
) -> dict:
    """Index the rows of ``vectors`` (OUT's, memory-mapped) into OUT.ann; return its settings."""
    Index = _usearch()
    meta = _meta(out)
    n, dim = vectors.shape
    settings = {**SETTINGS, "rows": n, "dim": dim, "rows_indexed": 0}
    path = ann_path(out)
    old = meta.get("ann")
    if resume and old and path.is_file() and all(old.get(k) == v for k, v in SETTINGS.items()):
        index = Index.restore(str(path))
        if index is not None:
            index.expansion_add = SETTINGS["expansion_add"]  # a saved graph does not keep it
        settings["rows_indexed"] = int(old["rows_indexed"])
        if index is None or len(index) != settings["rows_indexed"]:
            raise DataError(f"cannot resume {path}: it holds {0 if index is None else len(index)} rows, "
                            f"{settings['rows_indexed']} recorded; delete it to build it again")  # fmt: skip
    else:
        index = Index(ndim=dim, **{k: SETTINGS[k] for k in ("metric", "dtype", "connectivity", "expansion_add",
                                                              "expansion_search")})  # fmt: skip
    start = settings["rows_indexed"]
    if on_progress:
        on_progress(start, n)
    for lo in range(start, n, BLOCK):
        hi = min(lo + BLOCK, n)
        index.add(np.arange(lo, hi, dtype=np.uint64), np.asarray(vectors[lo:hi], dtype=np.float32))
        tmp = path.with_name(path.name + ".tmp")
        index.save(str(tmp))
        tmp.replace(path)  # the graph first, then the count: a crash re-adds a block, never skips one
        settings["rows_indexed"] = hi
        _save_meta(out, {**meta, "ann": settings})
        if on_progress:
            on_progress(hi, n)
    if n == 0 or start == n:
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
        if settings["library"] != SETTINGS["library"]:
            raise ConfigError(f"{ann_path(out)} was built by {settings['library']}, which this llmkit does not read")
        self.settings = settings
        self.index = _usearch().restore(str(ann_path(out)), view=True)
        self.index.expansion_search = settings["expansion_search"]  # a saved graph does not keep it

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and rows (Q, k) of each query's approximate k nearest, best first."""
        k = min(k, self.settings["rows_indexed"])
        found = self.index.search(np.asarray(queries, dtype=np.float32), k)
        keys = np.asarray(found.keys).reshape(len(queries), -1)  # (Q, k)
        distances = np.asarray(found.distances).reshape(len(queries), -1)
        return 1.0 - distances, keys.astype(np.int64)  # usearch's cosine distance is 1 - cosine
