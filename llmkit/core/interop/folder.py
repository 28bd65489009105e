"""A model folder made by a stranger: its files, and never anything outside it.

Every file an import reads from a Hugging Face folder (config.json, the weights and their index,
the tokenizer files, the chat template) is named through ``member``: a name that climbs out of the
folder (``../x``, an absolute path) or a symbolic link that resolves outside it is refused in one
line, so ``ln -s /etc/passwd hf/chat_template.jinja`` cannot copy a private file into a checkpoint
and from there into an export. Links inside the folder (how the Hugging Face cache lays out its
snapshots: ``snapshots/REV/config.json`` links to ``../../blobs/SHA``) stay allowed: inside such a
snapshot, the repository's cache folder is the boundary.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.core.errors import CheckpointError

SIZE_LIMITS = {".json": 256 << 20, ".jinja": 1 << 20, ".model": 256 << 20}
"""The largest metadata file read whole (config.json, tokenizer.json, a chat template, a
SentencePiece model): a sparse 30 GB config.json must not be read into memory. Weights are
memory-mapped, never read whole, and have no such limit."""


def member(folder: Path, name: str, *, root: Path | None = None) -> Path | None:
    """``folder/name`` when it is a regular file inside ``folder`` (or ``root``), None when absent;
    refused when the name or a link leads outside, or when a file read whole is too large."""
    folder = Path(folder)
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder}: {name!r} points outside the model folder: refused")
    if not path.exists() and not path.is_symlink():
        return None
    if root is None:
        root = folder.parent.parent if folder.parent.name == "snapshots" else folder  # a Hugging Face cache
    allowed = Path(root).resolve()
    real = path.resolve()
    if not real.is_relative_to(allowed):
        raise CheckpointError(f"{path} is a link to {real}, outside the model folder: refused")
    if not real.is_file():
        return None
    limit = SIZE_LIMITS.get(real.suffix.lower() if real.suffix else Path(name).suffix.lower())
    if limit is not None and real.stat().st_size > limit:
        raise CheckpointError(f"{path} is {real.stat().st_size} bytes, over the {limit >> 20} MiB read for such a file")
    return path
