"""The run directory shared by pretraining and fine-tuning (docs/checkpoint-format.md):

    runs/NAME/config.yaml, metrics.jsonl, loss.svg, step-NNNNNN/, best/, last/ (+ merged/)

This module owns how a run is written into its directory during training (best by the run's
metric, periodic step checkpoints published as last/, pruning), and where a run resumes from.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmkit.core import events
from llmkit.core.errors import CheckpointError, ConfigError
from llmkit.core.events import EventFn
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.training.distributed import Dist, gather_for_save, is_sharded, load_sharded_optimizer
from llmkit.core.training.loop import TrainState


@contextlib.contextmanager
def new_run_dir(out: Path, dist: Dist) -> Iterator[None]:
    """A run that fails while it is being set up leaves no half-made directory behind (an
    existing one, being resumed, is never removed)."""
    check_out_dir(out)
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")


def resume_source(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` (the newest in out), a path, or None for a new run
    (refused when out already holds one, so a run is never overwritten by accident)."""
    check_out_dir(out)
    if resume == "auto":
        return ckpt_io.find_latest(out)
    if resume:
        return ckpt_io.resolve_checkpoint(Path(resume))
    latest = ckpt_io.find_latest(out)
    if latest is not None:
        raise ConfigError(
            f"{out} already holds a run (checkpoint at step {ckpt_io.read_state(latest).get('step')}); "
            f"pass --resume auto to continue it, or choose another --out"
        )
    return None


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, resume_from: Path) -> TrainState:
    """Optimizer state and trainer state of a checkpoint (its weights are loaded by the caller).
    The file is the same whether the run that wrote it, or this one, is sharded."""
    if not (resume_from / "optimizer.safetensors").is_file():
        raise CheckpointError(f"cannot resume from {resume_from}: it has no optimizer.safetensors")
    if is_sharded(model):
        load_sharded_optimizer(model, optimizer, resume_from / "optimizer.safetensors")
    else:
        ckpt_io.load_optimizer_state(optimizer, resume_from / "optimizer.safetensors")
    return TrainState.from_json(ckpt_io.read_state(resume_from))


class Checkpointer:
    """The ``save`` callback of ``fit``: best/ by the run's metric; step-NNNNNN/ with optimizer
    state, published as last/; old step directories pruned to ``keep``.

    Called on every process: a sharded (FSDP) model is gathered by all of them, then rank 0 alone
    writes the ordinary single-file checkpoint.
    """

    def __init__(
        self,
        out: Path,
        *,
        model: torch.nn.Module,
        config: dict[str, Any],
        tokenizer,
        optimizer: torch.optim.Optimizer,
        extra_state: dict[str, Any],
        keep: int,
        on_event: EventFn,
        dist: Dist | None = None,
    ):
        self.out, self.model, self.config, self.tok = out, model, config, tokenizer
        self.optimizer, self.extra, self.keep, self.on_event = optimizer, extra_state, keep, on_event
        self.dist = dist or Dist()

    def __call__(self, kind: str, state: TrainState) -> Path | None:
        if kind == "interrupt":
            if is_sharded(self.model):
                # Gathering needs every rank at the same point, which an interrupt does not
                # promise: the last periodic checkpoint stands.
                return None
            kind = "step"
        with_optimizer = kind != "best"
        tensors = gather_for_save(self.model, self.optimizer if with_optimizer else None)  # collective if sharded
        path = self.out / ("best" if kind == "best" else ckpt_io.step_dir_name(state.step))
        if not self.dist.is_main:
            return path
        payload = {**state.to_json(), **self.extra, "processes": self.dist.world}
        ckpt_io.save_checkpoint(
            path,
            model=self.model,
            config=self.config,
            tokenizer=self.tok,
            state=payload,
            optimizer=self.optimizer if with_optimizer else None,
            tensors=tensors,
        )
        if kind != "best":
            ckpt_io.publish_link(path, self.out / "last")
            prune(self.out, self.keep)
        self.on_event(events.Save(what=kind, path=str(path), step=state.step))
        return path


def prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in ckpt_io.step_dirs(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def outcome(out: Path) -> tuple[Path | None, Path | None]:
    """(best/, last/) of a run, each None when absent."""
    best = out / "best" if ckpt_io.is_checkpoint(out / "best") else None
    last = out / "last" if ckpt_io.is_checkpoint(out / "last") else None
    return best, last
