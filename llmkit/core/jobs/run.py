"""The run driver shared by pretraining and fine-tuning: from a built model and task to a
finished run directory (``train_run``), and the process set-up around it (torchrun rank, device,
threads, epochs as steps).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.core import events
from llmkit.core.atomic import atomic_write
from llmkit.core.config import ModelConfig, RunConfig
from llmkit.core.errors import CheckpointError, ConfigError, TrainingDiverged
from llmkit.core.events import EventFn
from llmkit.core.host.device import pick_device, set_threads
from llmkit.core.jobs.pictures import loss_curve
from llmkit.core.jobs.report import write_report
from llmkit.core.model import fast
from llmkit.core.model.lora import trainable_parameters
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.metrics_log import MetricsLog
from llmkit.core.store.rundir import Checkpointer, load_training_state, outcome
from llmkit.core.training import memory, speed
from llmkit.core.training.distributed import Dist, shard
from llmkit.core.training.loop import Task, Trainer, TrainState
from llmkit.core.training.optim import make_optimizer


@dataclass
class RunResult:
    """How a pretraining or fine-tuning run ended, and what it left in its directory."""

    out: Path
    stop_reason: str
    state: TrainState
    params: int
    trainable: int
    precision: str
    best: Path | None
    last: Path | None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    """The validation metrics of the evaluation that made best/ (this session's)."""
    samples: list[tuple[str, str]] = field(default_factory=list)
    merged: Path | None = None


def check_launch(cfg: RunConfig) -> None:
    """Refuse, before any work and on every rank, what the launch makes impossible: a global batch
    the processes cannot share evenly, a device this machine does not have."""
    cfg.train.accumulation(int(os.environ.get("WORLD_SIZE", "1")))
    pick_device(cfg.train.device)


def start_process(cfg: RunConfig) -> tuple[Dist, torch.device, tuple[int, str]]:
    """This process's place in a torchrun job (or a world of one), its device, and its CPU threads
    with the reason for their number."""
    dist = Dist.from_env(cfg.train.device)
    device = dist.device(pick_device(cfg.train.device))
    # Several processes on one CPU share its cores: each keeps torch's choice (or the user's).
    threads = set_threads(cfg.train.threads) if not dist.enabled else (torch.get_num_threads(), "torchrun")
    return dist, device, threads


def with_epoch_budget(cfg: RunConfig, sequences_per_epoch: float, world: int) -> RunConfig:
    """train.epochs as a step budget: epochs x sequences per epoch / global batch, rounded up
    (the smaller of that and train.steps when both are given)."""
    if not cfg.train.epochs:
        return cfg
    epochs = epoch_steps(cfg, sequences_per_epoch, world)
    return cfg.replace("train", steps=min(s for s in (cfg.train.steps, epochs) if s))


def epoch_steps(cfg: RunConfig, sequences_per_epoch: float, world: int) -> int:
    """The steps ``train.epochs`` make (0 without an epoch budget): what the stop line names."""
    if not cfg.train.epochs:
        return 0
    return math.ceil(cfg.train.epochs * sequences_per_epoch / cfg.train.global_batch(world))


def train_run(
    out: Path,
    cfg: RunConfig,
    *,
    model: torch.nn.Module,
    task: Task,
    tokenizer,
    dist: Dist,
    device: torch.device,
    resume_from: Path | None,
    kind: str,
    on_event: EventFn,
    val_tokens: int = 0,
    val_bytes: int = 0,
    extra: dict[str, Any] | None = None,
    threads: tuple[int, str] = (0, ""),
    reports: dict[str, Any] | None = None,
) -> RunResult:
    """Train a built model on a task in ``out``, fresh or resumed, to a finished run directory.

    Everything that is the same for pretraining and fine-tuning happens here: the optimizer and
    trainer state (resumed when asked), config.yaml, metrics.jsonl (with perplexity and bits per
    byte when ``val_tokens``/``val_bytes`` are known), the checkpointer, ``Trainer.fit``, the loss
    curve, and a diverged run turned into one clear error. ``extra`` goes into the ``model`` event
    and every checkpoint's trainer state.
    """
    extra = extra or {}
    fast.for_training(model)
    recompute, why = memory.plan_recompute(cfg.train.recompute, cfg.model, task.batch_tokens(cfg.train.batch_size),
                                           device)  # fmt: skip
    if recompute:
        fast.recompute(model)
    extra = {**extra, "recompute": recompute, "recompute_reason": why}
    resumed = ckpt_io.read_state(resume_from) if resume_from is not None else None
    probe = speed.InPlace(model, task, device, kind) if not dist.enabled and resumed is None else None
    precision, compiled = speed.plan(cfg, device, distributed=dist.enabled, resumed=resumed, probe=probe)
    params = model.num_params()
    trainable = trainable_parameters(model)
    optimizer, state = start_training(model, cfg, dist, resume_from, on_event)
    on_event(
        events.Model(
            params=params, trainable=trainable, device=str(device), precision=precision.name,
            precision_reason=precision.reason, compiled=compiled, config=cfg.model, task=kind, processes=dist.world,
            strategy=cfg.train.strategy if dist.enabled else None, threads=threads[0], threads_reason=threads[1],
            extra=extra,
        )
    )  # fmt: skip
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", cfg.to_yaml())
        if reports:  # the data (and tokenizer) reports, for report.html
            atomic_write(out / "reports.json", json.dumps(reports, ensure_ascii=False, indent=1, default=str))
    metrics = MetricsLog(out / "metrics.jsonl", val_tokens, val_bytes)
    state_extra = {"seed": cfg.train.seed, "kind": kind, "precision": precision.name, "compiled": compiled,
                   "device": str(device), "params": params, "trainable": trainable, **extra}  # fmt: skip
    save = Checkpointer(out, model=model, config=cfg.to_dict(), tokenizer=tokenizer, optimizer=optimizer,
                        extra_state=state_extra, keep=cfg.train.keep_checkpoints, on_event=on_event,
                        dist=dist)  # fmt: skip
    relay = Relay(out, metrics, on_event, main=dist.is_main, reports=cfg.train.report)
    trainer = Trainer(model, task, optimizer, state, cfg.optim, cfg.train, device, precision,
                      tokens_per_step=cfg.train.global_batch(dist.world) * cfg.model.context, save=save,
                      on_event=relay, compiled=torch.compile(model) if compiled else None,
                      metric=cfg.task.best_metric, dist=dist)  # fmt: skip
    reason = trainer.fit()
    dist.close()
    best, last = outcome(out)
    result = RunResult(out, reason, state, params, trainable, precision.name, best, last, relay.best_metrics)
    if not dist.is_main:
        return result
    title = f"{out.name}: loss" + (f" ({kind})" if kind != "lm" else "")
    unit = "loss (nats/example)" if kind == "classify" else "loss (nats/token)"
    try:  # matplotlib is an extra: without it a run has no picture, nothing else is missing
        loss_curve(out / "loss.svg", metrics.train, metrics.val, title, unit)
    except ConfigError as e:
        on_event(events.ReportFailed(error=str(e)))
    relay.report(final=True)
    if reason == "diverged":
        raise TrainingDiverged(
            f"training diverged at step {state.step} (loss is NaN or infinite); "
            f"last good checkpoint: {last or best or 'none'}; lower optim.lr or raise "
            "optim.warmup_steps"
        )
    return result


class Relay:
    """The loop's events on their way out: evaluations get language modelling's perplexity and bits
    per byte, every event goes to metrics.jsonl (written by rank 0) and the caller's listener, and
    report.html is refreshed at evaluations. Keeps the metrics of the evaluation that made best/."""

    def __init__(self, out: Path, metrics: MetricsLog, on_event: EventFn, *, main: bool, reports: bool):
        self.out, self.metrics, self.on_event, self.main = out, metrics, on_event, main
        self.reports = reports and main
        self.best_metrics: dict[str, Any] = {}
        self.at, self.cost = time.monotonic(), 0.0

    def report(self, final: bool = False) -> None:
        """Refresh report.html while training, at most every 30 s and so that drawing it takes
        under 2% of the run (a page costs ~0.7 s of matplotlib here); a page never stops a run."""
        wait = max(30.0, 50 * self.cost)
        if not self.reports or (not final and time.monotonic() - self.at < wait):
            return
        start = time.monotonic()
        try:
            write_report(self.out)
        except Exception as e:  # noqa: BLE001 - a picture library's failure is not the run's
            self.on_event(events.ReportFailed(error=f"{type(e).__name__}: {e}"))
        self.at, self.cost = time.monotonic(), time.monotonic() - start

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Eval):
            event = self.metrics.enrich(event)
        if self.main:
            self.metrics(event)
        if isinstance(event, events.Eval) and event.improved:
            self.best_metrics = {k: v for k, v in event.as_dict().items() if k != "event"}
        self.on_event(event)
        if isinstance(event, events.Eval):
            self.report()


def check_same_model(resume_from: Path, saved: ModelConfig, wanted: ModelConfig) -> None:
    if saved != wanted:
        diff = [
            f"model.{k} {getattr(wanted, k)!r} (checkpoint: {getattr(saved, k)!r})"
            for k in wanted.__dataclass_fields__
            if getattr(wanted, k) != getattr(saved, k)
        ]
        raise CheckpointError(f"cannot resume {resume_from}: the config changes the model: {', '.join(diff)}")


def start_training(
    model: torch.nn.Module, cfg, dist: Dist, resume_from: Path | None, on_event: EventFn
) -> tuple[torch.optim.Optimizer, TrainState]:
    """Shard the model if asked, then its optimizer and trainer state (fresh, or resumed)."""
    parallelize(model, cfg.train.strategy, dist)
    optimizer = make_optimizer(model, cfg.optim)
    state = TrainState()
    if resume_from is not None:
        state = load_training_state(model, optimizer, resume_from)
        on_event(events.Resume(path=str(resume_from), step=state.step, budget=cfg.train.budget_text()))
    return optimizer, state


def parallelize(model: torch.nn.Module, strategy: str, dist: Dist) -> torch.nn.Module:
    """Under torchrun with ``--strategy fsdp``, shard the model in place (DDP wraps it inside
    ``fit`` instead: its weights stay whole, so nothing changes here)."""
    if dist.enabled and strategy == "fsdp":
        shard(model)
    return model


def main_only(on_event: EventFn, dist: Dist) -> EventFn:
    """Events reach the listener (progress, logs, metrics.jsonl) from rank 0 only."""
    return on_event if dist.is_main else events.ignore


def main_first(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Rank 0 runs ``fn`` (e.g. building a token cache) while the others wait, then they run it
    (reading what rank 0 left)."""
    result = fn() if dist.is_main else None
    dist.barrier()
    return result if dist.is_main else fn()
