"""Classify texts with a fine-tuned classifier, or zero-shot with any language model and
--labels: one label per text, with its probability.

Texts come as arguments, or from --input (one per line, JSONL with --field, CSV/TSV with
--column, or - for stdin). Output: one tab-separated line per text (label, probability, text),
or --json objects with every label's probability. With --labels, each label is scored by the
model's likelihood of it after the text put through --template (no training).
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
    require_kind,
)
from llmkit.core.errors import ConfigError


def classify(
    checkpoint: Annotated[Path, typer.Argument(help="A classifier checkpoint or run directory.", show_default=False)],
    texts: Annotated[
        Optional[list[str]], typer.Argument(help="Texts to classify.", show_default=False, metavar="TEXT")
    ] = None,
    input: Annotated[
        Optional[str],
        typer.Option("--input", help="File of texts (lines, JSONL, CSV/TSV) or - for stdin.", show_default=False),
    ] = None,
    field: Annotated[
        Optional[str], typer.Option("--field", help="JSONL field holding the text [default: text].", show_default=False)
    ] = None,
    column: Annotated[
        Optional[str], typer.Option("--column", help="CSV/TSV column holding the text.", show_default=False)
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Labels shown per text (the most likely first).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass.")] = 32,
    labels: Annotated[
        Optional[str],
        typer.Option(
            "--labels", help="Zero-shot: comma-separated labels, scored by the model's likelihood.", show_default=False
        ),
    ] = None,
    template: ZeroShotTemplateOpt = None,
    normalize: ZeroShotNormalizeOpt = "sum",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    from llmkit.cli.encode import read_items
    from llmkit.cli.render import err_console
    from llmkit.core.host.device import pick_device
    from llmkit.core.interop.resolve import open_checkpoint, open_model
    from llmkit.core.tasks.objectives import classify_texts

    check_positive(batch_size=batch_size, top_k=top_k)
    if bool(texts) == (input is not None):
        raise ConfigError("give texts as arguments or --input FILE (one of the two)")
    ckpt = open_checkpoint(checkpoint)
    if labels is None:
        hint = " (or llmkit finetune --task classify, or --labels for zero-shot)"
        require_kind(ckpt, ("classify",), "a classifier", hint=hint)
    elif ckpt.kind == "classify":
        raise ConfigError("--labels scores labels with a language model; this classifier has its own labels")
    items = list(texts) if texts else list(read_items(input, field, column))
    dev = pick_device(device or "auto")
    model, ckpt = open_model(ckpt, dev)
    if labels is None:
        names = ckpt.task.labels
        logits, truncated = classify_texts(
            model, ckpt.tokenizer, items, pooling=ckpt.task.pooling, batch_size=batch_size, device=dev
        )
    else:
        from llmkit.core.tasks.zeroshot import DEFAULT_TEMPLATE, label_scores, parse_labels

        names = parse_labels(labels)
        how = {"template": template or DEFAULT_TEMPLATE, "normalize": normalize}
        logits, truncated = label_scores(model, ckpt.tokenizer, items, list(names), **how, batch_size=batch_size,
                                         device=dev)  # fmt: skip
    labels = names
    probs = logits.softmax(-1)
    k = min(top_k, len(labels))
    for text, row in zip(items, probs.tolist()):
        ranked = sorted(range(len(labels)), key=lambda j: -row[j])
        if json_out:
            print(
                json.dumps(
                    {
                        "text": text,
                        "label": labels[ranked[0]],
                        "prob": round(row[ranked[0]], 6),
                        "probs": {labels[j]: round(row[j], 6) for j in ranked},
                    },
                    ensure_ascii=False,
                )
            )
        else:
            shown = "\t".join(f"{labels[j]}\t{row[j]:.3f}" for j in ranked[:k])
            print(f"{shown}\t{text}")
    if truncated and not quiet:
        err_console().print(
            f"[yellow]warning:[/] {truncated} text(s) longer than the context "
            f"({model.cfg.context} tokens) were truncated",
            highlight=False,
        )
