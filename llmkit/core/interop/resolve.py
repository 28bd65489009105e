"""Any path a user names, as an llmkit checkpoint: checkpoint and run directories as they are,
pretrained models (a Hugging Face folder, a ``.gguf`` file) imported once into the cache.

Commands call ``open_checkpoint``, ``open_model`` and ``open_tokenizer``; the store's own
``read_checkpoint`` and ``load_model`` take llmkit checkpoints only.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path

from llmkit.core import events
from llmkit.core.config import cache_home
from llmkit.core.errors import CheckpointError, ConfigError
from llmkit.core.events import EventFn
from llmkit.core.interop import gguf_io, hf
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
    """Write the pretrained model at ``src`` as an llmkit checkpoint at ``dest``."""
    src = Path(src)
    kind = kind_of(src)
    if kind is None:
        if not src.exists():
            raise CheckpointError(f"model not found: {src}")
        raise CheckpointError(f"{src} is neither a Hugging Face model folder (config.json) nor a .gguf file")
    for module in ("gguf", "tokenizers") if kind == "gguf" else ("tokenizers",):
        need(module, f"importing {src}")
    reader = gguf_io if kind == "gguf" else hf
    return reader.import_to(src, dest, on_event=on_event)


def _fingerprint(src: Path) -> str:
    """Names, sizes and modification times of the source's files: cheap, and changes with them."""
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(src.parent)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    return cache_home() / "imported"


def resolve(src: Path) -> Path:
    """A pretrained model given where a checkpoint is expected: its llmkit checkpoint, imported
    into the cache the first time (and again when the source's files change)."""
    src = Path(src).resolve()
    dest = cache_root() / f"{src.stem}-{_fingerprint(src)}"
    if (dest / "trainer_state.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import_model(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_any(path: Path) -> Path:
    """A checkpoint, a run directory or a pretrained model, as an llmkit checkpoint directory."""
    path = Path(path)
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
    return open_checkpoint(path).tokenizer if kind_of(path) else ckpt_io.find_tokenizer(path)
