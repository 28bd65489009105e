"""Reading corpus files as streams, in bounded memory: decompression, the content hash taken on
the way, and the pieces of work the tokenizer workers receive.

A file is never read whole. Plain-text files go out as chunks of about ``chunk_bytes`` that end at
a line break, so encoding a chunk line by line and joining with the newline id equals encoding
the whole file: the token stream does not depend on the chunk size or on how many workers there
are. JSON lines go out as chunks of whole lines; parquet files as batches of rows.

Validation split (the default ``tail`` mode): a plain-text file is one document whose tail
``val_fraction`` (cut at the first line break at or after the mark, else the first space) is
held out; the mark is a byte offset, so a stream knows it before reading. A record (JSON line,
parquet row) is one document, held out whole when its hash falls in the ``val_fraction`` share:
small documents have no tail worth the name. ``train`` and ``val`` modes send everything to one
side (an explicit ``--val`` set and the sources it validates).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llmkit.core.errors import DataError
from llmkit.core.files.corpus import CorpusFile, decode_text
from llmkit.core.files.records import iter_objects

CHUNK_BYTES = 4 << 20
"""About this many bytes go to a worker at a time (then on to the next line break)."""
ROWS_PER_BATCH = 4096
"""Parquet rows per piece of work."""
SPLITS = ("tail", "train", "val")
VAL_BUCKETS = 1 << 16


def _missing(package: str, what: str) -> DataError:
    return DataError(f"{what} needs the '{package}' package: pip install 'llmkit[corpus]' (or pip install {package})")


def open_raw(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


class HashingReader(io.RawIOBase):
    """A binary file that feeds every byte it reads into a SHA-256: the content hash of a file is
    taken while it is streamed, never by a second read."""

    def __init__(self, raw: BinaryIO, path: Path):
        self.raw, self.path, self.sha, self.count = raw, path, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self.raw.readinto(buffer)
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from None
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self.count += n
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressed(reader: HashingReader, cf: CorpusFile) -> BinaryIO:
    if cf.compression == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(reader, 1 << 20), mode="rb")
    if cf.compression == "zstd":
        try:
            import zstandard  # optional dependency (the corpus extra), only for .zst files
        except ImportError:
            raise _missing("zstandard", f"{cf.path}: reading .zst files") from None
        return io.BufferedReader(ZstdFrames(io.BufferedReader(reader, 1 << 20), zstandard), 1 << 20)
    return io.BufferedReader(reader, 1 << 20)


class ZstdFrames(io.RawIOBase):
    """Every frame of a .zst stream, in order, and an error when the stream ends inside one.

    zstandard's ``stream_reader(read_across_frames=True)`` returns end of file, without an error,
    when the data stops in the middle of a later frame: a truncated multi-frame file (a download cut
    short) then trained on its first frames only, with exit 0. Here each frame has its own
    decompression object, whose ``eof`` says whether the frame was complete.
    """

    def __init__(self, raw: BinaryIO, zstandard):
        self.raw, self.zstandard = raw, zstandard
        self.frame = None  # the decompression object of the frame being read
        self.pending, self.at = b"", 0  # decompressed bytes not yet read, and how far they were read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            data = self.raw.read(1 << 20)
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise OSError("a compressed frame is cut short")
                return 0
            self._feed(data)
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = memoryview(self.pending)[self.at : self.at + n]  # no copy of the rest at each read
        self.at += n
        return n

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            if self.frame is None or self.frame.eof:
                self.frame = self.zstandard.ZstdDecompressor().decompressobj()
            out.append(self.frame.decompress(data))
            data = self.frame.unused_data if self.frame.eof else b""
        self.pending, self.at = b"".join(out), 0  # called only once the previous output is all read

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_exact(stream: BinaryIO, n: int, path: Path) -> bytes:
    """``n`` bytes (fewer only at the end): decompressors may return short reads, and the chunk
    boundaries, which resuming relies on, must not depend on them."""
    parts, got = [], 0
    while got < n:
        try:
            data = stream.read(n - got)
        except (OSError, EOFError, ValueError) as e:  # gzip's BadGzipFile is an OSError
            raise DataError(f"{path}: damaged or truncated file ({e})") from None
        except Exception as e:  # zstandard.ZstdError
            raise DataError(f"{path}: damaged or truncated compressed file ({e})") from None
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


LINE_BYTES = 256 << 20
"""The longest line a corpus may hold: a line is held whole until it ends."""


def line_chunks(stream: BinaryIO, chunk_bytes: int, path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of a stream, each ending at a line break (the last may not)."""
    carry, offset = b"", 0
    while True:
        block = read_exact(stream, chunk_bytes, path)
        if not block:
            if carry:
                yield offset, carry
            return
        data = carry + block
        cut = data.rfind(b"\n")
        if cut < 0:  # a line longer than a chunk: keep reading until it ends
            if len(data) > LINE_BYTES:
                raise DataError(
                    f"{path}: the line at byte {offset} is over {LINE_BYTES >> 20} MiB (a 2 MB .gz can hold a 2 GiB "
                    "line): split it, or is this file text?"
                )
            carry = data
            continue
        yield offset, data[: cut + 1]
        offset += cut + 1
        carry = data[cut + 1 :]


HEAD_BYTES = 64 << 10


def check_head(cf: CorpusFile) -> bool:
    """Check the start of a text file before any work (binary, not UTF-8), the whole of it when it
    is small; whether it holds any text (always True for a big file: its end is checked when read)."""
    if cf.format != "text":
        return True
    reader = HashingReader(open_raw(cf.path), cf.path)
    with _decompressed(reader, cf) as stream:
        head = read_exact(stream, HEAD_BYTES + 1, cf.path)
    whole = len(head) <= HEAD_BYTES
    if not whole:  # decode whole lines only: the head may end inside a character
        head = head[: head.rfind(b"\n") + 1] if b"\n" in head else b""
    text = decode_text(head, cf.path)
    return bool(text.strip()) or not whole


def decompressed_size(cf: CorpusFile, chunk_bytes: int = 1 << 20) -> int:
    """The size of a compressed file's text: the validation mark of a compressed text file is a
    byte offset too, so it is counted first (decompressing runs ~100x faster than tokenizing)."""
    reader = HashingReader(open_raw(cf.path), cf.path)
    with _decompressed(reader, cf) as stream:
        total = 0
        while block := read_exact(stream, chunk_bytes, cf.path):
            total += len(block)
    return total


def val_cut(data: bytes, mark: int) -> int | None:
    """Where a document's tail starts, inside the piece that holds the mark: after the first line
    break at or after it, else after the first space; None when there is neither."""
    for sep in (b"\n", b" "):
        i = data.find(sep, mark)
        if i >= 0:
            return i + 1
    return None


def is_val_record(digest: bytes, val_fraction: float) -> bool:
    """A record goes to validation when its hash falls in the first ``val_fraction`` of buckets:
    the same text always lands on the same side, whatever the order or the worker."""
    return int.from_bytes(digest[:4], "little") % VAL_BUCKETS < round(val_fraction * VAL_BUCKETS)


# --- pieces of work ---------------------------------------------------------------------------------


@dataclass
class Piece:
    """One piece of work for a tokenizer worker.

    kind text: ``data`` is UTF-8 bytes of one document's train or val part (``side``), ``eos``
    when it ends that part. kind jsonl: ``data`` holds whole JSON lines (``line`` is the first one's
    number). kind rows: ``rows`` holds parquet texts. ``offset`` is where ``data`` starts in the
    (decompressed) file, for error messages; ``raw`` is how many file bytes it stands for."""

    kind: str
    path: str
    data: bytes = b""
    rows: list | None = None
    side: str = "train"
    eos: bool = False
    first: bool = False
    offset: int = 0
    line: int = 1
    raw: int = 0


def file_pieces(
    cf: CorpusFile,
    split: str,
    val_fraction: float,
    *,
    chunk_bytes: int = 0,
    text_field: str = "text",
    skip: int = 0,
    hasher: list | None = None,
) -> Iterator[Piece]:
    """The pieces of one file, in order; the first ``skip`` are read past without being yielded
    (resuming a build). ``hasher`` receives the file's SHA-256 object once it is opened."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if cf.format == "parquet":
        yield from _parquet_pieces(cf, text_field, skip, hasher)
        return
    reader = HashingReader(open_raw(cf.path), cf.path)
    if hasher is not None:
        hasher.append(reader)
    size = cf.path.stat().st_size if cf.compression is None else None
    with _decompressed(reader, cf) as stream:
        index = 0

        def emit(piece: Piece):
            nonlocal index
            index += 1
            return piece if index > skip else None

        if cf.format == "jsonl":
            line, before = 1, 0
            for offset, data in line_chunks(stream, chunk_bytes, cf.path):
                p = emit(Piece("jsonl", str(cf.path), data, offset=offset, line=line, raw=reader.count - before))
                before = reader.count
                line += data.count(b"\n")
                if p:
                    yield p
            return
        if split != "tail":
            mark = None
        else:
            total = size if size is not None else decompressed_size(cf, chunk_bytes)
            mark = int(total * (1.0 - val_fraction))
        side, before, last = ("val" if split == "val" else "train"), 0, None
        for offset, data in line_chunks(stream, chunk_bytes, cf.path):
            raw, before = reader.count - before, reader.count
            if last is not None:
                p = emit(last)
                if p:
                    yield p
            first = offset == 0
            if mark is not None and side == "train" and offset + len(data) > mark:
                cut = val_cut(data, max(0, mark - offset))
                if cut is not None and cut < len(data):
                    p = emit(
                        Piece(
                            "text",
                            str(cf.path),
                            data[:cut],
                            side="train",
                            eos=True,
                            first=first,
                            offset=offset,
                            raw=raw,
                        )
                    )
                    if p:
                        yield p
                    side, data, offset, first, raw = "val", data[cut:], offset + cut, False, 0
                elif cut is not None:  # the cut falls at the very end: the tail is empty
                    mark = None
            last = Piece("text", str(cf.path), data, side=side, first=first, offset=offset, raw=raw)
        if last is not None and not (index == 0 and last.first and not last.data.strip()):
            last.eos = True  # (a file of whitespace alone is no document)
            p = emit(last)
            if p:
                yield p


def _parquet_pieces(cf: CorpusFile, text_field: str, skip: int, hasher: list | None) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq  # optional dependency (the corpus extra), only for parquet files
    except ImportError:
        raise _missing("pyarrow", f"{cf.path}: reading parquet files") from None
    if hasher is not None:  # pyarrow reads by seeking: the hash is one plain read of the file
        reader = HashingReader(open_raw(cf.path), cf.path)
        while reader.read(1 << 20):
            pass
        reader.close()
        hasher.append(reader)
    try:
        table = pq.ParquetFile(cf.path)
    except Exception as e:  # pyarrow.lib.ArrowInvalid and friends
        raise DataError(f"{cf.path}: not a parquet file pyarrow can read ({str(e).splitlines()[0]})") from None
    names = table.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{cf.path}: no column {text_field!r} (columns: {', '.join(names[:8])}); give --text-field")
    row = 1
    for i, batch in enumerate(table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[text_field])):
        rows = batch.column(0).to_pylist()
        if i >= skip:
            yield Piece("rows", str(cf.path), rows=rows, line=row)
        row += len(rows)


# --- a bounded sample of lines, for tokenizer training ----------------------------------------------


def _doc_texts(cf: CorpusFile, text_field: str, hasher: list) -> Iterator[str]:
    """The text of a file, piece by piece, decoded (documents' texts for records)."""
    for piece in file_pieces(cf, "train", 0.1, text_field=text_field, hasher=hasher):
        if piece.kind == "text":
            yield decode_text(piece.data, Path(piece.path), piece.offset, first=piece.first)
        elif piece.kind == "jsonl":
            yield "\n".join(t for _, t in record_texts(piece, text_field))
        else:
            yield "\n".join(t for _, t in row_texts(piece))


def record_texts(piece: Piece, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each JSON line of a piece; blank lines are skipped."""
    text = decode_text(piece.data, Path(piece.path), piece.offset, first=piece.offset == 0)
    for n, obj in iter_objects(text.split("\n"), piece.path, start=piece.line):
        if text_field not in obj:
            keys = ", ".join(list(obj)[:6])
            raise DataError(f"{piece.path}: line {n} has no field {text_field!r} (fields: {keys}); give --text-field")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{piece.path}: line {n}: field {text_field!r} is {type(value).__name__}, not text")
        yield n, value.replace("\r\n", "\n").replace("\r", "\n")


def row_texts(piece: Piece) -> Iterator[tuple[int, str]]:
    for n, value in enumerate(piece.rows or [], start=piece.line):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{piece.path}: row {n}: the text column holds {type(value).__name__}, not text")
        yield n, value.replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class LineSample:
    lines: list[str]
    seen: int
    """Non-blank lines in the whole corpus."""
    sha256: str
    """Hash of the corpus files' contents (taken while sampling)."""


def sample_lines(
    files: list[CorpusFile], k_max: int, byte_budget: int, seed: int = 0, text_field: str = "text"
) -> LineSample:
    """A seeded uniform sample of the corpus's non-blank lines, in corpus order: reservoir
    sampling (Li's algorithm L, which skips ahead instead of drawing for every line) over every
    file, so a 10 GB corpus trains a tokenizer in bounded memory. The reservoir holds at most
    ``k_max`` lines, fewer (but at least 1,000) when the first lines seen say that ``byte_budget``
    would be exceeded. A corpus with fewer lines than that is taken whole, in order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    k = 0  # fixed from the first lines seen
    seen, next_pick, w = 0, 0, 1.0
    total = hashlib.sha256()
    for cf in files:
        hasher: list = []
        for text in _doc_texts(cf, text_field, hasher):
            lines = [line for line in text.split("\n") if line.strip()]
            if not lines:
                continue
            if not k:
                mean = sum(len(s.encode("utf-8")) for s in lines[:10000]) / min(len(lines), 10000)
                k = min(k_max, max(1000, int(byte_budget / max(mean, 1.0))))
            start, seen = seen, seen + len(lines)
            fill = min(k - len(reservoir), len(lines))
            if fill > 0:  # filling up: every line is taken
                reservoir.extend(enumerate(lines[:fill], start=start))
                if len(reservoir) == k:  # full: from here on, skip ahead to the next replacement
                    w = math.exp(math.log(rng.random()) / k)
                    next_pick = start + fill + int(math.log(rng.random()) / math.log(1 - w))
            if len(reservoir) < k:
                continue
            while next_pick < seen:
                reservoir[rng.randrange(k)] = (next_pick, lines[next_pick - start])
                w *= math.exp(math.log(rng.random()) / k)
                next_pick += 1 + int(math.log(rng.random()) / math.log(1 - w))
        total.update(hasher[0].sha.digest() if hasher else b"")
    reservoir.sort()
    return LineSample([line for _, line in reservoir], seen, total.hexdigest())
