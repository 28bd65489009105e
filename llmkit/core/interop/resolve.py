"""Any path a user names, as an llmkit checkpoint: checkpoint and run directories as they are,
pretrained models (a Hugging Face folder, a ``.gguf`` file) imported once into the cache.

Commands call ``open_checkpoint``, ``open_model`` and ``open_tokenizer``; the store's own
``read_checkpoint`` and ``load_model`` take llmkit checkpoints only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmkit.core import events
from llmkit.core.atomic import atomic_write
from llmkit.core.config import cache_home
from llmkit.core.errors import CheckpointError, ConfigError
from llmkit.core.events import EventFn
from llmkit.core.interop import gguf_io, hf
from llmkit.core.interop.packages import is_package_name, locate
from llmkit.core.store import checkpoint as ckpt_io


def need(module: str, what: str):
    """Import an optional dependency of interop, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the Python package {module!r}: pip install 'llmkit[interop]'") from None


def kind_of(path: Path) -> str | None:
    """'gguf' for a .gguf file, 'hf' for a Hugging Face model folder, None for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file() and not (path / "trainer_state.json").is_file():
        return "hf"
    return None


def import_model(src: Path, dest: Path, *, on_event: EventFn = events.ignore) -> Path:
    """Write the pretrained model at ``src`` (a path, or a model package's short name) as an llmkit
    checkpoint at ``dest``."""
    src = locate(str(src)) if is_package_name(Path(src)) else Path(src)
    kind = kind_of(src)
    if kind is None:
        if not src.exists():
            raise CheckpointError(f"model not found: {src}")
        raise CheckpointError(f"{src} is neither a Hugging Face model folder (config.json) nor a .gguf file")
    for module in ("gguf", "tokenizers") if kind == "gguf" else ("tokenizers",):
        need(module, f"importing {src}")
    reader = gguf_io if kind == "gguf" else hf
    return reader.import_to(src, dest, on_event=on_event)


def _files(src: Path) -> list[Path]:
    """The files a source is made of: itself, or every regular file under a folder, in order."""
    return [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())


def _stat_key(src: Path) -> str:
    """Where the files are and what the filesystem says of them: path, size, modification and
    change times, inode. The change time (ctime) cannot be set back by a user: a file replaced,
    even by one of the same size and modification time, gets a new one."""
    h = hashlib.sha256()
    for p in _files(src):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}\n".encode())
    return h.hexdigest()


def content_key(src: Path) -> str:
    """SHA-256 of what a source holds (each file's bytes, with its name inside a folder)."""
    h = hashlib.sha256()
    for p in _files(src):
        file_hash = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(block)
        h.update(f"{p.relative_to(src) if src.is_dir() else ''}:{file_hash.hexdigest()}\n".encode())
    return h.hexdigest()


def cache_root() -> Path:
    return cache_home() / "imported"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time: a second first use of the same model waits for the first import
    (an advisory lock, released by the kernel if its holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve(src: Path) -> Path:
    """A pretrained model given where a checkpoint is expected: its llmkit checkpoint, imported
    into the cache the first time.

    The cache is keyed by content (``content_key``): two files of the same name, size and time are
    two entries, and the same file under two names is one. Hashing a file costs about a second per
    gigabyte, so the key is remembered against the files' stat (``_stat_key``) and read back while
    those are unchanged."""
    src = Path(src).resolve()
    root = cache_root()
    known = root / "keys" / _stat_key(src)
    key = known.read_text().strip() if known.is_file() else ""
    dest = root / f"{src.stem}-{key[:20]}"
    if key and (dest / "trainer_state.json").is_file():
        os.utime(dest)  # last used: what cleaning keeps
        return dest
    with _locked(root / ".lock"):
        key = content_key(src)
        dest = root / f"{src.stem}-{key[:20]}"
        if not (dest / "trainer_state.json").is_file():  # another process may have imported it meanwhile
            if kind_of(src) == "gguf":
                gguf_io.check_header(src)  # a damaged or crafted file is refused before it is announced
            size = sum(p.stat().st_size for p in _files(src))
            events.notify(events.Importing(source=str(src), into=str(dest), size=size))
            tmp = dest.with_name(f"{dest.name}.importing{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                import_model(src, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            bound = os.environ.get("LLMKIT_CACHE_MAX")
            if bound:  # the cache's size is bounded: the least recently used entries go first
                clean_cache(keep_bytes=parse_size(bound), spare=dest)
        known.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(known, key)
    return dest


def _bytes_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_entries() -> list[dict]:
    """The imported models in the cache, most recently used first: name, path, source, bytes."""
    root = cache_root()
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.is_dir() and (entry / "trainer_state.json").is_file():
            state = ckpt_io.read_state(entry)
            found.append({"name": entry.name, "path": str(entry), "source": state.get("imported_from", "?"),
                          "bytes": _bytes_of(entry), "used": entry.stat().st_mtime})  # fmt: skip
    return sorted(found, key=lambda e: -e["used"])


def clean_cache(*, keep_bytes: int = 0, spare: Path | None = None) -> list[dict]:
    """Remove imported models, least recently used first, until the cache holds at most
    ``keep_bytes`` (0: all of them); ``spare`` is never removed. The removed entries."""
    entries = cache_entries()
    total, removed = sum(e["bytes"] for e in entries), []
    for e in reversed(entries):  # the least recently used first
        if total <= keep_bytes:
            break
        if spare is not None and Path(e["path"]) == Path(spare):
            continue
        shutil.rmtree(e["path"], ignore_errors=True)
        total -= e["bytes"]
        removed.append(e)
    return removed


def parse_size(text: str) -> int:
    """'5G', '500M', '1.5GB', '123' (bytes) as bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"{text!r} is not a size (e.g. 5G, 500M)") from None
    if value < 0:
        raise ConfigError(f"{text!r} is not a size (e.g. 5G, 500M)")
    return int(value * units[unit])


def resolve_any(path: Path) -> Path:
    """A checkpoint, a run directory, a pretrained model or a model package's short name
    (``smollm2``: see ``packages.MODELS``), as an llmkit checkpoint directory."""
    path = locate(str(path)) if is_package_name(Path(path)) else Path(path)
    return resolve(path) if kind_of(path) else ckpt_io.resolve_checkpoint(path)


def open_checkpoint(path: Path) -> ckpt_io.Checkpoint:
    """``store.checkpoint.read_checkpoint`` of anything a user can name (see ``resolve_any``)."""
    return ckpt_io.read_checkpoint(resolve_any(path))


def open_model(source: Path | ckpt_io.Checkpoint, device="cpu"):
    """``store.checkpoint.load_model`` of anything a user can name (see ``resolve_any``)."""
    return ckpt_io.load_model(source if isinstance(source, ckpt_io.Checkpoint) else open_checkpoint(source), device)


def open_tokenizer(path: Path):
    """The tokenizer of a tokenizer directory, a run, a checkpoint or a pretrained model."""
    path = Path(path)
    pretrained = kind_of(path) or is_package_name(path)
    return open_checkpoint(path).tokenizer if pretrained else ckpt_io.find_tokenizer(path)
