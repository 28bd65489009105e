"""Finding and reading corpus files: paths, directories and globs in; validated UTF-8 text out.

Every way a corpus can be wrong (missing, unreadable, binary, not UTF-8, empty) is reported here
as a DataError naming the file, so the rest of the library only ever sees clean text.
"""

from __future__ import annotations

import glob
import hashlib
from importlib import resources
from pathlib import Path

from llmkit.core.errors import DataError

# Inside a directory, only files that look like text are taken (a MANIFEST.tsv or a stray PDF
# beside the novels is not a corpus).
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def sample_corpus() -> list[Path]:
    """The small French sample shipped inside the package (original prose written for llmkit)."""
    root = Path(str(resources.files("llmkit.sample")))
    return sorted(p for p in root.iterdir() if p.suffix == ".txt")


def resolve_corpus(specs: list[str] | tuple[str, ...]) -> list[Path]:
    """Expand files, directories (recursively, text files only) and globs into a sorted file list."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"no files match {spec!r}")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in directory {spec}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"not a regular file: {spec}")
        else:
            raise DataError(f"corpus not found: {spec}")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise DataError("no corpus files given")
    return unique


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def decode_text(data: bytes, path: Path) -> str:
    """Validate and decode one file: no NUL bytes, strict UTF-8, newlines normalised to \\n."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at byte offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {e.start} (convert it, e.g. with iconv)") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path) -> str:
    return decode_text(read_bytes(path), path)


def read_corpus(files: list[Path]) -> list[str]:
    """Read every file as one document; fail when the whole corpus holds no text."""
    docs = [read_text(p) for p in files]
    if not any(d.strip() for d in docs):
        names = ", ".join(str(p) for p in files[:3]) + (" …" if len(files) > 3 else "")
        raise DataError(f"corpus is empty: {names}")
    return docs


def corpus_hash(files: list[Path]) -> str:
    """A hash of the corpus content (and order), independent of where the files live."""
    h = hashlib.sha256()
    for p in files:
        h.update(hashlib.sha256(read_bytes(p)).digest())
    return h.hexdigest()
