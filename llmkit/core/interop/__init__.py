"""Pretrained models in, llmkit models out: Hugging Face folders and GGUF files.

- ``hf.py``: a Hugging Face model folder (``config.json``, safetensors, possibly sharded) to and
  from llmkit's network and weight names.
- ``gguf_io.py``: GGUF files (llama.cpp's format) through the ``gguf`` package: metadata, tensors
  dequantised, llama.cpp's q/k row permutation undone; and writing them back.
- ``tokenizer_io.py``: the tokenizer of a pretrained model (``tokenizer.json``, ``tokenizer.model``,
  or the vocabulary and merges inside a GGUF) as an llmkit tokenizer contract, and llmkit's own
  tokenizers written back in the formats those tools read.

``import_model`` turns either into an ordinary llmkit checkpoint; ``resolve`` lets every command
take a folder or a ``.gguf`` directly (imported once into the cache, keyed by the source's
content). Nothing here downloads anything: models come from local folders and files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from llmkit.core.config import cache_home
from llmkit.core.errors import CheckpointError

EventFn = Callable[[str, dict[str, Any]], None]


def need(module: str, what: str):
    """Import an optional dependency of interop, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        from llmkit.core.errors import ConfigError

        raise ConfigError(f"{what} needs the Python package {module!r}: pip install 'llmkit[interop]'") from None


def kind_of(path: Path) -> str | None:
    """'gguf' for a .gguf file, 'hf' for a Hugging Face model folder, None for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file() and not (path / "trainer_state.json").is_file():
        return "hf"
    return None


def import_model(src: Path, dest: Path, *, on_event: EventFn = lambda k, d: None) -> Path:
    """Write the pretrained model at ``src`` as an llmkit checkpoint at ``dest``."""
    from llmkit.core.interop import gguf_io, hf

    src = Path(src)
    kind = kind_of(src)
    if kind is None:
        if not src.exists():
            raise CheckpointError(f"model not found: {src}")
        raise CheckpointError(f"{src} is neither a Hugging Face model folder (config.json) nor a .gguf file")
    for module in (("gguf", "tokenizers") if kind == "gguf" else ("tokenizers",)):
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


def base_state(src: Path, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """trainer_state.json of an imported model: step 0, where it came from."""
    return {"step": 0, "tokens_seen": 0, "kind": "lm", "imported_from": str(src), "source_format": kind,
            **(extra or {})}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
