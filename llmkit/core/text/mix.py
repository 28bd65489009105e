"""What a pretraining run reads: one or several sources, mixed by weight, and where validation
comes from (each document's tail, or an explicit ``--val`` set).

A batch's windows are drawn from the sources in proportion to their weights by the step's own
generator, so a mixed run resumes exactly as a single-source one does; with one source the draw is
the very one it always was. Validation reports the loss over every source's windows together and,
with several sources, each source's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.core.config import DataConfig
from llmkit.core.errors import ConfigError, DataError
from llmkit.core.files.corpus import CorpusFile, resolve_files, sample_corpus
from llmkit.core.files.stream import check_head
from llmkit.core.text.token_cache import Progress, Source, TokenData, load_source

WEIGHT_TOLERANCE = 1e-3


def parse_mix(items: tuple[str, ...] | list[str]) -> list[tuple[str, str, float]]:
    """'PATH=WEIGHT' items -> (name, path, weight); the name is the path's last part without
    suffixes (numbered when two agree); the weights must sum to 1."""
    out: list[tuple[str, str, float]] = []
    names: set[str] = set()
    for item in items:
        path, sep, weight = str(item).rpartition("=")
        if not sep or not path:
            raise ConfigError(f"--mix {item!r}: expected PATH=WEIGHT (e.g. --mix wiki/=0.7)")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"--mix {item!r}: the weight {weight!r} is not a number") from None
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"--mix {item!r}: the weight must be positive")
        stem = Path(path.rstrip("/")).name.split(".")[0] or "source"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}{k}", k + 1
        names.add(name)
        out.append((name, path, w))
    total = sum(w for _, _, w in out)
    if out and abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ConfigError(f"--mix weights sum to {total:g}, not 1 ({', '.join(f'{n}={w:g}' for n, _, w in out)})")
    return out


def plan_sources(corpus: list[str] | None, cfg: DataConfig) -> tuple[list[Source], Source | None, bool]:
    """The training sources, the explicit validation source (or None), and whether the bundled
    sample is used. Files are found and checked here, before any work."""
    split = "train" if cfg.val else "tail"
    if cfg.sources:
        if corpus:
            raise ConfigError("give the corpus as arguments or as --mix sources (data.sources), not both")
        sources = [
            Source(resolve_files([path]), name, weight, split, cfg.text_field)
            for name, path, weight in parse_mix(cfg.sources)
        ]
        sample = False
    else:
        files = resolve_files(corpus) if corpus else [CorpusFile(p, "text") for p in sample_corpus()]
        sources, sample = [Source(files, "corpus", 1.0, split, cfg.text_field)], not corpus
    val = Source(resolve_files(list(cfg.val)), "val", 1.0, "val", cfg.text_field) if cfg.val else None
    for src in sources + ([val] if val else []):
        empty = [cf.path for cf in src.files if not check_head(cf)]
        if len(empty) == len(src.files):
            what = "corpus" if src.name == "corpus" else f"source {src.name!r}"
            raise DataError(f"{what} is empty: {', '.join(str(p) for p in empty[:3])}")
    return sources, val, sample


@dataclass
class Corpus:
    """Tokenized sources, their weights, and the validation streams (name, tokens)."""

    parts: list[TokenData]
    weights: list[float]
    val_parts: list[tuple[str, Any]]
    val_bytes: int

    @property
    def train_tokens(self) -> int:
        return sum(p.train.size for p in self.parts)

    @property
    def val_tokens(self) -> int:
        return sum(v.size for _, v in self.val_parts)

    @property
    def val(self):
        """The first validation stream (sample prompts are taken from it)."""
        return self.val_parts[0][1]

    def report(self) -> dict[str, Any]:
        """The data report: totals, and each source's figures when there are several."""
        keys = ("documents", "duplicates", "chars", "bytes")
        out: dict[str, Any] = {k: sum(p.meta.get(k, 0) for p in self.parts) for k in keys}
        out.update(
            train_tokens=self.train_tokens,
            val_tokens=self.val_tokens,
            val_bytes=self.val_bytes,
            cached=all(p.from_cache for p in self.parts),
            path=str(self.parts[0].path),
            rebuilt=[p.meta["rebuilt"] for p in self.parts if p.meta.get("rebuilt")],
        )
        if len(self.parts) > 1:
            out["sources"] = {
                p.name: {
                    "weight": w,
                    "documents": p.meta["documents"],
                    "duplicates": p.meta.get("duplicates", 0),
                    "train_tokens": p.train.size,
                    "val_tokens": p.val.size,
                }
                for p, w in zip(self.parts, self.weights)
            }
        return out


def load_corpus(
    sources: list[Source],
    val: Source | None,
    tok,
    cfg: DataConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> Corpus:
    parts = [load_source(s, tok, cfg, on_progress=on_progress) for s in sources]
    if val is not None:
        held = load_source(val, tok, cfg, on_progress=on_progress)
        val_parts, val_bytes = [("val", held.val)], held.meta["val_bytes"]
    else:
        val_parts = [(p.name, p.val) for p in parts]
        val_bytes = sum(p.meta["val_bytes"] for p in parts)
    return Corpus(parts, [s.weight for s in sources], val_parts, val_bytes)


def check_fits(corpus: Corpus, context: int) -> None:
    """Every source must hold one full training block (context + 1 tokens for the shift) and
    every validation stream at least two tokens."""
    need = context + 1
    for part in corpus.parts:
        if part.train.size < need:
            what = "corpus" if part.name == "corpus" else f"source {part.name!r}"
            raise DataError(
                f"{what} too small: {part.train.size} training tokens, one block needs {need} "
                f"(model.context + 1); add text or lower model.context"
            )
    for name, tokens in corpus.val_parts:
        if tokens.size < 2:
            what = "corpus" if name == "corpus" else ("the --val set" if name == "val" else f"source {name!r}")
            raise DataError(
                f"{what} too small: nothing left for validation; add text or raise data.val_fraction"
                + (" (records are held out whole: a few need a larger share, or --val)" if name != "val" else "")
            )


def mixed_starts(
    sizes: list[int], weights: list[float], n: int, context: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(source, start) of ``n`` windows: each window's source drawn by weight, then a uniform
    start inside it."""
    which = rng.choice(len(sizes), size=n, p=np.asarray(weights) / np.sum(weights))
    u = rng.random(n)
    spans = np.asarray(sizes, dtype=np.int64)[which] - context
    return which, (u * spans).astype(np.int64)
