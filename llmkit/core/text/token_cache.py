"""The token cache: a corpus source tokenized once into fixed-size on-disk shards, streamed, in
parallel, resumable, keyed by content.

Layout under ``$LLMKIT_CACHE/tokens/``::

    <key>/index.json            what the cache holds (written last: marks it complete)
    <key>/train-00000.bin ...   flat token ids (uint16 or uint32), shard_tokens each, the last shorter
    <key>/val-00000.bin ...
    build-<id>/                 a build under way: the shards so far, *-partial.bin, state.json
    files.json                  the fast path: path -> (size, mtime, sha256) of files already hashed

``key`` hashes the files' contents (SHA-256 taken while they stream, never by a second read), the
tokenizer model and the settings that change the tokens; a build's ``id`` hashes the files' paths,
sizes and times instead, which are known before reading. A killed build leaves ``build-<id>/``
with a state written after every piece of work; the next build of the same files resumes there and
ends byte-identical to an uninterrupted one (pieces are cut the same way, and results are written
in order whatever the number of workers).

Memory stays flat: the main process reads one piece at a time, at most two pieces per worker are
in flight, and shards are appended to files, never held whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.core.atomic import atomic_write, commit
from llmkit.core.config import DataConfig, cache_home
from llmkit.core.errors import DataError, LlmkitError
from llmkit.core.files import stream
from llmkit.core.files.corpus import CorpusFile, decode_text, resolve_files
from llmkit.core.files.stream import HashingReader, Piece, file_pieces, is_val_record, open_raw, record_texts, row_texts
from llmkit.core.text.tokenizer import Tokenizer

CACHE_VERSION = 2


def default_cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cache_home()


# --- reading a cache --------------------------------------------------------------------------------


class ShardedStream:
    """Shards read as one flat array of token ids: ``size``, ``len`` and slices (a slice across a
    shard boundary is joined; one inside a shard is the memory map's own view)."""

    def __init__(self, shards: list[np.ndarray], dtype):
        self.shards = [s for s in shards if s.size]
        self.dtype = np.dtype(dtype)
        self.ends = np.cumsum([s.size for s in self.shards], dtype=np.int64)
        self.size = int(self.ends[-1]) if self.shards else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("token streams are sliced contiguously")
            return self._range(start, max(start, stop))
        i = int(key) + (self.size if int(key) < 0 else 0)
        if not 0 <= i < self.size:
            raise IndexError(key)
        return self._range(i, i + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        if start >= stop:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.ends, start, side="right"))
        base = int(self.ends[first - 1]) if first else 0
        if stop <= self.ends[first]:
            return self.shards[first][start - base : stop - base]
        parts, pos = [], start
        for j in range(first, len(self.shards)):
            lo = int(self.ends[j - 1]) if j else 0
            if pos >= stop:
                break
            parts.append(self.shards[j][pos - lo : min(stop, int(self.ends[j])) - lo])
            pos = min(stop, int(self.ends[j]))
        return np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, self.size)
        return out.astype(dtype) if dtype is not None else np.asarray(out)


@dataclass
class TokenData:
    """One tokenized source: flat train/validation streams, their sizes, and where they live."""

    train: ShardedStream
    val: ShardedStream
    meta: dict[str, Any]
    path: Path
    from_cache: bool
    name: str = ""


def open_cache(root: Path, *, from_cache: bool, name: str = "") -> TokenData:
    index = json.loads((root / "index.json").read_text())
    if index.get("version") != CACHE_VERSION:
        raise ValueError("cache version")
    dtype = np.dtype(index["dtype"])

    def side(prefix: str) -> ShardedStream:
        maps = []
        for i, n in enumerate(index["shards"][prefix]):
            path = root / f"{prefix}-{i:05d}.bin"
            if path.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{path.name}: {path.stat().st_size} bytes, the index says {n} tokens")
            maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
        return ShardedStream(maps, dtype)

    return TokenData(side("train"), side("val"), index, root, from_cache, name)


# --- workers ----------------------------------------------------------------------------------------

_TOKENIZER = None


def _init_worker(model_bytes: bytes, contract: dict) -> None:
    global _TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already

    _TOKENIZER = Tokenizer(model_bytes, contract)
    if hasattr(_TOKENIZER.backend, "threads"):
        _TOKENIZER.backend.threads = 1  # one worker per core already


def encode_text(tok, text: str) -> list[int]:
    """Token ids of a text, encoded line by line and joined with the newline id: "\\n" is its own
    token in every tokenizer llmkit trains, so this equals encoding the whole text, and it is what
    makes chunks at line breaks add up to the file (for imported tokenizers that merge "\\n" with
    its neighbours, it is the one rule every llmkit corpus follows)."""
    lines = text.split("\n")
    encoded = tok.encode_batch(lines) if len(lines) > 1 else [tok.encode(text)]
    out: list[int] = []
    nl = tok.newline_id
    for i, ids in enumerate(encoded):
        if i:
            out.append(nl)
        out.extend(ids)
    return out


@dataclass
class Result:
    """A worker's answer for one piece: the token ids of each document (part) in it."""

    tokens: list[np.ndarray]
    sides: list[str]
    digests: list[bytes]
    nbytes: list[int]
    nchars: list[int]
    eos: bool = False


def work(
    piece: Piece, tok=None, *, dtype=np.uint16, text_field: str = "text", val_fraction: float = 0.1, split: str = "tail"
) -> Result:
    """Tokenize one piece (in a worker process, or in this one when ``tok`` is given)."""
    tok = tok or _TOKENIZER
    bos = [tok.bos_id] if tok.expects_bos else []  # a document starts as the model's texts did
    if piece.kind == "text":
        text = decode_text(piece.data, Path(piece.path), piece.offset, first=piece.first)
        ids = (bos if piece.first else []) + encode_text(tok, text)
        if piece.eos:
            ids.append(tok.eos_id)
        return Result(
            [np.asarray(ids, dtype=dtype)], [piece.side], [b""], [len(text.encode("utf-8"))], [len(text)], piece.eos
        )
    texts = record_texts(piece, text_field) if piece.kind == "jsonl" else row_texts(piece)
    out = Result([], [], [], [], [])
    for _, text in texts:
        if not text.strip():
            continue
        data = text.encode("utf-8")
        digest = hashlib.blake2b(data, digest_size=8).digest()
        side = split if split != "tail" else ("val" if is_val_record(digest, val_fraction) else "train")
        out.tokens.append(np.asarray(bos + encode_text(tok, text) + [tok.eos_id], dtype=dtype))
        out.sides.append(side)
        out.digests.append(digest)
        out.nbytes.append(len(data))
        out.nchars.append(len(text))
    return out


def _work_in_pool(args) -> Result:
    piece, kw = args
    return work(piece, **kw)


# --- writing shards ---------------------------------------------------------------------------------


class ShardWriter:
    """Appends token ids to ``PREFIX-partial.bin``; every ``shard_tokens`` ids it becomes
    ``PREFIX-NNNNN.bin`` (renamed: a shard on disk is always whole)."""

    def __init__(self, root: Path, prefix: str, shard_tokens: int, dtype, shards: int = 0, partial: int = 0):
        self.root, self.prefix, self.shard_tokens, self.dtype = root, prefix, shard_tokens, np.dtype(dtype)
        self.shards, self.partial, self.total = shards, partial, shards * shard_tokens + partial
        path = self._partial_path()
        with open(path, "ab") as f:  # a killed build may have written past its last state: cut back
            f.truncate(partial * self.dtype.itemsize)
        self.f = open(path, "ab")

    def _partial_path(self) -> Path:
        return self.root / f"{self.prefix}-partial.bin"

    def _close_shard(self) -> None:
        self.f.close()
        commit(self._partial_path(), self.root / f"{self.prefix}-{self.shards:05d}.bin")
        self.shards += 1
        self.partial = 0

    def append(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self.total += ids.size
        while ids.size:
            take = ids[: self.shard_tokens - self.partial]
            self.f.write(take.tobytes())
            self.partial += take.size
            ids = ids[take.size :]
            if self.partial == self.shard_tokens:
                self._close_shard()
                self.f = open(self._partial_path(), "ab")

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> list[int]:
        """Close the last shard; the sizes of all shards."""
        self.f.close()
        if self.partial:
            self._close_shard()
            last = self.total - (self.shards - 1) * self.shard_tokens
        else:
            self._partial_path().unlink(missing_ok=True)
            last = self.shard_tokens
        return [self.shard_tokens] * (self.shards - 1) + [last] if self.shards else []

    def state(self) -> dict[str, int]:
        return {"shards": self.shards, "partial": self.partial}


# --- building ---------------------------------------------------------------------------------------


@dataclass
class Source:
    """A named set of corpus files and how they are split between training and validation."""

    files: list[CorpusFile]
    name: str = "corpus"
    weight: float = 1.0
    split: str = "tail"
    text_field: str = "text"


@dataclass
class Progress:
    done: int
    total: int
    name: str = ""


def _settings(source: Source, tok, cfg: DataConfig) -> str:
    return (
        f"v{CACHE_VERSION}|{tok.contract['model_sha256']}|{tok.expects_bos}|{source.split}|"
        f"{cfg.val_fraction if source.split == 'tail' else ''}|{source.text_field}|{cfg.dedup}|{cfg.shard_tokens}|"
    )


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _stat(cf: CorpusFile) -> tuple[int, int]:
    try:
        st = cf.path.stat()
    except OSError as e:
        raise DataError(f"cannot read {cf.path}: {e.strerror or e}") from None
    return st.st_size, st.st_mtime_ns


class FileHashes:
    """The fast path for unchanged files: a file whose size and modification time are the ones
    recorded when it was last hashed is taken to hold the same bytes (``data.trust_mtime``)."""

    def __init__(self, root: Path):
        self.path = root / "files.json"
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def get(self, cf: CorpusFile) -> str | None:
        size, mtime = _stat(cf)
        entry = self.known.get(str(cf.path))
        return entry[2] if entry and entry[0] == size and entry[1] == mtime else None

    def put(self, cf: CorpusFile, sha: str, stat: tuple[int, int]) -> None:
        self.known[str(cf.path)] = [stat[0], stat[1], sha]

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.known))


def hash_file(cf: CorpusFile) -> str:
    """A file's SHA-256 by a plain read (``data.trust_mtime: false`` does this before looking up)."""
    reader = HashingReader(open_raw(cf.path), cf.path)
    while reader.read(1 << 20):
        pass
    reader.close()
    return reader.sha.hexdigest()


def default_workers(cfg: DataConfig) -> int:
    if cfg.workers:
        return cfg.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_source(
    source: Source, tok, cfg: DataConfig, *, on_progress: Callable[[Progress], None] | None = None
) -> TokenData:
    """The token cache of ``source``: opened when it exists, else built (or a killed build resumed)."""
    root = default_cache_dir(cfg) / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    settings = _settings(source, tok, cfg)
    memo = FileHashes(root)
    stats = [_stat(cf) for cf in source.files]
    if cfg.trust_mtime:
        known = [memo.get(cf) for cf in source.files]
    else:
        known = [hash_file(cf) for cf in source.files]
    damaged = None
    if all(known):
        final = root / _digest(settings, *known)
        opened, damaged = _try_open(final, source.name)
        if opened is not None:
            return opened
    build = root / f"build-{_digest(settings, *(f'{cf.path}|{s}|{m}' for cf, (s, m) in zip(source.files, stats)))}"
    build.mkdir(exist_ok=True)
    with open(build / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per build directory; a second one waits
        if not build.is_dir():  # another process finished it while this one waited
            return load_source(source, tok, cfg, on_progress=on_progress)
        try:
            hashes, meta = _Build(build, source, tok, cfg, stats, on_progress).make()
        except LlmkitError:  # bad data: nothing to resume once the user has fixed it
            shutil.rmtree(build, ignore_errors=True)
            raise
        if damaged:
            meta["rebuilt"] = damaged
        final = root / _digest(settings, *hashes)
        for cf, sha, st in zip(source.files, hashes, stats):
            memo.put(cf, sha, st)
        memo.save()
        meta["key"] = final.name
        (build / "index.json").write_text(json.dumps(meta, indent=1))  # last: marks the cache complete
        os.unlink(build / "state.json")
        if (final / "index.json").is_file():  # the same content was cached under other file times
            shutil.rmtree(build, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(build, final)
    return open_cache(final, from_cache=False, name=source.name)


def _try_open(final: Path, name: str) -> tuple[TokenData | None, str | None]:
    """The cache, or (None, why it was damaged) when it cannot be trusted (it is then rebuilt)."""
    if not (final / "index.json").is_file():
        return None, None
    try:
        return open_cache(final, from_cache=True, name=name), None
    except (OSError, ValueError, KeyError) as e:
        shutil.rmtree(final, ignore_errors=True)  # a damaged cache is rebuilt, never trusted
        return None, f"{final}: {e}"


@dataclass
class _State:
    file: int = 0
    piece: int = 0
    hashes: list[str] = field(default_factory=list)
    train: dict = field(default_factory=lambda: {"shards": 0, "partial": 0})
    val: dict = field(default_factory=lambda: {"shards": 0, "partial": 0})
    seen: int = 0
    counts: dict = field(
        default_factory=lambda: {"documents": 0, "duplicates": 0, "chars": 0, "bytes": 0, "val_bytes": 0}
    )
    done: int = 0
    chunk_bytes: int = 0


def _read_state(build: Path) -> _State:
    try:
        data = json.loads((build / "state.json").read_text())
        state = _State(**data)
    except (OSError, ValueError, TypeError):
        return _State()
    return state if state.chunk_bytes == stream.CHUNK_BYTES else _State()  # pieces cut otherwise: start over


class _Build:
    """One build of a source's token cache: the resumable state, the shard writers and the
    deduplication set, fed piece by piece (in order) from one process or a pool of workers.

    The state is written after the data it describes, after every piece: a killed build leaves
    data past its state, which the writers cut back on resume.
    """

    def __init__(
        self,
        build: Path,
        source: Source,
        tok,
        cfg: DataConfig,
        stats: list[tuple[int, int]],
        on_progress: Callable[[Progress], None] | None,
    ):
        self.build, self.source, self.tok, self.cfg, self.stats = build, source, tok, cfg, stats
        self.on_progress = on_progress
        self.dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        self.state = state = _read_state(build)
        self.writers = {
            side: ShardWriter(build, side, cfg.shard_tokens, self.dtype, **getattr(state, side))
            for side in ("train", "val")
        }
        self.seen_path = build / "docs.u64"  # the hashes of the records kept so far (exact deduplication)
        with open(self.seen_path, "ab") as f:
            f.truncate(state.seen * 8)
        self.seen = set(np.fromfile(self.seen_path, dtype=np.uint64).tolist()) if state.seen else set()
        self.seen_file = open(self.seen_path, "ab")
        self.hashes: list[str] = list(state.hashes[: state.file])
        self.total = sum(size for size, _ in stats)
        self.kw = {
            "dtype": self.dtype,
            "text_field": source.text_field,
            "val_fraction": cfg.val_fraction,
            "split": source.split,
        }
        state.chunk_bytes = stream.CHUNK_BYTES

    def make(self) -> tuple[list[str], dict[str, Any]]:
        """Tokenize the source into the build directory (resuming its state); the files' hashes and
        the index."""
        try:
            small = self.total < 2 * stream.CHUNK_BYTES
            self.run(1 if small else default_workers(self.cfg))  # a small corpus: no processes
        finally:
            self.seen_file.close()
        return self.finish()

    def pieces(self) -> Iterator[tuple[int, int, Piece]]:
        """(file, piece number, piece) in order, from where the state left off; piece number -1
        marks a file fully read (its hash is then known) or skipped as a duplicate."""
        source, cfg, stats, state, hashes = self.source, self.cfg, self.stats, self.state, self.hashes
        sizes: dict[int, list[str]] = {}
        for i, cf in enumerate(source.files):
            if i < state.file:
                sizes.setdefault(stats[i][0], []).append(hashes[i])
                continue
            if cfg.dedup and cf.format == "text" and stats[i][0] in sizes:
                sha = hash_file(cf)  # a same-sized earlier file: maybe the very same text
                if sha in sizes[stats[i][0]]:
                    hashes.append(sha)
                    yield i, -1, Piece("duplicate", str(cf.path), raw=stats[i][0])
                    continue
            skip = state.piece if i == state.file else 0
            hasher: list[HashingReader] = []
            for n, piece in enumerate(
                file_pieces(cf, source.split, cfg.val_fraction, text_field=source.text_field, skip=skip, hasher=hasher),
                start=skip,
            ):
                yield i, n, piece
            hashes.append(hasher[0].sha.hexdigest())
            sizes.setdefault(stats[i][0], []).append(hashes[-1])
            yield i, -1, Piece("end", str(cf.path))

    def consume(self, i: int, n: int, piece: Piece, result: Result | None) -> None:
        """Append one piece's tokens (deduplicated records) and write the state after them."""
        state, counts = self.state, self.state.counts
        if result is None:  # a file ends (or is a duplicate): the next state starts after it
            counts["duplicates"] += piece.kind == "duplicate"
            state.file, state.piece = i + 1, 0
        else:
            for ids, side, digest, nbytes, nchars in zip(
                result.tokens, result.sides, result.digests, result.nbytes, result.nchars
            ):
                if digest:  # a record is one whole document
                    key = int.from_bytes(digest, "little")
                    if self.cfg.dedup and key in self.seen:
                        counts["duplicates"] += 1
                        continue
                    self.seen.add(key)
                    self.seen_file.write(np.uint64(key).tobytes())
                    state.seen += 1
                    counts["documents"] += 1
                elif piece.first:
                    counts["documents"] += 1  # a text file is one document, counted at its start
                self.writers[side].append(ids)
                counts["chars"] += nchars
                counts["bytes"] += nbytes
                counts["val_bytes"] += nbytes if side == "val" else 0
            state.file, state.piece = i, n + 1
        state.done += piece.raw
        for w in self.writers.values():
            w.flush()
        self.seen_file.flush()
        state.hashes, state.train, state.val = (
            self.hashes[: state.file],
            self.writers["train"].state(),
            self.writers["val"].state(),
        )
        atomic_write(self.build / "state.json", json.dumps(state.__dict__))
        if self.on_progress:
            self.on_progress(Progress(state.done, self.total, self.source.name))

    def run(self, workers: int) -> None:
        """Every piece, tokenized here (one worker) or by a pool of spawned processes, consumed in order."""
        tok = self.tok
        if workers == 1:
            backend, threads = tok.backend, getattr(tok.backend, "threads", None)
            if self.cfg.workers == 1 and threads is not None:
                backend.threads = 1  # one process on one core, as asked
            try:
                for i, n, piece in self.pieces():
                    self.consume(i, n, piece, work(piece, tok, **self.kw) if n >= 0 else None)
            finally:
                if threads is not None:
                    backend.threads = threads
            return
        ctx = mp.get_context("spawn")  # lean workers: no copy of a parent that holds torch or a model
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.model_bytes, tok.contract)) as pool:
            pending: deque = deque()  # at most two pieces per worker in flight: flat memory
            for i, n, piece in self.pieces():
                pending.append((i, n, piece, pool.apply_async(_work_in_pool, ((piece, self.kw),)) if n >= 0 else None))
                while len(pending) > 2 * workers:
                    i0, n0, p0, job = pending.popleft()
                    self.consume(i0, n0, p0, job.get() if job else None)
            while pending:
                i0, n0, p0, job = pending.popleft()
                self.consume(i0, n0, p0, job.get() if job else None)

    def finish(self) -> tuple[list[str], dict[str, Any]]:
        """Close the shards; the files' hashes and the cache's index (refused when nothing was kept)."""
        source, state = self.source, self.state
        shards = {side: w.finish() for side, w in self.writers.items()}
        if not state.counts["documents"]:
            names = ", ".join(str(cf.path) for cf in source.files[:3]) + (" …" if len(source.files) > 3 else "")
            what = "corpus is" if source.name == "corpus" else f"source {source.name!r} is"
            raise DataError(f"{what} empty: {names}")
        meta = {
            "version": CACHE_VERSION,
            "dtype": np.dtype(self.dtype).name,
            "source": source.name,
            **state.counts,
            "train_tokens": int(sum(shards["train"])),
            "val_tokens": int(sum(shards["val"])),
            "files": [str(cf.path) for cf in source.files],
            "shards": shards,
            "shard_tokens": self.cfg.shard_tokens,
            "split": source.split,
        }
        self.seen_path.unlink(missing_ok=True)
        return self.hashes, meta


def load_or_build(
    files: list[Path], tok, cfg: DataConfig, *, on_progress: Callable[[Progress], None] | None = None
) -> TokenData:
    """The token cache of plain files as one source (paths, directories or globs resolved first)."""
    return load_source(Source(resolve_files([str(f) for f in files])), tok, cfg, on_progress=on_progress)
