"""The events core reports through: one frozen dataclass per kind, its fields named.

Core never prints. Jobs, the run driver and the training loop call ``on_event(event)`` with one of
the classes below; the CLI's views draw them, ``store.metrics_log.MetricsLog`` writes them to
``metrics.jsonl``, ``jobs.report`` shows them in report.html, and tests inspect them (or raise from
them to simulate Ctrl-C). A producer that renames or forgets a field fails where it builds the
event, not silently in a listener; each listener declares what it does with every kind
(``LISTENS``), and ``tests/test_events.py`` checks that no kind core emits is left unheard.

``as_dict()`` is an event's flat form (its ``kind`` plus its fields, with an open-ended mapping such
as an evaluation's task metrics merged in): what metrics.jsonl and ``--json`` lines carry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""
    flatten: ClassVar[str] = ""
    """The name of a mapping field whose items are merged into ``as_dict()`` (open-ended payloads)."""

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != self.flatten}
        if self.flatten:
            out = {**getattr(self, self.flatten), **out}
        return {"event": self.kind, **out}


EventFn = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener of a job nobody watches."""


_NOTICE_LISTENERS: list[EventFn] = []


def listen(fn: EventFn) -> None:
    """Hear the notices core gives outside any run (a pretrained model imported on first use):
    the CLI registers its printer once; a library user may register a logger."""
    if fn not in _NOTICE_LISTENERS:
        _NOTICE_LISTENERS.append(fn)


def notify(event: Event) -> None:
    """Give a notice to every registered listener (none: nobody hears it)."""
    for fn in _NOTICE_LISTENERS:
        fn(event)


# --- preparing a run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus(Event):
    kind = "corpus"
    files: list[str]
    sample: bool
    """No corpus was given: the bundled French sample is used."""
    sources: list[dict[str, Any]]
    """One entry (name, weight, files) per source of a mix; empty for a single source."""
    val: list[str]
    """Files held out for validation (``--val``)."""


@dataclass(frozen=True)
class TokenizerTraining(Event):
    kind = "tokenizer_training"
    vocab_size: int
    model_type: str


@dataclass(frozen=True)
class Tokenizer(Event):
    kind = "tokenizer"
    source: str
    """'trained', or the directory a given tokenizer came from."""
    vocab_size: int
    path: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    """A trained tokenizer's quality report (``TokenizerReport.as_dict``)."""


@dataclass(frozen=True)
class Tokenizing(Event):
    kind = "tokenizing"
    done: int
    total: int
    source: str


@dataclass(frozen=True)
class Data(Event):
    kind = "data"
    flatten = "report"
    report: dict[str, Any]
    """The corpus's data report (documents, chars, train/val tokens, sources, cached, rebuilt)."""


@dataclass(frozen=True)
class FinetuneData(Event):
    kind = "finetune_data"
    flatten = "summary"
    summary: dict[str, Any]
    """Fine-tuning's data summary (examples, labels, template, truncation, unseen labels)."""


@dataclass(frozen=True)
class Recipe(Event):
    kind = "recipe"
    shape: str
    reason: str
    table: list[dict[str, Any]]


@dataclass(frozen=True)
class Model(Event):
    kind = "model"
    flatten = "extra"
    params: int
    trainable: int
    device: str
    precision: str
    precision_reason: str
    compiled: bool
    config: Any
    task: str
    processes: int
    strategy: str | None
    threads: int
    threads_reason: str
    extra: dict[str, Any] = field(default_factory=dict)
    """What the job adds (e.g. ``lora``, ``base``)."""


@dataclass(frozen=True)
class Resume(Event):
    kind = "resume"
    path: str
    step: int
    budget: str


@dataclass(frozen=True)
class Importing(Event):
    """A pretrained model given where a checkpoint is expected, imported into the cache on its
    first use (the next uses read the cache)."""

    kind = "importing"
    source: str
    into: str
    size: int
    """The source's bytes."""


@dataclass(frozen=True)
class Import(Event):
    kind = "import"
    source: str
    format: str
    tensors: int


# --- training ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start(Event):
    kind = "start"
    step: int
    steps: int
    seconds: float
    tokens_per_step: int
    processes: int
    accumulation: int


@dataclass(frozen=True)
class Tick(Event):
    """Every optimizer step (``Step`` is every ``log_every``): moves progress bars by time."""

    kind = "tick"
    step: int
    elapsed_s: float
    progress: float


@dataclass(frozen=True)
class Step(Event):
    kind = "step"
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    progress: float


@dataclass(frozen=True)
class Eval(Event):
    kind = "eval"
    flatten = "metrics"
    step: int
    metrics: dict[str, Any]
    """The task's validation metrics: always ``val_loss``, plus the task's (``macro_f1``, ``chrf``,
    ``val_ppl``/``val_bpb`` for language modelling, …)."""
    best_val_loss: float
    metric: str
    score: float
    best_score: float
    improved: bool
    tokens: int
    elapsed_s: float

    def with_metrics(self, **more: Any) -> Eval:
        return dataclasses.replace(self, metrics={**self.metrics, **more})


@dataclass(frozen=True)
class Save(Event):
    kind = "save"
    what: str
    """'best', 'step', 'interrupt' or 'merged'."""
    path: str
    step: int

    def as_dict(self) -> dict[str, Any]:
        # Its flat form has said "kind" since the first --json lines: kept for the programs that read them.
        return {"event": self.kind, "kind": self.what, "path": self.path, "step": self.step}


@dataclass(frozen=True)
class Stop(Event):
    kind = "stop"
    reason: str
    step: int
    loss: float | None = None


@dataclass(frozen=True)
class ReportFailed(Event):
    """report.html or the loss curve could not be drawn; the run goes on, and the user is told."""

    kind = "report_failed"
    error: str


KINDS: dict[str, type[Event]] = {cls.kind: cls for cls in Event.__subclasses__()}
"""Every kind of event, by name."""
