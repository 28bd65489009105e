"""Rich rendering on stderr: progress bars, tables and log lines. Results go to stdout elsewhere.

The pretraining view is a listener for core's events. On a terminal it draws a live progress bar;
when stderr is not a terminal it writes one plain line per evaluation instead (useful in CI logs);
with --quiet it draws nothing.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


@functools.lru_cache(maxsize=None)
def _console(stream_id: int) -> Console:
    return Console(stderr=True, soft_wrap=True)


def err_console() -> Console:
    # A fresh console per stderr object: CliRunner swaps sys.stderr between invocations.
    return _console(id(sys.stderr))


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def tokenizer_report_table(report: dict[str, Any]) -> Table:
    t = Table(title="tokenizer quality", show_header=False, title_justify="left")
    t.add_row("vocab size", f"{report['vocab_size']}" + (
        f" (asked {report['requested_vocab_size']})" if report["requested_vocab_size"] != report["vocab_size"] else ""))
    t.add_row("characters per token", f"{report['chars_per_token']:.2f}")
    t.add_row("tokens per word", f"{report['tokens_per_word']:.2f}")
    t.add_row("byte-fallback rate", f"{report['byte_fallback_rate']:.3%}")
    t.add_row("exact round trip", f"{report['round_trip_exact']:.1%} of {report['held_out_lines']} held-out lines")
    return t


class PretrainView:
    """Listener for pretraining events: progress bar, logs, summary."""

    def __init__(self, *, quiet: bool, json_lines: bool):
        self.console = err_console()
        self.quiet, self.json_lines = quiet, json_lines
        self.live = self.console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task = None
        self.fields = {"loss": "-", "val": "-", "tps": "-", "step": "0"}

    def log(self, message: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else self.console).print(message, highlight=False)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if self.json_lines and kind in ("step", "eval", "save", "stop"):
            print(json.dumps({"event": kind, **data}, default=str), flush=True)
        handler = getattr(self, f"on_{kind}", None)
        if handler:
            handler(data)

    def on_corpus(self, d):
        if d["sample"]:
            self.log("[cyan]no corpus given: training on the bundled French sample[/] "
                     f"({len(d['files'])} files)")
        else:
            self.log(f"corpus: {len(d['files'])} file(s)")

    def on_tokenizer_training(self, d):
        self.log(f"training a {d['model_type']} tokenizer (vocab {d['vocab_size']}) …")

    def on_tokenizer(self, d):
        if d["source"] == "trained":
            r = d["report"]
            for w in r["warnings"]:
                self.log(f"[yellow]warning:[/] {escape(w)}")
            self.log(f"tokenizer: vocab {r['vocab_size']}, {r['chars_per_token']:.2f} chars/token, "
                     f"round trip {r['round_trip_exact']:.1%} → {d['path']}")
        else:
            self.log(f"tokenizer: {d['source']} (vocab {d['vocab_size']})")

    def on_data(self, d):
        self.log(f"data: {d['documents']} documents, {human(d['chars'])} chars, "
                 f"{human(d['train_tokens'])} train / {human(d['val_tokens'])} val tokens"
                 f"{' (cached)' if d['cached'] else ''}")

    def on_resume(self, d):
        self.log(f"[cyan]resuming[/] from {d['path']} at step {d['step']}")

    def on_model(self, d):
        self.log(f"model: {human(d['params'])} parameters on {d['device']}, "
                 f"precision [bold]{d['precision']}[/] ({d['precision_reason']})")

    def on_start(self, d):
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=1000, **self.fields)

    def on_step(self, d):
        self.fields.update(loss=f"{d['loss']:.3f}", tps=human(d["tokens_per_s"]), step=str(d["step"]))
        if self.progress:
            self.progress.update(self.task, completed=1000 * min(d["progress"], 1.0), **self.fields)

    def on_eval(self, d):
        self.fields["val"] = f"{d['val_loss']:.3f}"
        mark = " [green]best[/]" if d["improved"] else ""
        line = (f"step {d['step']}: val loss {d['val_loss']:.4f}, ppl {d.get('val_ppl', math.nan):.2f}, "
                f"bpb {d.get('val_bpb', math.nan):.3f}{mark}")
        if self.progress:
            self.progress.update(self.task, **self.fields)
            self.progress.console.print(line, highlight=False)
        elif not self.quiet:
            self.console.print(f"{line} (loss {self.fields['loss']}, {self.fields['tps']} tok/s)", highlight=False)

    def on_stop(self, d):
        if self.progress:
            self.progress.stop()
            self.progress = None
        why = {"steps": "step budget reached", "time": "time budget reached", "early_stop": "early stopping",
               "diverged": "loss diverged", "interrupted": "interrupted"}.get(d["reason"], d["reason"])
        self.log(f"stopped at step {d['step']}: {why}")
