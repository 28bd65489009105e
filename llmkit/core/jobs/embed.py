"""Embeddings from any llmkit checkpoint: pooled hidden states, streamed to disk, and search.

- Items come from a text file (one per line), JSONL (a field), CSV/TSV (a column) or stdin.
- Items are encoded in chunks taken in input order; inside a chunk they are sorted by length (less
  padding), batched, and put back in order before the chunk is written. Memory is bounded by the
  chunk, whatever the number of items.
- Padding never changes a vector: right padding is invisible to causal attention; left padding
  gets per-row positions and a mask (as in batched generation). Pooling only reads real tokens.
- Writers append chunk by chunk to .npy (a preallocated memmap), .safetensors (header first, data
  streamed) or .jsonl. ``OUT.meta.json`` records the model hash, settings and rows done (updated
  after each chunk), so an interrupted run can resume; .npy/.safetensors indexes keep their texts
  in ``OUT.items.jsonl`` for search.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from llmkit.core.atomic import atomic_write
from llmkit.core.config import EmbedConfig
from llmkit.core.errors import ConfigError, DataError
from llmkit.core.files.records import iter_records
from llmkit.core.jobs.ann import Ann
from llmkit.core.tasks.retrieval import as_query, embed_items, top_k

FORMATS = (".npy", ".safetensors", ".jsonl")
CHUNK = 2048


# --- input ----------------------------------------------------------------------------------------


class ItemSource:
    """The items of an input, read lazily and twice: a first pass validates, counts and hashes
    them (so errors come before any output, and .npy/.safetensors can be preallocated), the
    second feeds the encoder. Only one chunk of texts is ever in memory."""

    def __init__(
        self,
        open_lines: Callable[[], Iterable[str]],
        name: str,
        *,
        kind: str = "lines",
        field: str | None = None,
        column: str | None = None,
    ):
        self.open_lines, self.name, self.kind, self.field, self.column = open_lines, name, kind, field, column
        self.n, self.hash = 0, ""

    @classmethod
    def of(cls, items: list[str]) -> ItemSource:
        return cls(lambda: items, "items", kind="items")

    @classmethod
    def from_file(cls, path: Path, *, field: str | None = None, column: str | None = None) -> ItemSource:
        kind = input_format(str(path), field, column)

        def open_lines():
            offset = 0
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}") from None
                    yield line.lstrip("\ufeff") if offset == 0 else line
                    offset += len(raw)

        return cls(open_lines, str(path), kind=kind, field=field, column=column)

    @classmethod
    def from_text(cls, text: str, name: str, *, field: str | None = None, column: str | None = None) -> ItemSource:
        kind = "jsonl" if field else "csv" if column else "lines"
        return cls(lambda: io.StringIO(text), name, kind=kind, field=field, column=column)

    def __iter__(self) -> Iterator[str]:
        if self.kind == "items":
            return iter(self.open_lines())
        return iter_records(self.open_lines(), self.name, self.kind, field=self.field or "text", column=self.column)

    def scan(self) -> ItemSource:
        h, n = hashlib.sha256(), 0
        for item in self:
            h.update(item.encode("utf-8") + b"\x1e")
            n += 1
        if n == 0:
            raise DataError(f"{self.name}: no items to encode (the input is empty)")
        self.n, self.hash = n, h.hexdigest()[:16]
        return self


def input_format(path: str, field: str | None, column: str | None) -> str:
    suffix = Path(path).suffix.lower()
    if field or suffix == ".jsonl":
        return "jsonl"
    if column or suffix in (".csv", ".tsv"):
        if not column:
            raise DataError(f"{path}: give --column to choose the text column of a {suffix} file")
        return "tsv" if suffix == ".tsv" else "csv"
    return "lines"


# --- output ----------------------------------------------------------------------------------------


def model_hash(ckpt_path: Path) -> str:
    h = hashlib.sha256()
    with open(Path(ckpt_path) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def items_path(out: Path) -> Path:
    return out.with_name(out.name + ".items.jsonl")


class Writer:
    """Appends vectors chunk by chunk to OUT; keeps OUT.meta.json (and OUT.items.jsonl) in step."""

    def __init__(self, out: Path, n: int, dim: int, meta: dict, *, resume: bool):
        self.out, self.n, self.dim = out, n, dim
        self.fmt = out.suffix.lower()
        if self.fmt not in FORMATS:
            raise ConfigError(f"output {out}: unsupported extension {out.suffix or '(none)'}; use {', '.join(FORMATS)}")
        if out.exists() and out.is_dir():
            raise ConfigError(f"output {out} is a directory")
        self.np_dtype = np.float16 if meta["dtype"] == "float16" else np.float32
        self.meta = {**meta, "rows": n, "dim": dim, "format": self.fmt[1:], "rows_done": 0}
        self.done = 0
        if resume and meta_path(out).is_file() and out.is_file():
            old = json.loads(meta_path(out).read_text())
            for key in (
                "model_hash",
                "rows",
                "dim",
                "pooling",
                "layer",
                "normalize",
                "dtype",
                "max_length",
                "prefix",
                "format",
                "input_hash",
            ):
                if old.get(key) != self.meta.get(key):
                    raise ConfigError(f"cannot resume {out}: {key} was {old.get(key)!r}, now {self.meta.get(key)!r}")
            self.done = old["rows_done"]
            self._truncate_text_files()
        else:
            self._create()
        self.meta["rows_done"] = self.done

    def _truncate_text_files(self) -> None:
        for path in [self.out] if self.fmt == ".jsonl" else [items_path(self.out)]:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[: self.done]
            path.write_text("".join(lines), encoding="utf-8")

    def _create(self) -> None:
        if self.fmt == ".npy":
            np.lib.format.open_memmap(self.out, mode="w+", dtype=self.np_dtype, shape=(self.n, self.dim)).flush()
        elif self.fmt == ".safetensors":
            header = {
                "embeddings": {
                    "dtype": "F16" if self.np_dtype == np.float16 else "F32",
                    "shape": [self.n, self.dim],
                    "data_offsets": [0, self.n * self.dim * np.dtype(self.np_dtype).itemsize],
                },
                "__metadata__": {k: str(v) for k, v in self.meta.items() if k != "rows_done"},
            }
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            with open(self.out, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + self.n * self.dim * np.dtype(self.np_dtype).itemsize)
        else:
            self.out.write_text("", encoding="utf-8")
        if self.fmt in (".npy", ".safetensors"):
            _reserve(self.out)
        if self.fmt != ".jsonl":
            items_path(self.out).write_text("", encoding="utf-8")
        self._save_meta()

    def _save_meta(self) -> None:
        atomic_write(meta_path(self.out), json.dumps(self.meta, indent=1))

    def write(self, vectors: np.ndarray, texts: list[str]) -> None:
        start, stop = self.done, self.done + len(vectors)
        vec = vectors.astype(self.np_dtype)
        if self.fmt == ".npy":
            mm = np.load(self.out, mmap_mode="r+")
            mm[start:stop] = vec
            mm.flush()
            del mm
        elif self.fmt == ".safetensors":
            with open(self.out, "r+b") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                f.seek(8 + header_len + start * self.dim * vec.itemsize)
                f.write(np.ascontiguousarray(vec).tobytes())
        if self.fmt == ".jsonl":
            with open(self.out, "a", encoding="utf-8") as f:
                for i, (t, v) in enumerate(zip(texts, vec.tolist())):
                    f.write(json.dumps({"id": start + i, "text": t, "vector": v}, ensure_ascii=False) + "\n")
        else:
            with open(items_path(self.out), "a", encoding="utf-8") as f:
                for i, t in enumerate(texts):
                    f.write(json.dumps({"id": start + i, "text": t}, ensure_ascii=False) + "\n")
        self.done = stop
        self.meta["rows_done"] = stop  # after the data: a crash re-encodes a chunk, never skips one
        self._save_meta()


def encode_to_file(
    model,
    tokenizer,
    items: list[str] | ItemSource,
    out: Path,
    s: EmbedConfig,
    *,
    model_id: str,
    batch_size: int = 32,
    device="cpu",
    resume: bool = False,
    chunk: int = CHUNK,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Encode items into OUT chunk by chunk; return the final metadata (with 'truncated')."""
    source = items if isinstance(items, ItemSource) else ItemSource.of(list(items))
    if not source.n:
        source.scan()
    meta = {"model_hash": model_id, "input_hash": source.hash, **asdict(s)}
    writer = Writer(out, source.n, model.cfg.d_model, meta, resume=resume)
    truncated = 0
    if on_progress:
        on_progress(writer.done, source.n, 0)
    rest = itertools.islice(iter(source), writer.done, None)  # resume: skip the rows already written
    while part := list(itertools.islice(rest, chunk)):
        vectors, t = embed_items(model, tokenizer, part, s, batch_size=batch_size, device=device)
        truncated += t
        writer.write(vectors, part)
        if on_progress:
            on_progress(writer.done, source.n, truncated)
    writer.meta["truncated"] = truncated
    writer._save_meta()
    return writer.meta


# --- reading an index and searching ----------------------------------------------------------------


def load_index(out: Path) -> tuple[np.ndarray, list[str], dict]:
    """Vectors (N, C), texts and metadata of an index written by encode_to_file."""
    if not meta_path(out).is_file() or not out.is_file():
        raise DataError(f"no index at {out} (expected {out.name} and {meta_path(out).name})")
    meta = json.loads(meta_path(out).read_text())
    n = meta["rows_done"]
    if out.suffix == ".npy":
        vectors = np.load(out, mmap_mode="r")[:n]
    elif out.suffix == ".safetensors":
        vectors = load_file(str(out))["embeddings"][:n]
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32)
        return vectors, [r["text"] for r in rows], meta
    texts = [json.loads(line)["text"] for line in items_path(out).read_text(encoding="utf-8").splitlines()][:n]
    return np.asarray(vectors, dtype=np.float32), texts, meta


def vectors_of(out: Path) -> np.ndarray:
    """The vectors written to OUT (.npy memory-mapped; .safetensors read), rows done only."""
    meta = json.loads(meta_path(out).read_text())
    if out.suffix == ".npy":
        return np.load(out, mmap_mode="r")[: meta["rows_done"]]
    if out.suffix == ".safetensors":
        return load_file(str(out))["embeddings"][: meta["rows_done"]]
    raise ConfigError(f"{out}: an index is built over .npy or .safetensors vectors")


def check_layer(model, layer: int) -> None:
    """Refuse a --layer this model does not have, naming the range it has."""
    n = model.cfg.n_layer
    if not -(n + 1) <= layer <= n:
        raise ConfigError(f"--layer {layer} is out of range: this model has layers {-(n + 1)}..{n}")


def index_settings(meta: dict) -> EmbedConfig:
    """The settings an index was built with: a query must be encoded the same way."""
    return EmbedConfig(
        pooling=meta["pooling"],
        layer=meta["layer"],
        normalize=meta["normalize"],
        max_length=meta["max_length"],
        prefix=meta.get("prefix", ""),  # indexes written before prefixes existed had none
        query_prefix=meta.get("query_prefix", ""),
    )


def check_index(index: Path, vectors: np.ndarray, meta: dict, model, model_id: str) -> None:
    """Refuse to search an index another model built (its vectors live in another space)."""
    if vectors.shape[1] != model.cfg.d_model or meta["model_hash"] != model_id:
        raise DataError(
            f"index {index} was built by another model (dimension {vectors.shape[1]}, model "
            f"{meta['model_hash']}); this checkpoint gives dimension {model.cfg.d_model}, model {model_id}"
        )


FLAT_SPREAD = 0.002
"""Top scores closer together than this tell the items apart by noise, not by meaning."""


def flat_ranking(hits: list[tuple[int, float, str]]) -> bool:
    """Whether a search's hits score all but the same (with three or more): the vectors then share
    one dominant direction (a decoder's mean-pooled states do) and the order means little."""
    scores = [score for _, score, _ in hits]
    return len(scores) >= 3 and max(scores) - min(scores) < FLAT_SPREAD


@dataclass
class IndexFile:
    """An index written by ``encode_to_file`` (vectors, texts, metadata), and its search."""

    path: Path
    vectors: np.ndarray
    texts: list[str]
    meta: dict

    @classmethod
    def open(cls, path: Path) -> IndexFile:
        return cls(Path(path), *load_index(path))

    def search(
        self, model, ckpt, query: str, k: int, *, device="cpu", exact: bool | None = None
    ) -> list[tuple[int, float, str]]:
        """The ``k`` items nearest to ``query`` (encoded as the index was, behind its query prefix):
        [(row, score, text)], best first. An index another model built is refused: its vectors live
        in another space. The approximate index beside the vectors answers when there is one
        (``exact`` None), or must (False); True reads every vector."""
        settings = index_settings(self.meta)
        check_layer(model, settings.layer)
        check_index(self.path, self.vectors, self.meta, model, model_hash(ckpt.path))
        vec, _ = embed_items(model, ckpt.tokenizer, [query], as_query(settings), device=device)
        if exact is False or (exact is None and "ann" in self.meta):
            scores, rows = Ann(self.path, self.meta).search(vec, k)
        else:
            scores, rows = top_k(vec, self.vectors, k)
        return [(int(row), float(score), self.texts[row]) for row, score in zip(rows[0], scores[0])]


def _reserve(path: Path) -> None:
    """Give a preallocated output its disk blocks now: written later through a memory map, a file
    whose blocks a full disk cannot supply kills the process with SIGBUS, without a message. Here
    a full disk is one line before any vector is computed."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem that cannot: write it
                return
            path.unlink(missing_ok=True)
            raise DataError(f"cannot write {path}: {e.strerror} ({size} bytes needed)") from None
