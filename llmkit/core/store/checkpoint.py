"""Checkpoints: one directory, safetensors and JSON/YAML only, written atomically.

Layout (docs/checkpoint-format.md is the specification):
    model.safetensors      weights of the unwrapped module (tied lm_head stored once, as embed)
    config.yaml            the resolved run config; its model section rebuilds the network
    tokenizer.model/.yaml  the tokenizer and its contract
    optimizer.safetensors  AdamW state as tensors, param groups as JSON metadata (training only)
    adapter.safetensors    LoRA runs: the adapter (A, B and any trained head); model.safetensors
                           then holds the frozen base weights, so the directory stands alone
    trainer_state.json     step, tokens, best loss, elapsed time, versions: written last

A classifier's head is part of model.safetensors (``cls_head.*``); ``build_model`` reattaches it
from the checkpoint's task section, and re-applies (then by default merges) a LoRA adapter.

A directory is written as NAME.tmp, every file fsynced, trainer_state.json last, then renamed into
place. A directory without trainer_state.json is never loaded. Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.core.atomic import atomic_write, file_mode, fsync_dir, fsync_file
from llmkit.core.config import LoRAConfig, ModelConfig, TaskConfig, build_section
from llmkit.core.errors import CheckpointError, LlmkitError, check_format
from llmkit.core.model import fast
from llmkit.core.model.heads import attach_classifier
from llmkit.core.model.lora import apply_lora, has_lora, load_adapter, merge_lora, split_state
from llmkit.core.model.transformer import Transformer
from llmkit.core.text.tokenizer import Tokenizer

FORMAT_VERSION = 1
REQUIRED = ("model.safetensors", "config.yaml", "tokenizer.yaml", "trainer_state.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # one of them: SentencePiece or Hugging Face
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"  # zero-padded: lexical order is numeric order


def model_tensors(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(weights, adapter) to save: tied lm_head dropped (it is the embedding), tensors contiguous
    on the CPU. With LoRA, weights are the base under plain names and adapter the trained part.
    ``state`` is the model's full state dict when it was gathered already (sharded models)."""
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    if model is None:  # tensors converted elsewhere (an import): saved as they are
        return state, None
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    if not has_lora(model):
        return state, None
    return split_state(model, state)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = f.get_tensor(key)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except Exception as e:  # a torn, foreign or tampered file: never a traceback, never half-loaded
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        real = path.parent.resolve().name  # last/ is a link to the newest step-NNNNNN/
        named = f" ({real})" if real != path.parent.name else ""
        raise CheckpointError(
            f"{path} cannot be read as optimizer state ({reason}): the checkpoint{named} is damaged; "
            f"resume from an earlier one with --resume {path.parent.parent}/step-NNNNNN"
        ) from None


def save_checkpoint(
    dest: Path,
    *,
    model: torch.nn.Module,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    tensors: tuple[dict, tuple | None] | None = None,
) -> Path:
    """Write a complete checkpoint at ``dest`` atomically (replacing any previous one).

    ``tensors`` = (model state, optimizer (tensors, metadata) or None) when they were gathered
    already (a sharded model); otherwise they are read from ``model`` and ``optimizer``."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        _write_checkpoint(
            tmp, model=model, config=config, tokenizer=tokenizer, state=state, optimizer=optimizer, tensors=tensors
        )
        _swap_into_place(tmp, dest)
    except (OSError, SafetensorError) as e:
        # A full disk, a vanished directory, a permission: the half-written tmp/ goes, and every
        # earlier checkpoint stays as it was (dest/ itself is only ever replaced by a rename).
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        hint = (
            "free some space (or lower train.keep_checkpoints), then --resume auto"
            if full
            else "fix the cause, then --resume auto"
        )
        raise CheckpointError(
            f"cannot write checkpoint {dest}: {reason}; earlier checkpoints are intact; {hint}"
        ) from None
    return dest


def _write_checkpoint(tmp: Path, *, model, config, tokenizer: Tokenizer, state, optimizer, tensors) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights, adapter = model_tensors(model, tensors[0] if tensors else None)
    # The weights name the tokenizer they were trained with: a swapped tokenizer is refused on load.
    meta = {
        "format": "llmkit",
        "version": str(FORMAT_VERSION),
        "llmkit": llmkit.__version__,
        "tokenizer_sha256": tokenizer.contract.get("model_sha256", ""),
    }
    save_file(weights, str(tmp / "model.safetensors"), metadata=meta)
    if adapter is not None:
        save_file(adapter, str(tmp / "adapter.safetensors"), metadata=meta)
    atomic_write(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode())
    tokenizer.save(tmp)
    if optimizer is not None:
        opt_tensors, meta = tensors[1] if tensors and tensors[1] else optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
    mode = file_mode()
    for f in tmp.iterdir():
        os.chmod(f, mode)  # safetensors writes 0600; every file of a checkpoint gets the same mode
        fsync_file(f)
    full_state = {
        "format": FORMAT_VERSION,
        **state,
        "versions": {"llmkit": llmkit.__version__, "torch": torch.__version__},
    }
    atomic_write(tmp / "trainer_state.json", json.dumps(full_state, indent=1).encode())  # last
    fsync_dir(tmp)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)


def publish_link(src: Path, dest: Path) -> Path:
    """Publish an existing checkpoint under another name (last/) as a relative symbolic link to it:
    no copy, and no second name that looks like a second copy. (Hard links did: damaging one file
    damaged "both" checkpoints, while the error said to resume from the other.) The link is made
    beside and renamed over ``dest``, so ``last`` always names a whole checkpoint."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    os.symlink(os.path.relpath(src, dest.parent), tmp)
    if dest.is_dir() and not dest.is_symlink():  # a run written before last/ became a link
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return dest


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "trainer_state.json").is_file()


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if Path(run_dir).is_dir():
        for p in Path(run_dir).iterdir():
            m = STEP_DIR.match(p.name)
            if m and is_checkpoint(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/trainer_state.json is unreadable: {e}") from None


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: last/ or the highest step directory."""
    candidates = [p for _, p in step_dirs(run_dir)]
    last = Path(run_dir) / "last"
    if is_checkpoint(last):
        candidates.append(last)
    if not candidates:
        return None
    return max(candidates, key=lambda p: read_state(p).get("step", 0))


def _missing(path: Path) -> list[str]:
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        missing.insert(2, "tokenizer.model (or tokenizer.json)")
    return missing


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory or a run directory (its best/, else its newest checkpoint).
    A pretrained model (Hugging Face folder, .gguf) is the interop layer's: ``interop.resolve``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {path} is a file (nor a .gguf model)")
    if is_checkpoint(path):
        missing = _missing(path)
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
        return path
    if is_checkpoint(path / "best"):
        return resolve_checkpoint(path / "best")
    latest = find_latest(path)
    if latest is not None:
        return resolve_checkpoint(latest)
    present = {p.name for p in path.iterdir()}
    if "tokenizer.yaml" in present and present & set(TOKENIZER_FILES) and "model.safetensors" not in present:
        raise CheckpointError(f"{path} is a tokenizer, not a checkpoint: give a run or checkpoint directory")
    missing = _missing(path)
    if present & {*REQUIRED, *TOKENIZER_FILES}:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    raise CheckpointError(f"{path} is not a checkpoint or run directory (no trainer_state.json, best/ or last/)")


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    state: dict[str, Any]
    task: TaskConfig
    lora: LoRAConfig

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def has_adapter(self) -> bool:
        return self.lora.enabled and (self.path / "adapter.safetensors").is_file()


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint's metadata and tokenizer (not its weights)."""
    path = resolve_checkpoint(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text("utf-8")) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}/config.yaml is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path}/config.yaml has no model section")
    try:
        model_cfg = build_section(ModelConfig, config["model"], "model")
        task = build_section(TaskConfig, config.get("task") or {}, "task")
        lora = build_section(LoRAConfig, config.get("lora") or {}, "lora")
        tokenizer = Tokenizer.load(path)
    except LlmkitError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    if task.kind == "classify" and len(task.labels) < 2:
        raise CheckpointError(f"checkpoint {path}: a classifier needs task.labels (found {list(task.labels)})")
    state = read_state(path)
    check_format(
        state.get("format", 1),
        FORMAT_VERSION,
        f"{path}/trainer_state.json",
        (state.get("versions") or {}).get("llmkit"),
    )
    meta = weights_metadata(path / "model.safetensors")
    check_format(meta.get("version", 1), FORMAT_VERSION, f"{path}/model.safetensors", meta.get("llmkit"))
    trained_with = meta.get("tokenizer_sha256")
    if trained_with and trained_with != tokenizer.contract.get("model_sha256"):
        raise CheckpointError(
            f"{path}: tokenizer.model is not the tokenizer these weights were trained with "
            f"(model.safetensors records {trained_with[:12]}…, the folder holds "
            f"{str(tokenizer.contract.get('model_sha256'))[:12]}…): restore the checkpoint's own "
            "tokenizer.model and tokenizer.yaml"
        )
    return Checkpoint(path, config, model_cfg, tokenizer, state, task, lora)


def weights_metadata(file: Path) -> dict[str, str]:
    """The metadata header of a safetensors file (read without loading any tensor)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{file} cannot be read: {str(e).splitlines()[0] if str(e) else e}") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} cannot be read: {e}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = _read_tensors(Path(path) / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.yaml (an edited config, a foreign file)
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(
            f"{path}/model.safetensors does not fit {path}/config.yaml ({first.rstrip('.')}): "
            "was config.yaml edited? Restore it, or use the checkpoint it belongs to"
        ) from None
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}/model.safetensors does not fit its config (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )


def build_model(
    ckpt: Checkpoint, device: torch.device | str = "cpu", *, merge: bool = True, model_cfg: ModelConfig | None = None
) -> Transformer:
    """The network of a checkpoint with its weights: trunk, task head, LoRA adapter.

    ``merge`` folds a LoRA adapter into plain weights (inference); without it the LoRA modules stay
    in place, as training (and resuming) needs them. ``model_cfg`` may change what holds no
    weights (the context, dropout): fine-tuning on longer examples than the base saw.
    """
    cfg = model_cfg or ckpt.model_cfg
    with fast.building():
        model = Transformer(cfg)  # no init: the weights come next
        if ckpt.kind == "classify":
            attach_classifier(model, len(ckpt.task.labels))
    model = model.to(device)
    load_weights(model, ckpt.path)
    if ckpt.model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if ckpt.has_adapter:
        apply_lora(
            model, rank=ckpt.lora.rank, alpha=ckpt.lora.alpha, dropout=ckpt.lora.dropout, targets=ckpt.lora.targets
        )
        try:
            load_adapter(model, {k: v.to(device) for k, v in _read_tensors(ckpt.path / "adapter.safetensors").items()})
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}/adapter.safetensors: {e}") from None
        if merge:
            merge_lora(model)
    return model


def find_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer in a tokenizer directory, a run directory's tokenizer/ or any checkpoint."""
    path = Path(path)
    found = Tokenizer.find_in(path)
    if found is not None:
        return found
    if path.exists() and path.is_dir() and not any((path / n).exists() for n in ("trainer_state.json", "best", "last")):
        raise CheckpointError(f"{path} holds no tokenizer (tokenizer.model and tokenizer.yaml), run or checkpoint")
    return read_checkpoint(path).tokenizer


def load_model(source: Path | Checkpoint, device: torch.device | str = "cpu") -> tuple[Transformer, Checkpoint]:
    """Rebuild the network from a checkpoint alone (a path, or one already read), ready for
    inference (LoRA merged)."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    model = build_model(ckpt, device)
    model.eval()
    return model, ckpt
