"""The speed probe: which precision, and whether ``torch.compile``, make a training step fastest
on this machine for this shape — measured, not guessed, and remembered.

The answer depends on the processor (bf16 matmuls are 4x fp32 on a CPU with AVX512-BF16 or AMX,
and 10-100x slower on one without), on the shape (small widths are bound by element-wise work,
which compilation fuses) and on the torch build, so no fixed rule gets it right everywhere.

A run is probed in place (``InPlace``): forward and backward of the run's own model on its own
first batch (a large model's first few rows), in each candidate precision, with the gradients dropped and the
random state put back afterwards. It never builds a second model, so its memory stays within the
run's own (a pretrained model of a billion parameters costs no copy), and it takes seconds. The
budget-sized recipe, which has to time shapes before any model exists, times a throwaway model of
each small shape instead (``time_mode``).

Figures are cached in ``<cache>/speed.json``, keyed by the machine (CPU model, the flags that
matter, torch version, threads) and the shape, with the number of other tasks running when they
were measured: a figure taken on a busy machine is measured again once the machine is quiet, and
never replaces a quiet one.

A compiled mode costs its compilation once per process, and the choice weighs that cost against
the run's budget: compilation is taken when it yields more tokens within the budget than the
fastest eager mode. A run never compiles cold on a guess: its compiled figures come from the
cache (a run that asked for ``train.compile=true`` records them), and only the recipe's throwaway
probe times compilation itself, for budgets long enough to repay it (``COMPILE_PROBE_MIN_S``). A
mode must beat plain fp32 by ``MARGIN`` to be chosen, so a tie in noisy timings does not flip a
run's numerics.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.core.config import ModelConfig, OptimConfig
from llmkit.core.host.device import Precision, autocast, cpu_has_native_bf16, pick_precision
from llmkit.core.host.device import machine_busy as busy
from llmkit.core.host.machine import machine_key, read_cache, shape_key, write_cache
from llmkit.core.model import fast
from llmkit.core.model.transformer import Transformer
from llmkit.core.training.optim import make_optimizer

MARGIN = 1.05
"""A mode other than eager fp32 must be this much faster (tokens within the budget) to be chosen."""
COMPILE_PROBE_MIN_S = 300.0
"""Shorter runs never probe compilation cold (it takes tens of seconds); cached figures still count."""
PROBE_ROWS = 4
"""Rows of a large model's first batch the in-place probe times (the ratio of two modes is what counts)."""
PROBE_FULL_BATCH_FLOPS = 2e11
"""Below this much training compute per batch (6 x parameters x tokens) the probe times the whole
batch: bf16's gain grows with the matrices' rows, and a slice of a small model's batch made fp32
look faster than it is (4 rows of the quick-start model: fp32 24k tokens/s, bf16 16k)."""


@dataclass(frozen=True)
class Mode:
    precision: str  # fp32 | bf16
    compiled: bool

    @property
    def name(self) -> str:
        return self.precision + ("+compile" if self.compiled else "")


@dataclass
class Timing:
    tokens_per_s: float
    compile_s: float = 0.0
    """What a run pays to compile with torch's caches warm (0 for eager modes)."""
    cold_compile_s: float = 0.0
    error: str = ""
    """Why the mode cannot run here (a compiler missing, say); then it is never chosen."""
    busy: bool = False
    """Measured while other work held the cores: measured again when the machine is quiet."""


@dataclass
class Choice:
    precision: str
    compiled: bool
    reason: str
    timings: dict[str, Timing]

    def table(self) -> dict[str, Any]:
        return {name: asdict(t) for name, t in self.timings.items()}


def step_fn(cfg: ModelConfig, batch: int, mode: Mode) -> Callable[[], None]:
    """One training step of a fresh model of this shape in ``mode`` (forward, backward, clipping,
    and the optimizer the loop uses) on a fixed random batch: what the probe and benchmarks time."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=gen)  # (B, T)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=gen)  # (B, T)
    torch.manual_seed(0)
    model = fast.for_training(Transformer(cfg).train())
    opt = make_optimizer(model, OptimConfig(lr=1e-4))
    net = torch.compile(model) if mode.compiled else model
    amp = torch.bfloat16 if mode.precision == "bf16" else None

    def step() -> None:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = net(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _failed(e: Exception) -> Timing:
    """A mode that cannot run here (a compiler missing, say): recorded with the error's first line."""
    return Timing(0.0, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])


def time_mode(cfg: ModelConfig, batch: int, mode: Mode, steps: int = 4) -> Timing:
    """Tokens/s of ``step_fn`` steps in ``mode``; for compiled modes also the cold and warm
    compilation times."""
    cold = warm = 0.0
    try:
        step = step_fn(cfg, batch, mode)
        t0 = time.perf_counter()
        step()  # compiles, or warms the allocator
        cold = time.perf_counter() - t0
        if mode.compiled:  # again, as a new run would: torch's on-disk caches are warm now
            torch._dynamo.reset()
            step = step_fn(cfg, batch, mode)
            t0 = time.perf_counter()
            step()
            warm = time.perf_counter() - t0
        step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a mode that cannot run here is recorded, not fatal
        return _failed(e)
    finally:
        if mode.compiled:
            torch._dynamo.reset()
    return Timing(
        batch * cfg.context / statistics.median(times),
        compile_s=warm,
        cold_compile_s=cold if mode.compiled else 0.0,
        busy=busy(),
    )


def _head(batch: Any, rows: int) -> Any:
    """The first ``rows`` rows of a task's batch: tensors and lists are cut, counts kept."""
    if isinstance(batch, tuple):
        return tuple(_head(part, rows) for part in batch)
    if isinstance(batch, (torch.Tensor, list)):
        return batch[:rows]
    return batch


def _rows(batch: Any) -> int:
    """Rows of a task's batch: its first part is a (B, T) tensor or a list of B rows."""
    return len(batch[0])


def _tokens(batch: Any) -> int:
    first = batch[0]
    return first.numel() if isinstance(first, torch.Tensor) else sum(map(len, first))


class InPlace:
    """Times a training step of the run's own model on the first rows of its own first batch:
    forward and backward in a mode, no optimizer step. Peak memory is the run's own (smaller: a
    slice of its batch), nothing is built twice, and the model comes out as it went in (gradients
    dropped, torch's random state restored)."""

    def __init__(self, model: torch.nn.Module, task: Any, device: torch.device, kind: str, rows: int = PROBE_ROWS):
        self.model, self.task, self.device, self.kind = model, task, device, kind
        first = task.train_batch(0, 0, 1)
        params = sum(p.numel() for p in model.parameters())
        if 6 * params * _tokens(first) < PROBE_FULL_BATCH_FLOPS:  # cheap: the whole batch, as the run computes it
            rows = _rows(first)
        self.batch = _head(first, rows)
        self.rows = rows
        self.tokens = 0  # real tokens in the slice, known after the first timed step
        self.seconds = 0.0  # time spent measuring

    def key(self, cfg: ModelConfig) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        share = trainable / max(sum(p.numel() for p in self.model.parameters()), 1)
        return f"run|{self.kind}|{shape_key(cfg, self.rows)}|trainable{share:.2f}"

    def __call__(self, cfg: ModelConfig, batch: int, mode: Mode) -> Timing:
        start = time.perf_counter()
        rng = torch.get_rng_state()
        net = torch.compile(self.model) if mode.compiled else self.model
        forward = lambda fn, *a: fn(net, *a)  # noqa: E731 - the loop's forward, without DDP

        def step() -> int:
            with autocast(self.device, Precision(mode.precision, "")):
                loss, tokens = self.task.loss(forward, self.batch)
            loss.backward()
            return tokens

        try:
            t0 = time.perf_counter()
            step()  # compiles, or warms the allocator
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()  # one timed step: the probe must cost seconds, even for a large model
            self.tokens = step()
            seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a mode that cannot run here is recorded, not fatal
            return _failed(e)
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            if mode.compiled:
                torch._dynamo.reset()
            self.seconds += time.perf_counter() - start
        rate = self.tokens / seconds
        return Timing(rate, compile_s=cold if mode.compiled else 0.0, cold_compile_s=cold if mode.compiled else 0.0,
                      busy=busy())  # fmt: skip


def candidates(compile_ok: bool) -> list[Mode]:
    precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    modes = [Mode(p, False) for p in precisions]
    if compile_ok:
        modes += [Mode(p, True) for p in precisions]
    return modes


class _Timings:
    """This machine's recorded timings of one shape: read from the cache, measured when missing,
    written back once (``save``) if anything was measured."""

    def __init__(self, cfg: ModelConfig, batch: int, timer: Callable[[ModelConfig, int, Mode], Timing], key: str = ""):
        self.cfg, self.batch, self.timer = cfg, batch, timer
        self.data = read_cache()
        self.entry = self.data.setdefault(machine_key(), {}).setdefault(key or shape_key(cfg, batch), {})
        self.taken: dict[str, Timing] = {}
        self.measured = False
        self.quiet: bool | None = None  # read once, when a busy figure asks whether to measure again

    def known(self, mode: Mode) -> bool:
        return mode.name in self.entry

    def _stale(self, mode: Mode) -> bool:
        """A figure measured on a busy machine, while the machine is quiet now: measure again."""
        if not self.entry[mode.name].get("busy"):
            return False
        if self.quiet is None:
            self.quiet = not busy()
        return self.quiet

    def take(self, mode: Mode) -> Timing:
        if mode.name not in self.entry or self._stale(mode):
            fresh = self.timer(self.cfg, self.batch, mode)
            old = self.entry.get(mode.name)
            if old is None or old.get("busy") or not fresh.busy:  # a busy figure never replaces a quiet one
                self.entry[mode.name] = asdict(fresh)
            self.measured = True
            self.taken[mode.name] = fresh
            return fresh
        self.taken[mode.name] = Timing(**self.entry[mode.name])
        return self.taken[mode.name]

    def save(self) -> None:
        if self.measured:
            write_cache(self.data)


def eager_rate(cfg: ModelConfig, batch: int, timer: Callable[[ModelConfig, int, Mode], Timing] = time_mode) -> float:
    """The best eager training tokens/s of this shape here (fp32, or bf16 where it runs natively):
    what the budget-sized recipe scales from. Cached like ``choose``'s timings."""
    timings = _Timings(cfg, batch, timer)
    rates = [t.tokens_per_s for t in map(timings.take, candidates(False)) if not t.error]
    timings.save()
    return max(rates, default=0.0)


def choose(
    cfg: ModelConfig,
    batch: int,
    *,
    budget_s: float | None,
    tokens_per_step: int | Callable[[], int],
    steps: int = 0,
    precision: str = "auto",
    compile: str = "auto",
    timer: Callable[[ModelConfig, int, Mode], Timing] = time_mode,
    key: str = "",
    cold_compile: bool = True,
) -> Choice:
    """The fastest mode for a CPU run of this shape within its budget (seconds of wall-clock, or
    ``steps`` optimizer steps of ``tokens_per_step`` tokens when there is no time budget; a
    callable when the tokens of a step are known only once the eager modes are timed).

    ``precision`` and ``compile`` restrict the choice to what the config fixed (``auto`` leaves
    it free). Timings come from the cache (under ``key``, or the shape's) when present; missing
    ones are measured and stored. Without ``cold_compile`` a compiled mode left at ``auto`` is
    weighed only from cached figures, never compiled to find out.
    """
    timings = _Timings(cfg, batch, timer, key)
    modes = [
        m
        for m in candidates(compile != "false")
        if precision in ("auto", m.precision) and compile in ("auto", str(m.compiled).lower())
    ]
    if not modes:  # bf16 asked for on a CPU without bf16 units: still the caller's decision
        modes = [Mode(precision if precision != "auto" else "fp32", compile == "true")]
    eager, compiled = [m for m in modes if not m.compiled], [m for m in modes if m.compiled]

    def worth_probing(mode: Mode) -> bool:
        """A compiled mode is timed when fixed by the config, already known, or the run is long."""
        long = cold_compile and budget_s is not None and budget_s >= COMPILE_PROBE_MIN_S
        return compile != "auto" or timings.known(mode) or long

    sized = budget_s is not None or not cold_compile  # whether worth_probing can answer before any timing
    if len(modes) == 1 or (len(eager) == 1 and sized and not any(map(worth_probing, compiled))):
        only = modes[0] if len(modes) == 1 else eager[0]
        why = "CPU has no native bf16 units" if precision == "auto" and not cpu_has_native_bf16() else "as configured"
        return Choice(only.precision, only.compiled, why, {})

    for mode in eager:
        timings.take(mode)
    eager_best = max(eager, key=lambda m: timings.taken[m.name].tokens_per_s, default=None)
    if budget_s is None and steps and eager_best is not None:
        per_step = tokens_per_step() if callable(tokens_per_step) else tokens_per_step
        budget_s = steps * per_step / max(timings.taken[eager_best.name].tokens_per_s, 1e-9)
    for mode in compiled:
        # compilation speeds both precisions alike: one cold compile (the faster precision's) is enough
        if worth_probing(mode) and (
            timings.known(mode) or compile != "auto" or eager_best is None or mode.precision == eager_best.precision
        ):
            timings.take(mode)
    timings.save()
    taken, measured = timings.taken, timings.measured

    def yield_in_budget(mode: Mode) -> float:
        t = taken[mode.name]
        if t.error or t.tokens_per_s <= 0:
            return -1.0
        if budget_s is None:
            return t.tokens_per_s
        return t.tokens_per_s * max(budget_s - t.compile_s, 0.0)

    # Each step away from plain fp32 (a lower precision, then compilation) must earn its MARGIN.
    runnable = [m for m in modes if m.name in taken]
    best = next((m for m in runnable if m == Mode("fp32", False)), runnable[0])
    for group in ([m for m in runnable if not m.compiled], [m for m in runnable if m.compiled]):
        challenger = max(group, key=yield_in_budget, default=None)
        if challenger is not None and yield_in_budget(challenger) >= MARGIN * yield_in_budget(best):
            best = challenger
    rates = ", ".join(f"{n} {t.tokens_per_s:,.0f}" if not t.error else f"{n} unavailable" for n, t in taken.items())
    where = "measured" if measured else "cached"
    if measured and isinstance(timer, InPlace):
        where += f" on {timer.rows} rows of the first batch in {timer.seconds:.1f} s"
    if any(t.busy for t in taken.values()):
        where += ", machine busy: measured again when it is quiet"
    reason = f"fastest here ({where}, tokens/s: {rates})"
    if best.compiled:
        reason += f"; compilation {taken[best.name].compile_s:.0f} s"
    return Choice(best.precision, best.compiled, reason, taken)


def plan(
    cfg, device: torch.device, *, distributed: bool, resumed: dict[str, Any] | None, probe: InPlace | None = None
) -> tuple[Precision, bool]:
    """(precision, compile) for a run of ``cfg`` (a RunConfig) on ``device``.

    A resumed run keeps the mode it started with (resume is exact only under the same numerics);
    a single CPU process with ``train.dtype`` or ``train.compile`` left at auto asks the probe
    (``probe``, the run's own model in place; without one, a throwaway model of the shape);
    anything else follows the device rule (``device.pick_precision``) and the config.
    """
    t = cfg.train
    if resumed and resumed.get("precision"):
        same = Precision(resumed["precision"], "as the run started (resumed)")
        compiled = bool(resumed.get("compiled", t.compile == "true"))
        return (same if t.dtype == "auto" else pick_precision(t.dtype, device, cfg.model.d_model)), (
            compiled if t.compile == "auto" else t.compile == "true"
        )
    if device.type != "cpu" or distributed or (t.dtype != "auto" and t.compile != "auto"):
        rule = pick_precision(t.dtype, device, cfg.model.d_model)
        if distributed and device.type == "cpu" and t.dtype == "auto":  # why torchrun may differ from one process
            rule = Precision(rule.name, f"{rule.reason}; under torchrun the ranks follow this rule, not a probe")
        return rule, t.compile == "true"
    if t.dtype != "auto":
        pick_precision(t.dtype, device, cfg.model.d_model)  # an impossible request is refused here
    precision = t.dtype
    tokens_per_step = t.global_batch(1) * cfg.model.context
    steps = t.steps or (-(-t.tokens // tokens_per_step) if t.tokens else 0)
    if probe is None:
        choice = choose(
            cfg.model,
            t.batch_size,
            budget_s=t.time_s or None,
            tokens_per_step=tokens_per_step,
            steps=steps,
            precision=precision,
            compile=t.compile,
        )
        return Precision(choice.precision, choice.reason), choice.compiled
    choice = choose(
        cfg.model,
        probe.rows,
        budget_s=t.time_s or None,
        # a step holds its rows' real tokens (a fine-tuning row is rarely a full context)
        tokens_per_step=lambda: t.global_batch(1) * probe.tokens // max(probe.rows, 1),
        steps=steps,
        precision=precision,
        compile=t.compile,
        timer=probe,
        key=probe.key(cfg.model),
        cold_compile=False,
    )
    return Precision(choice.precision, choice.reason), choice.compiled
