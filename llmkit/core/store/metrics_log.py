"""``metrics.jsonl``: one JSON line per logged event, appended as the run goes, and read back.

A torn last line (a run killed while appending) is dropped and cut on resume; a damaged line
elsewhere is an error naming it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from llmkit.core import events
from llmkit.core.errors import CheckpointError
from llmkit.core.tasks.metrics import bits_per_byte


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
    """Appends one JSON line per logged event to metrics.jsonl, and keeps the loss curves.

    With ``val_tokens``/``val_bytes`` (language modelling), ``enrich`` gives evaluations their
    perplexity and bits per byte.
    """

    LISTENS: dict[type[events.Event], str] = {
        events.Step: "a row (the loss curve)",
        events.Eval: "a row (the validation curve)",
        events.Save: "a row",
        events.Stop: "a row",
        events.Resume: "a row",
        events.ReportFailed: "a row",
        events.Tick: "skipped: every step; Step carries the same numbers every log_every steps",
        events.Tokenizing: "skipped: progress of the token cache, before the run's log opens",
        events.Start: "skipped: config.yaml holds the budget",
        events.Model: "skipped: config.yaml and trainer_state.json hold the model and its precision",
        events.Corpus: "skipped: before the run's log opens; reports.json holds it",
        events.TokenizerTraining: "skipped: before the run's log opens",
        events.Tokenizer: "skipped: before the run's log opens; reports.json holds its report",
        events.Data: "skipped: before the run's log opens; reports.json holds it",
        events.FinetuneData: "skipped: before the run's log opens",
        events.Recipe: "skipped: before the run's log opens; config.yaml holds the sized model",
        events.Import: "skipped: an import is not a run",
        events.Importing: "skipped: an import is not a run",
    }
    """What the log does with every kind of event (tests/test_events.py checks none is left out)."""

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

    def enrich(self, event: events.Eval) -> events.Eval:
        """An evaluation with perplexity and bits per byte, when the validation text is known."""
        if not self.val_bytes:
            return event
        loss = event.metrics["val_loss"]
        return event.with_metrics(
            val_ppl=math.exp(min(loss, 50)), val_bpb=bits_per_byte(loss, self.val_tokens, self.val_bytes)
        )

    def __call__(self, event: events.Event) -> None:
        if self.LISTENS[type(event)].startswith("skipped"):
            return
        if isinstance(event, events.Eval):
            self.val.append((event.step, event.metrics["val_loss"]))
        elif isinstance(event, events.Step):
            self.train.append((event.step, event.loss))
        data = event.as_dict()
        row = {"event": data.pop("event"), "time": round(time.time(), 3), **data}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
