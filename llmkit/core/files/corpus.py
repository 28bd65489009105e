"""Finding corpus files and knowing what each one is: paths, directories and globs in; a sorted
list of files, each with its format (plain text, JSON lines, parquet) and compression, out.

Reading small files whole (prompts, task data, the bundled sample) lives here too: every way a
file can be wrong (missing, unreadable, binary, not UTF-8, empty) is one DataError naming it.
Streaming big files belongs to ``stream.py``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmkit.core.errors import DataError

# Inside a directory, only files that look like corpus files are taken (a MANIFEST.tsv or a stray
# PDF beside the novels is not a corpus). A file named explicitly is read as text whatever its name.
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
RECORD_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
FORMATS = ("text", "jsonl", "parquet")


@dataclass(frozen=True)
class CorpusFile:
    """One input file: where it is, how its documents are laid out, and how it is compressed.

    text: the whole file is one document. jsonl: one document per line (a field of an object).
    parquet: one document per row (a column)."""

    path: Path
    format: str
    compression: str | None = None


def describe(path: Path) -> CorpusFile | None:
    """The format of a file by its name (``.jsonl.gz`` is gzip-compressed JSON lines), or None
    when the name is not one of a corpus file."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) == 2 else (None if compression else (suffixes or [None])[-1])
    if inner in RECORD_SUFFIXES:
        if inner == ".parquet" and compression:
            raise DataError(
                f"{path}: a parquet file compresses itself; give the .parquet file, not a {compression} of it"
            )
        return CorpusFile(path, RECORD_SUFFIXES[inner], compression)
    if inner in TEXT_SUFFIXES:
        return CorpusFile(path, "text", compression)
    return None


def sample_corpus() -> list[Path]:
    """The small French sample shipped inside the package (original prose written for llmkit)."""
    root = Path(str(resources.files("llmkit.sample")))
    return sorted(p for p in root.iterdir() if p.suffix == ".txt")


def resolve_files(specs: list[str] | tuple[str, ...]) -> list[CorpusFile]:
    """Expand files, directories (recursively, corpus files only) and globs into a sorted list."""
    found: list[CorpusFile] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"no files match {spec!r}")
            found.extend(describe(m) or CorpusFile(m, "text") for m in matches)
        elif path.is_dir():
            inside = [d for d in (describe(p) for p in sorted(path.rglob("*")) if p.is_file()) if d]
            if not inside:
                kinds = ", ".join(sorted(TEXT_SUFFIXES | set(RECORD_SUFFIXES)))
                raise DataError(f"no corpus files ({kinds}, optionally .gz/.zst) in directory {spec}")
            found.extend(inside)
        elif path.is_file():
            found.append(describe(path) or CorpusFile(path, "text"))
        elif path.exists():
            raise DataError(f"not a regular file: {spec}")
        else:
            raise DataError(f"corpus not found: {spec}")
    unique = list({f.path.resolve(): CorpusFile(f.path.resolve(), f.format, f.compression) for f in found}.values())
    if not unique:
        raise DataError("no corpus files given")
    return unique


def resolve_corpus(specs: list[str] | tuple[str, ...]) -> list[Path]:
    """The paths of :func:`resolve_files` (for callers that read plain text)."""
    return [f.path for f in resolve_files(specs)]


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def decode_text(data: bytes, path: Path, offset: int = 0, *, first: bool = True) -> str:
    """Validate and decode text: no NUL bytes, strict UTF-8, newlines normalised to \\n, a leading
    byte-order mark dropped (``first``: this is the start of the file). ``offset`` is where
    ``data`` starts in the file, so errors name the byte in the file itself."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at byte offset {offset + nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {offset + e.start} (convert it, e.g. with iconv)"
        ) from None
    if first and text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path) -> str:
    return decode_text(read_bytes(path), path)


def read_corpus(files: list[Path]) -> list[str]:
    """Read every file as one document; fail when the whole corpus holds no text (small corpora:
    the streaming path in ``stream.py`` serves big ones)."""
    docs = [read_text(p) for p in files]
    if not any(d.strip() for d in docs):
        names = ", ".join(str(p) for p in files[:3]) + (" …" if len(files) > 3 else "")
        raise DataError(f"corpus is empty: {names}")
    return docs
