"""Rich rendering on stderr: progress bars, tables and log lines. Results go to stdout elsewhere.

The pretraining view is a listener for core's events. On a terminal it draws a live progress bar;
when stderr is not a terminal it writes one plain line per evaluation instead (useful in CI logs);
with --quiet it draws nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from llmkit.core import events


@functools.cache
def _console(stream_id: int) -> Console:
    return Console(stderr=True, soft_wrap=True)


def err_console() -> Console:
    # A fresh console per stderr object: CliRunner swaps sys.stderr between invocations.
    return _console(id(sys.stderr))


def notice(event) -> None:
    """Core's notices outside a run, one line on stderr (registered by the app: ``events.listen``)."""
    if isinstance(event, events.Importing):
        err_console().print(
            f"importing {escape(event.source)} ({event.size / 1e6:,.0f} MB) into {escape(event.into)}: its first use; "
            "the next ones read it from there (llmkit cache lists and cleans it)",
            highlight=False,
        )


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def tokenizer_report_table(report: dict[str, Any]) -> Table:
    t = Table(title="tokenizer quality", show_header=False, title_justify="left")
    t.add_row(
        "vocab size",
        f"{report['vocab_size']}"
        + (
            f" (asked {report['requested_vocab_size']})"
            if report["requested_vocab_size"] != report["vocab_size"]
            else ""
        ),
    )
    t.add_row("characters per token", f"{report['chars_per_token']:.2f}")
    t.add_row("tokens per word", f"{report['tokens_per_word']:.2f}")
    t.add_row("byte-fallback rate", f"{report['byte_fallback_rate']:.3%}")
    t.add_row("exact round trip", f"{report['round_trip_exact']:.1%} of {report['held_out_lines']} held-out lines")
    sampled = report["training_lines"] + report["held_out_lines"]
    if report.get("corpus_lines", 0) > sampled:
        t.add_row("trained on", f"{sampled:,} lines sampled from {report['corpus_lines']:,} (seeded)")
    return t


class PretrainView:
    """Listener for pretraining events: progress bar, logs, summary."""

    def __init__(self, *, quiet: bool, json_lines: bool):
        self.console = err_console()
        self.quiet, self.json_lines = quiet, json_lines
        self.live = self.console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task = None
        self.fields = {"loss": "-", "val": "-", "tps": "-", "step": "0", "eta": "-:--:--"}
        self.seconds = 0.0  # the time budget, when there is one
        self.steps = 0  # the step budget, when there is one
        self.epochs = (0.0, 0)  # an epoch budget and the steps it makes, when it decides
        # Without a terminal (stderr sent to a log file) there is no bar: a plain line every so often.
        self.every = float(os.environ.get("LLMKIT_PROGRESS_SECONDS", "30"))
        self.last_line = time.monotonic()

    def log(self, message: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else self.console).print(message, highlight=False)

    LISTENS: dict[type[events.Event], str] = {
        events.Corpus: "on_corpus",
        events.Tokenizing: "on_tokenizing",
        events.TokenizerTraining: "on_tokenizer_training",
        events.Tokenizer: "on_tokenizer",
        events.Data: "on_data",
        events.Resume: "on_resume",
        events.Recipe: "on_recipe",
        events.Model: "on_model",
        events.Start: "on_start",
        events.Tick: "on_tick",
        events.Step: "on_step",
        events.Eval: "on_eval",
        events.Stop: "on_stop",
        events.ReportFailed: "on_report_failed",
        events.FinetuneData: "on_finetune_data",
        events.Save: "skipped: checkpoints are named in the run's summary at the end",
        events.Importing: "skipped: a notice, printed by the CLI's notice listener (render.notice)",
        events.Import: "skipped: the import command reports its own result",
    }
    """The handler of every kind of event, or why it is not shown (tests/test_events.py checks all
    kinds are here)."""
    JSON_LINES = (events.Step, events.Eval, events.Save, events.Stop)
    """The kinds --json prints on stdout as they come."""

    def __call__(self, event: events.Event) -> None:
        try:
            if self.json_lines and isinstance(event, self.JSON_LINES):
                print(json.dumps(event.as_dict(), default=str), flush=True)
            handler = self.LISTENS[type(event)]
            if not handler.startswith("skipped"):
                getattr(self, handler)(event.as_dict())
        except (OSError, ValueError):
            # stderr (or stdout) was closed under us: the run matters more than its progress bar.
            # Go quiet for good and let training go on to its checkpoints.
            if self.progress:
                with contextlib.suppress(Exception):
                    self.progress.stop()
            self.progress, self.quiet, self.live, self.json_lines = None, True, False, False

    def _eta(self, d) -> str:
        """Time left: the budget's own deadline when it is a time budget; else from the pace so far."""
        p, elapsed = d.get("progress", 0.0), d.get("elapsed_s", 0.0)
        if self.seconds:
            left = self.seconds - elapsed
            if p > 0 and elapsed > 0:  # a step budget may end first
                left = min(left, elapsed * (1 - p) / p)
        elif p > 0:
            left = elapsed * (1 - p) / p
        else:
            return "-:--:--"
        left = max(int(left), 0)
        return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"

    def on_corpus(self, d):
        if d["sample"]:
            self.log(f"[cyan]no corpus given: training on the bundled French sample[/] ({len(d['files'])} files)")
        elif d.get("sources"):
            self.log(
                "corpus: "
                + ", ".join(f"{escape(s['name'])} ({s['files']} file(s), weight {s['weight']:g})" for s in d["sources"])
            )
        else:
            self.log(f"corpus: {len(d['files'])} file(s)")
        if d.get("val"):
            self.log(f"validation: {len(d['val'])} file(s) held out (--val)")

    def on_tokenizing(self, d):
        """Building the token cache: a bar in MB with the rate and the time left."""
        if not self.live:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]tokenizing[/] {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(escape(d["source"]), total=d["total"])
        self.progress.update(self.task, completed=d["done"], total=d["total"], description=escape(d["source"]))

    def on_tokenizer_training(self, d):
        self.log(f"training a {d['model_type']} tokenizer (vocab {d['vocab_size']}) …")

    def on_tokenizer(self, d):
        if d["source"] == "trained":
            r = d["report"]
            for w in r["warnings"]:
                self.log(f"[yellow]warning:[/] {escape(w)}")
            sampled = r["training_lines"] + r["held_out_lines"]
            if r.get("corpus_lines", 0) > sampled:
                self.log(f"tokenizer sample: {sampled:,} of the corpus's {r['corpus_lines']:,} lines (seeded)")
            self.log(
                f"tokenizer: vocab {r['vocab_size']}, {r['chars_per_token']:.2f} chars/token, "
                f"round trip {r['round_trip_exact']:.1%} → {d['path']}"
            )
        else:
            self.log(f"tokenizer: {d['source']} (vocab {d['vocab_size']})")

    def on_data(self, d):
        if self.progress is not None:  # the tokenizing bar ends here
            self.progress.stop()
            self.progress = None
        for why in d.get("rebuilt") or []:
            self.log(f"[yellow]warning:[/] a damaged token cache was rebuilt ({escape(why)})")
        dupes = f", {d['duplicates']} duplicate(s) dropped" if d.get("duplicates") else ""
        self.log(
            f"data: {d['documents']} documents{dupes}, {human(d['chars'])} chars, "
            f"{human(d['train_tokens'])} train / {human(d['val_tokens'])} val tokens"
            f"{' (cached)' if d['cached'] else ''}"
        )
        for name, src in (d.get("sources") or {}).items():
            self.log(
                f"  {escape(name)}: weight {src['weight']:g}, {src['documents']} documents, "
                f"{human(src['train_tokens'])} train / {human(src['val_tokens'])} val tokens"
            )

    def on_resume(self, d):
        self.log(f"[cyan]resuming[/] from {d['path']} at step {d['step']}; budget: {d['budget']}")

    def on_recipe(self, d):
        self.log(f"sized to the budget: [bold]{d['reason']}[/]")

    def on_model(self, d):
        self.epochs = (d.get("epochs") or 0.0, d.get("epoch_steps") or 0)
        compiled = ", compiled" if d.get("compiled") else ""
        self.log(
            f"model: {human(d['params'])} parameters on {d['device']}, "
            f"precision [bold]{d['precision']}[/]{compiled} ({d['precision_reason']})"
        )
        if d.get("device") == "cpu" and d.get("threads"):
            busy = "fewer" in d.get("threads_reason", "")
            self.log(
                f"{'[yellow]busy machine:[/] ' if busy else ''}{d['threads']} CPU thread(s) ({d['threads_reason']})"
            )
        if d.get("recompute"):
            self.log(f"recomputing activations in the backward pass ({d['recompute_reason']})")

    def on_start(self, d):
        self.seconds, self.steps = d.get("seconds") or 0.0, d.get("steps") or 0
        self.last_line = time.monotonic()
        if self.seconds:
            self.fields["eta"] = self._eta({"elapsed_s": 0.0, "progress": 0.0})
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("left {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=1000, **self.fields)

    def on_tick(self, d):
        """Every optimizer step: move the bar by time, not only at logged steps; without a terminal,
        a plain progress line every ``LLMKIT_PROGRESS_SECONDS`` (30) seconds."""
        self.fields.update(step=str(d["step"]), eta=self._eta(d))
        if self.progress:
            self.progress.update(self.task, completed=1000 * min(d["progress"], 1.0), **self.fields)
        elif not self.live and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            of = f"/{self.steps}" if self.steps else ""
            f = self.fields
            self.log(f"step {d['step']}{of}: loss {f['loss']}, {f['tps']} tok/s, {d['progress']:.0%} done, "
                     f"left {f['eta']}")  # fmt: skip

    def on_step(self, d):
        self.fields.update(loss=f"{d['loss']:.3f}", tps=human(d["tokens_per_s"]))
        self.on_tick(d)

    def on_eval(self, d):
        self.fields["val"] = f"{d['val_loss']:.3f}"
        mark = " [green]best[/]" if d["improved"] else ""
        se = d.get("val_loss_se")
        spread = f" ± {se:.4f}" if se is not None else ""
        line = (
            f"step {d['step']}: val loss {d['val_loss']:.4f}{spread}, ppl {d.get('val_ppl', math.nan):.2f}, "
            f"bpb {d.get('val_bpb', math.nan):.3f}{mark}"
        )
        if d.get("val_sources"):
            line += " (" + ", ".join(f"{escape(k)} {v:.4f}" for k, v in d["val_sources"].items()) + ")"
        if self.progress:
            self.progress.update(self.task, **self.fields)
            self.progress.console.print(line, highlight=False)
        elif not self.quiet:
            self.console.print(f"{line} (loss {self.fields['loss']}, {self.fields['tps']} tok/s)", highlight=False)

    def on_report_failed(self, d):
        self.log(f"[yellow]warning:[/] report.html or the loss curve could not be drawn: {escape(d['error'])}")

    def on_finetune_data(self, d):
        """Pretraining has no fine-tuning data; ``FinetuneView`` shows it."""

    def on_stop(self, d):
        if self.progress:
            self.progress.stop()
            self.progress = None
        why = {
            "steps": "step budget reached",
            "time": "time budget reached",
            "early_stop": "early stopping",
            "diverged": "loss diverged",
            "interrupted": "interrupted",
            "terminated": "terminated (SIGTERM)",
        }.get(d["reason"], d["reason"])
        epochs, epoch_steps = self.epochs
        if d["reason"] == "steps" and epochs and d["step"] >= epoch_steps:  # the epochs made the step budget
            why = f"{epochs:g} epoch{'s' if epochs != 1 else ''} done ({epoch_steps} steps)"
        self.log(f"stopped at step {d['step']}: {why}")


def classification_tables(report: dict[str, Any]) -> tuple[Table, Table]:
    """Per-class precision/recall/F1 and the confusion matrix (rows gold, columns predicted)."""
    labels = report["labels"]
    scores = Table(title="per class", title_justify="left")
    for name in ("label", "precision", "recall", "F1", "support"):
        scores.add_column(name, justify="left" if name == "label" else "right")
    for label in labels:
        s = report["per_class"][label]
        scores.add_row(
            escape(label), f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", str(s["support"])
        )
    # Columns are numbered, rows carry the numbers and the whole labels: long labels are never cut.
    confusion = Table(title="confusion (rows true, columns predicted)", title_justify="left")
    confusion.add_column("true label")
    for j in range(len(labels)):
        confusion.add_column(str(j + 1), justify="right")
    for i, row in enumerate(report["confusion"]):
        confusion.add_row(
            f"{i + 1} {escape(labels[i])}",
            *(f"[bold green]{n}[/]" if i == j and n else (str(n) if n else "[dim]·[/]") for j, n in enumerate(row)),
        )
    return scores, confusion


def metric_line(d: dict[str, Any]) -> str:
    """The headline figures of an evaluation, whatever the task."""
    parts = [f"val loss {d['val_loss']:.4f}"]
    if "val_bpb" in d:
        parts.append(f"ppl {d['val_ppl']:.2f}, bpb {d['val_bpb']:.3f}")
    for key, name, fmt in (
        ("accuracy", "accuracy", "{:.3f}"),
        ("macro_f1", "macro-F1", "{:.3f}"),
        ("chrf", "chrF", "{:.2f}"),
        ("bleu", "BLEU", "{:.2f}"),
        ("exact_match", "exact match", "{:.1f}"),
        ("token_f1", "token F1", "{:.1f}"),
        ("recall@1", "recall@1", "{:.3f}"),
        ("mrr@10", "MRR@10", "{:.3f}"),
        ("ndcg@10", "nDCG@10", "{:.3f}"),
    ):
        if key in d:
            parts.append(f"{name} {fmt.format(d[key])}")
    return ", ".join(parts)


class FinetuneView(PretrainView):
    """Pretraining's view, plus the task's data summary, metrics, tables and samples."""

    def on_finetune_data(self, d):
        if d["kind"] == "lm":
            self.log(
                f"data: {d['documents']} documents, {human(d['train_tokens'])} train / "
                f"{human(d['val_tokens'])} val tokens"
            )
            return
        self.log(f"data: {d['train']} training examples, {d['val']} validation ({escape(d['val_source'])})")
        if d.get("labels"):
            self.log("labels: " + ", ".join(f"{escape(k)} ({n})" for k, n in d["labels"].items()))
        if d.get("template"):
            self.log(f"template: {escape(repr(d['template']))}")
        if d["kind"] == "embed":
            negatives = f", {d['negatives']} hard negatives" if d["negatives"] else ", in-batch negatives only"
            self.log(f"retrieval: validation searches {d['corpus']} distinct passages{negatives}")
        if d["blank"]:
            self.log(f"[yellow]warning:[/] skipped {d['blank']} blank row(s)")
        if d.get("truncated"):
            n = d["train"] + d["val"]
            self.log(
                f"[yellow]warning:[/] {d['truncated']} example(s) longer than the context were truncated "
                f"({d['truncated'] / max(n, 1):.0%} of {n}, context {d['context']} tokens)"
            )
            if d["truncated"] >= 0.05 * n:
                self.log(
                    f"  a context of {d['fits_95']} tokens fits 95% of them ({d['fits_all']} fits all): "
                    "fine-tune with --context N (positions past the base's context were never trained, "
                    "so expect a weaker start there), or shorten the examples"
                )
        if d.get("unseen"):
            total = sum(d["unseen"].values())
            names = ", ".join(escape(k) for k in list(d["unseen"])[:5])
            self.log(
                f"[yellow]warning:[/] {total} validation example(s) have labels unseen in training "
                f"({names}); they are left out of the scores"
            )

    def on_model(self, d):
        super().on_model(d)
        if "trainable" in d:
            share = d["trainable"] / max(d["params"], 1)
            self.log(
                f"training {human(d['trainable'])} parameters ({share:.2%})" + (" with LoRA" if d.get("lora") else "")
            )

    def on_eval(self, d):
        self.fields["val"] = f"{d['val_loss']:.3f}"
        mark = " [green]best[/]" if d["improved"] else ""
        line = f"step {d['step']}: {metric_line(d)}{mark}"
        printer = self.progress.console if self.progress else self.console
        if self.progress:
            self.progress.update(self.task, **self.fields)
        if self.quiet:
            return
        printer.print(line, highlight=False)
        if "confusion" in d:
            for table in classification_tables(d):
                printer.print(table)
        for s in d.get("samples", []):
            printer.print(sample_block(s["prompt"][-80:], s["output"][:160], arrow=True), highlight=False)

    def summary(self, result) -> None:
        if self.quiet:
            return
        st = result.state
        if result.best_metrics:
            metric = result.best_metrics["metric"]
            self.log(f"best at step {st.best_step} by {metric}: {metric_line(result.best_metrics)}")
        elif st.best_score is not None:
            self.log(f"best at step {st.best_step}: score {st.best_score:.4f} (no improvement in this session)")
        pictures = [str(result.out / n) for n in ("loss.svg", "report.html") if (result.out / n).is_file()]
        self.log(
            f"{st.step} steps"
            + (f"; {', '.join(pictures)}" if pictures else "")
            + (f"; merged weights: {result.merged}" if result.merged else "")
        )


def eval_tables(report: dict[str, Any], *, show: int = 0) -> list[Table]:
    """The tables of ``llmkit eval``: the headline metrics, then per-task detail."""
    title = f"{report['task']} · {escape(report['checkpoint'])}"
    t = Table(title=title, title_justify="left", show_header=False, min_width=len(title))
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("examples", "examples", "{}"),
        ("tokens", "tokens", "{:,}"),
        ("loss", "loss", "{:.4f}"),
        ("perplexity", "perplexity", "{:.2f}"),
        ("bits_per_byte", "bits per byte", "{:.4f}"),
        ("accuracy", "accuracy", "{:.4f}"),
        ("macro_f1", "macro-F1", "{:.4f}"),
        ("chrf", "chrF", "{:.2f}"),
        ("bleu", "BLEU", "{:.2f}"),
        ("exact_match", "exact match (%)", "{:.2f}"),
        ("token_f1", "token F1 (%)", "{:.2f}"),
        ("queries", "queries", "{:,}"),
        ("corpus", "passages searched", "{:,}"),
        ("recall@1", "recall@1", "{:.4f}"),
        ("recall@10", "recall@10", "{:.4f}"),
        ("mrr@10", "MRR@10", "{:.4f}"),
        ("ndcg@10", "nDCG@10", "{:.4f}"),
        ("spread@10", "score spread, top 1 to 10", "{:.4f}"),
    ]
    for key, name, fmt in rows:
        if key in report:
            t.add_row(name, fmt.format(report[key]))
    tables = [t]
    if report.get("per_file"):  # several files: each one's share
        f = Table(title="per file", title_justify="left")
        f.add_column("file")
        keys = [(k, name, fmt) for k, name, fmt in rows if k in next(iter(report["per_file"].values()))]
        for _, name, _ in keys:
            f.add_column(name, justify="right")
        for file, scores in report["per_file"].items():
            f.add_row(escape(file), *(fmt.format(scores[k]) for k, _, fmt in keys))
        tables.append(f)
    if "confusion" in report:
        tables.extend(classification_tables(report))
    if show and report.get("outputs"):
        o = Table(title="outputs", title_justify="left")
        for name in ("prompt", "output", "reference"):
            o.add_column(name)
        for row in report["outputs"][:show]:
            o.add_row(escape(row["prompt"][-120:]), escape(row["output"]), escape(row["reference"]))
        tables.append(o)
    return tables


def sample_block(prompt: str, text: str, *, arrow: bool = False) -> str:
    """A generated sample as the reader will read it: the prompt dimmed, then the text, its own
    line breaks kept and indented under the first line."""
    sep = " → " if arrow else ""
    body = f"[dim]{escape(prompt)}[/]{sep}{escape(text.strip() if arrow else text)}"
    return "  " + body.replace("\n", "\n    ")


def print_result(result, json_out: bool) -> None:
    """stdout's last word on a run: the checkpoint to use next, or with --json one ``result``
    event that sums the run up (the stream of step/eval/save/stop events ends with it)."""
    use = result.merged or result.best or result.last or result.out
    if not json_out:
        print(use, flush=True)
        return
    st = result.state
    row = {
        "event": "result",
        "checkpoint": str(use),
        "out": str(result.out),
        "best": result.best,
        "last": result.last,
        "merged": result.merged,
        "stop_reason": result.stop_reason,
        "steps": st.step,
        "tokens": st.tokens_seen,
        "elapsed_s": round(st.elapsed_s, 3),
        "best_step": st.best_step,
        "best_val_loss": st.best_val_loss if math.isfinite(st.best_val_loss) else None,
        "best_score": st.best_score,
        "params": result.params,
        "trainable": result.trainable,
        "precision": result.precision,
        "samples": [{"prompt": p, "text": t} for p, t in result.samples],
    }
    if result.best_metrics:
        row["best_metrics"] = {k: v for k, v in result.best_metrics.items() if k not in ("samples", "confusion")}
    print(json.dumps(row, default=str, ensure_ascii=False), flush=True)


def training_view(cls, *, quiet: bool, json_out: bool):
    """The progress view of a pretraining or fine-tuning command; under torchrun rank 0 alone
    speaks for the job. Returns (view, whether this process is rank 0)."""
    from llmkit.core.training.distributed import env_rank

    main = env_rank() == 0
    return cls(quiet=quiet or not main, json_lines=json_out and main), main


def end_interrupted(view, result) -> None:
    """A run stopped by Ctrl-C or SIGTERM has written its checkpoint: say how to go on, and exit as
    the signal's convention says (130 for SIGINT, 143 for SIGTERM)."""
    if result.stop_reason in ("interrupted", "terminated"):
        import typer

        what = "interrupted" if result.stop_reason == "interrupted" else "terminated (SIGTERM)"
        view.log(f"[yellow]{what}[/] at step {result.state.step}: checkpoint written; continue with --resume auto")
        raise typer.Exit(130 if result.stop_reason == "interrupted" else 143)
