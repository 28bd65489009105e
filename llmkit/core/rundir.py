"""The run directory shared by pretraining and fine-tuning (docs/checkpoint-format.md):

    runs/NAME/config.yaml, metrics.jsonl, loss.svg, step-NNNNNN/, best/, last/ (+ merged/)

This module owns the run driver (``train_run``: from a built model and task to a finished run,
the same for pretraining and fine-tuning), writing checkpoints into the directory during training
(best by the run's metric, periodic step checkpoints published as last/, pruning), its metrics
log, and resuming from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from llmkit.core import checkpoint as ckpt_io
from llmkit.core.config import ModelConfig, RunConfig
from llmkit.core import speed
from llmkit.core.device import pick_device, set_threads
from llmkit.core.distributed import Dist, gather_for_save, is_sharded, load_sharded_optimizer, shard
from llmkit.core.errors import CheckpointError, ConfigError, TrainingDiverged
from llmkit.core.lora import trainable_parameters
from llmkit.core.metrics import bits_per_byte
from llmkit.core.train import EventFn, Task, Trainer, TrainState, make_optimizer


# --- the run driver ---------------------------------------------------------------------------------

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
    import os

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


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the PID it
    names one process, even after the PID is reused. None where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a killed process waiting to be reaped (a zombie) still answers kill(0): it writes nothing
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


@contextlib.contextmanager
def run_lock(out: Path, dist: Dist) -> Iterator[None]:
    """One writer per run directory: a second run on the same ``--out`` is refused while the first
    lives. The lock (``.NAME.llmkit-lock`` beside the directory) records host, PID and the process's
    start time; a lock whose process is gone (killed, crashed) is stale and taken over. Under
    torchrun, rank 0 holds it for the job."""
    if not dist.is_main:
        yield
        return
    out = Path(out)
    lock = out.parent / f".{out.name}.llmkit-lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
            except (OSError, ValueError):
                held = {}  # torn while being written: its writer died at once
            same_host = held.get("host") == me["host"]
            if held and (not same_host or _alive(int(held.get("pid", 0)), held.get("started"))):
                where = f"PID {held.get('pid')}" + ("" if same_host else f" on host {held.get('host')}")
                hint = "" if same_host else f" (if that run is gone, delete {lock})"
                raise ConfigError(f"another llmkit run ({where}, since {held.get('since')}) is writing to {out}: "
                                  f"wait for it to end, or choose another --out{hint}")
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:  # pragma: no cover - another process took the stale lock between our two tries
        raise ConfigError(f"another llmkit run just started writing to {out}: choose another --out")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def with_epoch_budget(cfg: RunConfig, sequences_per_epoch: float, world: int) -> RunConfig:
    """train.epochs as a step budget: epochs x sequences per epoch / global batch, rounded up
    (the smaller of that and train.steps when both are given)."""
    if not cfg.train.epochs:
        return cfg
    epoch_steps = math.ceil(cfg.train.epochs * sequences_per_epoch / cfg.train.global_batch(world))
    return cfg.replace("train", steps=min(s for s in (cfg.train.steps, epoch_steps) if s))


def train_run(out: Path, cfg: RunConfig, *, model: torch.nn.Module, task: Task, tokenizer, dist: Dist,
              device: torch.device, resume_from: Path | None, kind: str, on_event: EventFn,
              val_tokens: int = 0, val_bytes: int = 0, extra: dict[str, Any] | None = None,
              threads: tuple[int, str] = (0, ""), reports: dict[str, Any] | None = None) -> RunResult:
    """Train a built model on a task in ``out``, fresh or resumed, to a finished run directory.

    Everything that is the same for pretraining and fine-tuning happens here: the optimizer and
    trainer state (resumed when asked), config.yaml, metrics.jsonl (with perplexity and bits per
    byte when ``val_tokens``/``val_bytes`` are known), the checkpointer, ``Trainer.fit``, the loss
    curve, and a diverged run turned into one clear error. ``extra`` goes into the ``model`` event
    and every checkpoint's trainer state.
    """
    extra = extra or {}
    resumed = ckpt_io.read_state(resume_from) if resume_from is not None else None
    precision, compiled = speed.plan(cfg, device, distributed=dist.enabled, resumed=resumed)
    params = model.num_params()
    trainable = trainable_parameters(model)
    optimizer, state = start_training(model, cfg, dist, resume_from, on_event)
    on_event("model", {"params": params, "trainable": trainable, "device": str(device), "precision": precision.name,
                       "precision_reason": precision.reason, "compiled": compiled, "config": cfg.model, "task": kind,
                       "processes": dist.world, "strategy": cfg.train.strategy if dist.enabled else None,
                       "threads": threads[0], "threads_reason": threads[1], **extra})
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if reports:  # the data (and tokenizer) reports, for report.html
            (out / "reports.json").write_text(json.dumps(reports, ensure_ascii=False, indent=1, default=str),
                                              encoding="utf-8")
    metrics = MetricsLog(out / "metrics.jsonl", val_tokens, val_bytes)
    save = Checkpointer(out, model=model, config=cfg.to_dict(), tokenizer=tokenizer, optimizer=optimizer,
                        extra_state={"seed": cfg.train.seed, "kind": kind, "precision": precision.name,
                                     "compiled": compiled,
                                     "device": str(device), "params": params, "trainable": trainable, **extra},
                        keep=cfg.train.keep_checkpoints, on_event=on_event, dist=dist)
    best_metrics: dict[str, Any] = {}
    reported = {"at": time.monotonic(), "cost": 0.0}

    def report(final: bool = False) -> None:
        """Refresh report.html while training, at most every 30 s and so that drawing it takes
        under 2% of the run (a page costs ~0.7 s of matplotlib here); a page never stops a run."""
        wait = max(30.0, 50 * reported["cost"])
        if not (cfg.train.report and dist.is_main) or (not final and time.monotonic() - reported["at"] < wait):
            return
        start = time.monotonic()
        try:
            from llmkit.core.report import write_report

            write_report(out)
        except Exception as e:  # noqa: BLE001 - a picture library's failure is not the run's
            on_event("report_failed", {"error": f"{type(e).__name__}: {e}"})
        reported.update(at=time.monotonic(), cost=time.monotonic() - start)

    def events(kind: str, d: dict[str, Any]) -> None:
        if dist.is_main:
            metrics(kind, d)
        if kind == "eval" and d.get("improved"):
            best_metrics.clear()
            best_metrics.update(d)
        on_event(kind, d)
        if kind == "eval":
            report()

    trainer = Trainer(model, task, optimizer, state, cfg.optim, cfg.train, device, precision,
                      tokens_per_step=cfg.train.global_batch(dist.world) * cfg.model.context, save=save,
                      on_event=events, compiled=torch.compile(model) if compiled else None,
                      metric=cfg.task.best_metric, dist=dist)
    reason = trainer.fit()
    dist.close()
    best, last = outcome(out)
    result = RunResult(out, reason, state, params, trainable, precision.name, best, last, best_metrics)
    if not dist.is_main:
        return result
    title = f"{out.name}: loss" + (f" ({kind})" if kind != "lm" else "")
    unit = "loss (nats/example)" if kind == "classify" else "loss (nats/token)"
    try:  # matplotlib is an extra: without it a run has no picture, nothing else is missing
        from llmkit.core.pictures import loss_curve

        loss_curve(out / "loss.svg", metrics.train, metrics.val, title, unit)
    except ConfigError as e:
        on_event("report_failed", {"error": str(e)})
    report(final=True)
    if reason == "diverged":
        raise TrainingDiverged(f"training diverged at step {state.step} (loss is NaN or infinite); "
                               f"last good checkpoint: {last or best or 'none'}; lower optim.lr or raise "
                               "optim.warmup_steps")
    return result


# --- the directory: where a run starts from, how it is written ------------------------------------

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
        raise ConfigError(f"{out} already holds a run (checkpoint at step {ckpt_io.read_state(latest).get('step')}); "
                          f"pass --resume auto to continue it, or choose another --out")
    return None


def check_same_model(resume_from: Path, saved: ModelConfig, wanted: ModelConfig) -> None:
    if saved != wanted:
        diff = [f"model.{k} {getattr(wanted, k)!r} (checkpoint: {getattr(saved, k)!r})"
                for k in wanted.__dataclass_fields__ if getattr(wanted, k) != getattr(saved, k)]
        raise CheckpointError(f"cannot resume {resume_from}: the config changes the model: {', '.join(diff)}")


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


def start_training(model: torch.nn.Module, cfg, dist: Dist, resume_from: Path | None,
                   on_event: EventFn) -> tuple[torch.optim.Optimizer, TrainState]:
    """Shard the model if asked, then its optimizer and trainer state (fresh, or resumed)."""
    parallelize(model, cfg.train.strategy, dist)
    optimizer = make_optimizer(model, cfg.optim)
    state = TrainState()
    if resume_from is not None:
        state = load_training_state(model, optimizer, resume_from)
        on_event("resume", {"path": str(resume_from), "step": state.step, "budget": cfg.train.budget_text()})
    return optimizer, state


def parallelize(model: torch.nn.Module, strategy: str, dist: Dist) -> torch.nn.Module:
    """Under torchrun with ``--strategy fsdp``, shard the model in place (DDP wraps it inside
    ``fit`` instead: its weights stay whole, so nothing changes here)."""
    if dist.enabled and strategy == "fsdp":
        shard(model)
    return model


def read_metrics(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (the run was killed while appending it) is
    dropped, and with ``repair`` cut from the file so appending goes on cleanly; a damaged line
    anywhere else is an error naming it."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, kept = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            kept += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if any(rest.strip() for rest in lines[n:]):
                raise CheckpointError(f"{path}: line {n} is damaged (not JSON); remove that line to go on") from None
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(kept)
            break
        rows.append(row)
        kept += len(line) + 1
    return rows


class MetricsLog:
    """Appends one JSON line per step/eval event to metrics.jsonl, and keeps the loss curves.

    With ``val_tokens``/``val_bytes`` (language modelling), evaluations also get perplexity and
    bits per byte.
    """

    def __init__(self, path: Path, val_tokens: int = 0, val_bytes: int = 0):
        self.path, self.val_tokens, self.val_bytes = path, val_tokens, val_bytes
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        if path.exists():  # a resumed run keeps its history
            for row in read_metrics(path, repair=True):
                if row.get("event") == "step":
                    self.train.append((row["step"], row["loss"]))
                elif row.get("event") == "eval":
                    self.val.append((row["step"], row["val_loss"]))

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in ("step", "eval"):
            return
        if kind == "eval":
            if self.val_bytes:
                data.update(val_ppl=math.exp(min(data["val_loss"], 50)),
                            val_bpb=bits_per_byte(data["val_loss"], self.val_tokens, self.val_bytes))
            self.val.append((data["step"], data["val_loss"]))
        else:
            self.train.append((data["step"], data["loss"]))
        row = {"event": kind, "time": round(time.time(), 3), **data}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


class Checkpointer:
    """The ``save`` callback of ``fit``: best/ by the run's metric; step-NNNNNN/ with optimizer
    state, published as last/; old step directories pruned to ``keep``.

    Called on every process: a sharded (FSDP) model is gathered by all of them, then rank 0 alone
    writes the ordinary single-file checkpoint.
    """

    def __init__(self, out: Path, *, model: torch.nn.Module, config: dict[str, Any], tokenizer,
                 optimizer: torch.optim.Optimizer, extra_state: dict[str, Any], keep: int, on_event: EventFn,
                 dist: Dist | None = None):
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
        ckpt_io.save_checkpoint(path, model=self.model, config=self.config, tokenizer=self.tok, state=payload,
                                optimizer=self.optimizer if with_optimizer else None, tensors=tensors)
        if kind != "best":
            ckpt_io.link_copy(path, self.out / "last")
            prune(self.out, self.keep)
        self.on_event("save", {"kind": kind, "path": str(path), "step": state.step})
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


def main_only(on_event: EventFn, dist: Dist) -> EventFn:
    """Events reach the listener (progress, logs, metrics.jsonl) from rank 0 only."""
    return on_event if dist.is_main else (lambda kind, data: None)


def main_first(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Rank 0 runs ``fn`` (e.g. building a token cache) while the others wait, then they run it
    (reading what rank 0 left)."""
    result = fn() if dist.is_main else None
    dist.barrier()
    return result if dist.is_main else fn()
