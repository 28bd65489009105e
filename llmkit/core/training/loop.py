"""The training loop shared by pretraining and fine-tuning.

It knows nothing of corpora, heads or checkpoint layout: a *task* supplies micro-batches, their
loss and its validation metrics (next-token loss for a language model; accuracy and F1 for a
classifier; chrF and BLEU for a translator), a *save* callback writes checkpoints, and an *event*
callback receives progress (``step``, ``eval``, ``save``, ``stop``) for the CLI's progress bar,
``metrics.jsonl`` and tests. The best checkpoint is chosen by the metric the caller names.

What it does: the optimizer and schedule of ``optim.py`` (AdamW or Muon; warmup, then cosine or
warm-down), gradient accumulation and clipping, autocast, validation every N steps, best
checkpoint, early stopping with patience, budgets in steps, tokens or wall-clock time, a clean
stop on NaN/inf (the last good checkpoint stays as it was) and on Ctrl-C (a checkpoint is written
so ``--resume auto`` goes on).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from llmkit.core import events
from llmkit.core.config import HIGHER_IS_BETTER, OptimConfig, TrainConfig
from llmkit.core.errors import Terminated
from llmkit.core.events import EventFn
from llmkit.core.host.device import Precision, autocast
from llmkit.core.host.signals import uninterruptible
from llmkit.core.training.distributed import Dist
from llmkit.core.training.optim import lr_at

Forward = Callable[..., Any]
"""``forward(fn, *args)`` computes ``fn(model, *args)`` through whatever wraps the model (a
DistributedDataParallel module, torch.compile): a task's forward code never sees the wrapper."""


class Task(Protocol):
    """What ``fit`` trains. Batches are pure functions of their coordinates so resume is exact."""

    def train_batch(self, step: int, part: int, parts: int) -> Any:
        """Micro-batch ``part`` of the ``parts`` (processes x accumulation) making up step ``step``."""

    def loss(self, forward: Forward, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss of one micro-batch (a scalar tensor) and the tokens it covered."""

    def evaluate(self, net: torch.nn.Module) -> dict[str, Any]:
        """Validation metrics: always ``val_loss``, plus the task's own (``macro_f1``, ``chrf``, …)."""

    def batch_tokens(self, batch_size: int) -> int:
        """The most padded tokens a micro-batch of ``batch_size`` examples holds (``memory.py``)."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that an exact resume needs."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_score: float | None = None
    """The best value of the run's selection metric (the val loss itself for language models)."""
    best_step: int = -1
    bad_evals: int = 0
    elapsed_s: float = 0.0
    last_val_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not math.isfinite(d["best_val_loss"]):
            d["best_val_loss"] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if fields.get("best_val_loss") is None:
            fields["best_val_loss"] = math.inf
        return cls(**fields)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V) in fp32 for a stable log-softmax."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def next_token_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The language-modelling loss of a batch, as a ``forward`` function (see ``Forward``)."""
    return lm_loss(model(x), y)


def target_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``next_token_loss`` computed at the positions that have a target only (y != -100): the LM
    head and its softmax skip masked prompts and padding. The same value and gradients; 1.26x
    faster forward and backward at the ``small`` shape when a tenth of the tokens are targets
    (docs/benchmarks.md)."""
    keep = y != -100  # (B, T)
    return F.cross_entropy(model(x, logits_where=keep).float(), y[keep])  # over (N, V) logits


class TokenLoss(NamedTuple):
    loss: float
    """Mean next-token loss per target token."""
    tokens: int
    se: float | None
    """Standard error of that mean, from the spread of the per-window means (None for one window)."""


@torch.no_grad()
def mean_token_loss(model, batches, device) -> TokenLoss:
    """Mean next-token loss over (x, y) batches, per target token (-100 targets ignored), the
    number of target tokens it covers, and its standard error over the windows (rows)."""
    total, count, rows = 0.0, 0, []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100).view(
            y.shape
        )  # (B, T)
        valid = (y != -100).sum(1)  # (B,)
        total += loss.sum().item()
        count += int(valid.sum())
        rows.extend((loss.sum(1) / valid.clamp(min=1))[valid > 0].tolist())
    se = float(torch.tensor(rows).std() / math.sqrt(len(rows))) if len(rows) > 1 else None
    return TokenLoss(total / max(count, 1), count, se)


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def is_improvement(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    if higher_is_better(metric):
        return value > best + min_delta
    return value < best - min_delta


class Budget:
    """Stop conditions and progress: steps, tokens and/or wall-clock seconds."""

    def __init__(self, cfg: TrainConfig, tokens_per_step: int):
        self.steps = cfg.steps
        if cfg.tokens:
            token_steps = -(-cfg.tokens // tokens_per_step)
            self.steps = min(self.steps, token_steps) if self.steps else token_steps
        self.seconds = cfg.time_s

    def progress(self, state: TrainState) -> float:
        parts = [0.0]
        if self.steps:
            parts.append(state.step / self.steps)
        if self.seconds:
            parts.append(state.elapsed_s / self.seconds)
        return max(parts)

    def done(self, state: TrainState) -> str | None:
        if self.steps and state.step >= self.steps:
            return "steps"
        if self.seconds and state.elapsed_s >= self.seconds:
            return "time"
        return None


class Through(torch.nn.Module):
    """Lets DistributedDataParallel wrap any computation on the model: forward(fn, *args) is
    fn(model, *args). DDP then sees every forward (a classifier reads hidden states and a head, not
    logits) and synchronises the gradients of whatever the task touched."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def _runner(model: torch.nn.Module, compiled: torch.nn.Module | None, dist: Dist, device: torch.device):
    """(forward, sync) for the training step: how tasks reach the model, and a context manager that
    turns gradient synchronisation off for all but the last micro-batch of a step."""
    if dist.enabled and not getattr(model, "_llmkit_fsdp", False):
        # start-up time: torch.distributed's modules load only for a distributed run
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(
            Through(model if compiled is None else compiled),
            device_ids=[device.index] if device.type == "cuda" else None,
        )
        return (lambda fn, *a: ddp(fn, *a)), (lambda last: contextlib.nullcontext() if last else ddp.no_sync())
    net = model if compiled is None else compiled
    if dist.enabled:  # FSDP2: reduce-scatter only after the last micro-batch

        def sync(last):
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()

        return (lambda fn, *a: fn(net, *a)), sync
    return (lambda fn, *a: fn(net, *a)), (lambda last: contextlib.nullcontext())


def _grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor | None:
    """Clip the gradients; their global norm before clipping, as a tensor (read only when logged)."""
    if clip <= 0:
        return None
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


@dataclass
class Trainer:
    """One training run's loop: ``fit`` until a budget, early stopping, divergence or interruption.

    ``save(kind, state)`` is called with kind ``best`` (a new best value of ``metric`` among the
    task's validation metrics), ``step`` (periodic and final) or ``interrupt`` (Ctrl-C).
    ``tokens_per_step`` sizes a token budget; throughput counts the tokens the task reports, over
    all processes.

    Under torchrun (``dist``), each process takes its share of every global batch; the loss, the
    token count and the time budget are summed over processes each step (one small all-reduce), so
    every process makes the same decisions, and ``save`` is called on every process (it decides
    who writes).
    """

    model: torch.nn.Module
    task: Task
    optimizer: torch.optim.Optimizer
    state: TrainState
    optim_cfg: OptimConfig
    train_cfg: TrainConfig
    device: torch.device
    precision: Precision
    tokens_per_step: int
    save: Callable[[str, TrainState], Any]
    on_event: EventFn
    compiled: torch.nn.Module | None = None
    metric: str = "val_loss"
    dist: Dist = field(default_factory=Dist)

    def fit(self) -> str:
        """Train; return why it stopped: steps, time, early_stop, diverged, interrupted (Ctrl-C) or
        terminated (SIGTERM)."""
        state, cfg = self.state, self.train_cfg
        self.budget = Budget(cfg, self.tokens_per_step)
        if not self.budget.steps and not self.budget.seconds:
            raise ValueError("fit needs a budget: steps, tokens or time")
        self.accum = cfg.accumulation(self.dist.world)
        self.forward, self.sync = _runner(self.model, self.compiled, self.dist, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None
        self.model.train()
        self.on_event(
            events.Start(
                step=state.step,
                steps=self.budget.steps,
                seconds=self.budget.seconds,
                tokens_per_step=self.tokens_per_step,
                processes=self.dist.world,
                accumulation=self.accum,
            )
        )
        self.window = (time.perf_counter(), 0)  # throughput since the last logged step: (start, tokens)
        stop = self.budget.done(state)
        try:
            while stop is None:
                stop = self._optimizer_step()
                if stop == "diverged":
                    return stop
                if state.step % cfg.eval_every == 0 or stop:
                    stop = self._validate(stop)
                    if stop == "diverged":
                        return stop
                if state.step % cfg.save_every == 0 or stop:
                    self.save("step", state)
        except KeyboardInterrupt as stop_signal:  # Ctrl-C, or SIGTERM (errors.Terminated)
            self.save("interrupt", state)
            reason = "terminated" if isinstance(stop_signal, Terminated) else "interrupted"
            self.on_event(events.Stop(reason=reason, step=state.step))
            return reason
        self.on_event(events.Stop(reason=stop, step=state.step))
        return stop

    def _optimizer_step(self) -> str | None:
        """One optimizer step over ``accum`` micro-batches; the stop reason it reaches, if any."""
        state, dist = self.state, self.dist
        t0 = time.perf_counter()
        lr = lr_at(self.optim_cfg, state.step, self.budget.progress(state))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from torch's global RNG: seed it per step (and rank) so resume replays it.
        torch.manual_seed(self.train_cfg.seed * 1_000_003 + state.step * 1009 + dist.rank)
        loss_sum, step_tokens = torch.zeros((), device=self.device), 0
        parts = self.accum * dist.world
        for micro in range(self.accum):
            batch = self.task.train_batch(state.step, dist.rank * self.accum + micro, parts)
            with self.sync(micro == self.accum - 1), autocast(self.device, self.precision):
                loss, n_tokens = self.task.loss(self.forward, batch)
                loss = loss / self.accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach().float()  # stays on the device: no sync per micro-batch
            step_tokens += n_tokens
        elapsed = state.elapsed_s + time.perf_counter() - t0
        time_up = bool(self.budget.seconds and elapsed >= self.budget.seconds)
        # The step's loss (read once) over all processes, their tokens, and whether any ran out of time.
        loss_value, step_tokens, any_time_up = dist.sum([loss_sum.item(), step_tokens, float(time_up)], self.device)
        loss_value, step_tokens = loss_value / dist.world, int(step_tokens)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            self.on_event(events.Stop(reason="diverged", step=state.step, loss=loss_value))
            return "diverged"
        # The update and the step count change together or not at all: a signal waits for them.
        with uninterruptible():
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = _grad_norm(self.model, self.optim_cfg.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += step_tokens
            state.elapsed_s += time.perf_counter() - t0
        start, tokens = self.window
        self.window = (start, tokens + step_tokens)
        # Not budget.done(): each process has its own clock; the summed flag is the shared one.
        stop = "steps" if self.budget.steps and state.step >= self.budget.steps else ("time" if any_time_up else None)
        self.on_event(events.Tick(step=state.step, elapsed_s=state.elapsed_s, progress=self.budget.progress(state)))
        if state.step % self.train_cfg.log_every == 0 or stop:
            now = time.perf_counter()
            self.on_event(
                events.Step(
                    step=state.step,
                    loss=loss_value,
                    lr=lr,
                    grad_norm=float("nan") if grad_norm is None else grad_norm.item(),
                    tokens=state.tokens_seen,
                    elapsed_s=state.elapsed_s,
                    tokens_per_s=self.window[1] / max(now - start, 1e-9),
                    progress=self.budget.progress(state),
                )
            )
            self.window = (now, 0)
        return stop

    def _validate(self, stop: str | None) -> str | None:
        """Evaluate, keep best/, count patience; the stop reason after it (early_stop, time, diverged)."""
        state, cfg = self.state, self.train_cfg
        t_eval = time.perf_counter()
        # The eager model: evaluation's shapes (a smaller last batch, no dropout) would each
        # recompile a compiled one, for a pass that is a small share of the run anyway.
        net = self.model
        net.eval()
        with autocast(self.device, self.precision):
            metrics = self.task.evaluate(net)
        net.train()
        val, score = metrics["val_loss"], metrics[self.metric]
        state.last_val_loss = val
        state.best_val_loss = min(state.best_val_loss, val)
        improved = is_improvement(self.metric, score, state.best_score, cfg.min_delta)
        if improved:
            state.best_score, state.best_step, state.bad_evals = score, state.step, 0
        else:
            state.bad_evals += 1
        self.on_event(
            events.Eval(
                step=state.step,
                metrics=metrics,
                best_val_loss=state.best_val_loss,
                metric=self.metric,
                score=score,
                best_score=state.best_score,
                improved=improved,
                tokens=state.tokens_seen,
                elapsed_s=state.elapsed_s,
            )
        )
        if not math.isfinite(val):
            self.on_event(events.Stop(reason="diverged", step=state.step, loss=val))
            return "diverged"
        if improved:
            self.save("best", state)
        if cfg.patience and state.bad_evals >= cfg.patience and not stop:
            stop = "early_stop"
        # Evaluation time is not training time, but it is wall-clock the budget must see.
        spent = time.perf_counter() - t_eval
        state.elapsed_s += spent
        self.window = (self.window[0] + spent, self.window[1])
        if self.budget.seconds:  # every process must agree on stopping for time
            up = self.dist.sum([float(state.elapsed_s >= self.budget.seconds)], self.device)[0]
            stop = stop or ("time" if up else None)
        return stop
