"""Measure a checkpoint on a file, with its own task's metrics.

Language model on text: loss, perplexity, bits per byte. Classifier: accuracy, macro-F1, per-class
scores and confusion matrix. Translator: chrF and BLEU. Instruct model: exact match and token F1
(extractive question answering). A table, or --json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ZeroShotNormalizeOpt,
    ZeroShotTemplateOpt,
    check_positive,
    opt,
)


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    data: Annotated[
        list[str],
        typer.Argument(
            help="Text files (language model) or JSONL/CSV/TSV files of examples (measured together, and each apart).",
            show_default=False,
            metavar="DATA",
        ),
    ],
    text_field: Annotated[
        Optional[str], opt("Field of the text [default: the one the checkpoint was trained with].", "--text-field")
    ] = None,
    label_field: Annotated[
        Optional[str], opt("Field of the label [default: the one the checkpoint was trained with].", "--label-field")
    ] = None,
    prompt_field: Annotated[
        Optional[str], opt("Field of the prompt [default: the one the checkpoint was trained with].", "--prompt-field")
    ] = None,
    response_field: Annotated[
        Optional[str],
        opt("Field of the response [default: the one the checkpoint was trained with].", "--response-field"),
    ] = None,
    src_field: Annotated[
        Optional[str],
        opt("Field of the source text [default: the one the checkpoint was trained with].", "--src-field"),
    ] = None,
    tgt_field: Annotated[
        Optional[str],
        opt("Field of the reference translation [default: the one the checkpoint was trained with].", "--tgt-field"),
    ] = None,
    query_field: Annotated[
        Optional[str], opt("Field of the query [default: the one the checkpoint was trained with].", "--query-field")
    ] = None,
    positive_field: Annotated[
        Optional[str],
        opt("Field of the relevant passage [default: the one the checkpoint was trained with].", "--positive-field"),
    ] = None,
    retrieval: Annotated[
        bool,
        typer.Option(
            "--retrieval", help="Measure a language model as an encoder: search the pairs' passages for each query."
        ),
    ] = False,
    center: Annotated[
        bool, typer.Option("--center", help="Retrieval: remove the corpus mean from the vectors before cosine.")
    ] = False,
    corpus: Annotated[
        Optional[list[Path]],
        opt(
            "Retrieval: more passages to search, one per line (or JSONL 'text'); repeatable [default: none].",
            "--corpus",
            metavar="FILE",
        ),
    ] = None,
    pooling: Annotated[
        Optional[str],
        opt("Retrieval: mean or last [default: an embedding model's own; mean for a language model].", "--pooling"),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Measure the first N examples only (0: all).")] = 0,
    show: Annotated[int, typer.Option("--show", help="Print this many outputs beside their references.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 16,
    outputs: Annotated[
        Optional[Path],
        opt(
            "Write each generated output (translate, instruct) to this JSONL file as it is decoded [default: none].",
            "--outputs",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an evaluation stopped half-way from its --outputs file.")
    ] = False,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads (0: one per free core).")] = 0,
    labels: Annotated[
        Optional[str],
        opt("Zero-shot: measure a language model as a classifier of these comma-separated labels.", "--labels"),
    ] = None,
    template: ZeroShotTemplateOpt = None,
    normalize: ZeroShotNormalizeOpt = "sum",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    from llmkit.cli.render import err_console, eval_tables
    from llmkit.core.errors import ConfigError
    from llmkit.core.host.device import pick_device, set_threads
    from llmkit.core.jobs.evaluate import evaluate_checkpoint
    from llmkit.core.tasks.zeroshot import DEFAULT_TEMPLATE, parse_labels

    check_positive(
        batch_size=batch_size, limit=limit, show=show, threads=threads, allow_zero=("limit", "show", "threads")
    )
    if resume and outputs is None:
        raise ConfigError("--resume continues an evaluation from its --outputs file: name it")
    set_threads(threads)
    console = err_console()
    fields = {
        "text_field": text_field,
        "label_field": label_field,
        "prompt_field": prompt_field,
        "response_field": response_field,
        "src_field": src_field,
        "tgt_field": tgt_field,
        "query_field": query_field,
        "positive_field": positive_field,
    }
    wants_retrieval = retrieval or center or corpus or pooling
    if wants_retrieval and labels is not None:
        raise ConfigError("--labels (zero-shot classification) and retrieval options measure different things")
    report = evaluate_checkpoint(
        checkpoint,
        data,
        fields=fields,
        batch_size=batch_size,
        limit=limit,
        device=pick_device(device or "auto"),
        outputs=outputs,
        resume=resume,
        zero_shot=None
        if labels is None
        else {
            "labels": parse_labels(labels),
            "template": template or DEFAULT_TEMPLATE,
            "normalize": normalize,
        },  # fmt: skip
        retrieval={"center": center, "corpus": corpus, "pooling": pooling} if wants_retrieval else None,
        on_progress=lambda s: None if quiet else console.print(f"[dim]{s} …[/]"),
    )
    if json_out:
        print(json.dumps(report, ensure_ascii=False))
        return
    from rich.console import Console

    out = Console(highlight=False)
    for table in eval_tables(report, show=show):
        out.print(table)
    if not quiet:
        for key, what in (("blank", "blank row(s) skipped"), ("truncated", "example(s) truncated to the context")):
            if report.get(key):
                console.print(f"[yellow]warning:[/] {report[key]} {what}", highlight=False)
        if report.get("unseen"):
            console.print(
                f"[yellow]warning:[/] {sum(report['unseen'].values())} example(s) with labels the "
                f"classifier does not know were left out ({', '.join(report['unseen'])})",
                highlight=False,
            )
