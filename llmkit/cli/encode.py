"""Embeddings from a checkpoint: pooled hidden states of each input item, streamed to a file.

With --query and --index, search a saved index for the nearest items instead (cosine similarity).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import DeviceOpt, JsonOpt, QuietOpt, check_positive
from llmkit.core.config import EXACT_BELOW
from llmkit.core.config import EmbedConfig as E
from llmkit.core.errors import ConfigError, DataError


def encode(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    input: Annotated[
        Optional[str],
        typer.Argument(help="Text file (one item per line), JSONL, CSV/TSV, or - for stdin.", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="The file of vectors (.npy, .safetensors, .jsonl); required unless --query.",
            show_default=False,
        ),
    ] = None,
    field: Annotated[
        Optional[str], typer.Option("--field", help="JSONL field holding the text [default: text].", show_default=False)
    ] = None,
    column: Annotated[
        Optional[str], typer.Option("--column", help="CSV/TSV column holding the text.", show_default=False)
    ] = None,
    pooling: Annotated[
        Optional[str],
        typer.Option(
            "--pooling",
            help=f"mean, last, max or first (over real tokens) [default: an embedding model's own, else {E.pooling}].",
            show_default=False,
        ),
    ] = None,
    layer: Annotated[int, typer.Option("--layer", help="Hidden layer: 0 embeddings … n_layer (= -1) final.")] = E.layer,
    normalize: Annotated[
        Optional[bool],
        typer.Option(
            "--normalize/--no-normalize",
            help="Unit-length vectors [default: yes for an embedding model (finetune --task embed), else no].",
            show_default=False,
        ),
    ] = None,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Truncate items to this many tokens (0: the context).")
    ] = E.max_length,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per forward pass.")] = 32,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored vectors: float32 or float16.")] = E.dtype,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from the rows already written.")
    ] = False,
    query: Annotated[
        Optional[str],
        typer.Option("--query", help="Search --index for the items nearest to this text.", show_default=False),
    ] = None,
    index: Annotated[
        Optional[Path], typer.Option("--index", help="An index written by llmkit encode.", show_default=False)
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Neighbours to show.")] = 5,
    ann: Annotated[
        Optional[bool],
        typer.Option(
            "--ann/--no-ann",
            help=f"Also build an approximate-nearest-neighbour index (OUT.ann) [default: from {EXACT_BELOW:,} items].",
            show_default=False,
        ),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Search: read every vector even where an OUT.ann index exists.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    check_positive(batch_size=batch_size)
    if query is not None:
        if index is None:
            raise ConfigError("--query needs --index (a file written by llmkit encode)")
        _search(checkpoint, query, index, top_k=top_k, json_out=json_out, device=device, exact=exact)
        return
    if input is None or out is None:
        raise ConfigError("give INPUT and -o OUT (or --query with --index to search)")
    given = {"pooling": pooling, "layer": layer, "normalize": normalize, "max_length": max_length, "dtype": dtype}
    E(**{k: v for k, v in given.items() if v is not None})  # a bad value is refused before the model loads
    _encode(
        checkpoint,
        input,
        out,
        given,
        field=field,
        column=column,
        batch_size=batch_size,
        resume=resume,
        quiet=quiet,
        device=device,
        ann=ann,
    )


def _search(
    checkpoint: Path, query: str, index: Path, *, top_k: int, json_out: bool, device: str | None, exact: bool
) -> None:
    """The items of a saved index nearest to ``query``, as a table or JSON lines."""
    from llmkit.core.host.device import pick_device
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.jobs import embed

    found = embed.IndexFile.open(index)  # a bad index fails before the model loads
    dev = pick_device(device or "auto")
    model, ckpt = open_model(checkpoint, dev)
    hits = found.search(model, ckpt, query, top_k, device=dev, exact=True if exact else None)
    if embed.flat_ranking(hits):
        from llmkit.cli.render import err_console

        low, high = min(h[1] for h in hits), max(h[1] for h in hits)
        err_console().print(
            f"[yellow]warning:[/] the {len(hits)} best scores lie within {high - low:.4f} of each other ({low:.4f}–"
            f"{high:.4f}): these vectors barely tell the items apart (docs/encode.md: centring, another --layer, "
            "or a model fine-tuned for retrieval)",
            highlight=False,
        )
    if json_out:
        for rank, (row, score, text) in enumerate(hits, 1):
            print(json.dumps({"rank": rank, "score": round(score, 6), "id": row, "text": text}, ensure_ascii=False))
    else:
        _show_hits(hits)


def _encode(
    checkpoint: Path,
    input: str,
    out: Path,
    given: dict,
    *,
    field: str | None,
    column: str | None,
    batch_size: int,
    resume: bool,
    quiet: bool,
    device: str | None,
    ann: bool | None,
) -> None:
    """Every item of ``input`` as a vector in ``out``, with a progress bar and a closing line; then
    the approximate index when asked, or by default from EXACT_BELOW items."""
    from llmkit.cli.render import err_console
    from llmkit.core.config import embed_settings
    from llmkit.core.host.device import pick_device
    from llmkit.core.interop.resolve import open_model
    from llmkit.core.jobs import embed

    if out.suffix.lower() not in embed.FORMATS:
        raise ConfigError(
            f"output {out}: unsupported extension {out.suffix or '(none)'}; use {', '.join(embed.FORMATS)}"
        )
    if ann and out.suffix.lower() == ".jsonl":
        raise ConfigError("--ann indexes vectors stored in .npy or .safetensors, not .jsonl")
    items = read_items(input, field, column)
    dev = pick_device(device or "auto")
    model, ckpt = open_model(checkpoint, dev)
    settings = embed_settings(ckpt.task, **given)  # an embedding model's own pooling and prefixes
    embed.check_layer(model, settings.layer)
    console = err_console()
    progress = None
    if console.is_terminal and not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]encode[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} items/s"),
            TimeRemainingColumn(),
            console=console,
        )
        progress.start()
        task = progress.add_task("encode", total=items.n, rate="-")
    t0, first = time.perf_counter(), None

    def on_progress(done: int, total: int, truncated: int) -> None:
        nonlocal first
        first = done if first is None else first
        if progress:
            rate = (done - first) / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=done, rate=f"{rate:.1f}")

    try:
        meta = embed.encode_to_file(
            model,
            ckpt.tokenizer,
            items,
            out,
            settings,
            model_id=embed.model_hash(ckpt.path),
            batch_size=batch_size,
            device=dev,
            resume=resume,
            on_progress=on_progress,
        )
    finally:
        if progress:
            progress.stop()
    if not quiet:
        rate = (meta["rows_done"] - (first or 0)) / max(time.perf_counter() - t0, 1e-9)
        cut = settings.max_length or model.cfg.context
        note = f", {meta['truncated']} truncated to {cut} tokens" if meta["truncated"] else ""
        console.print(
            f"{meta['rows_done']} vectors of dimension {meta['dim']} ({settings.pooling} pooling, "
            f"layer {settings.layer}) at {rate:.1f} items/s{note}",
            highlight=False,
        )
    if ann or (ann is None and meta["rows_done"] >= EXACT_BELOW and out.suffix.lower() != ".jsonl"):
        _build_ann(out, resume=resume, quiet=quiet)
    typer.echo(str(out))


def _build_ann(out: Path, *, resume: bool, quiet: bool) -> None:
    from llmkit.cli.render import err_console
    from llmkit.core.jobs import ann, embed

    t0 = time.perf_counter()
    settings = ann.build_index(out, embed.vectors_of(out), resume=resume)
    if not quiet:
        err_console().print(
            f"index {ann.ann_path(out)}: {settings['rows_indexed']} rows in {settings['cells']} cells "
            f"({settings['library']} {settings['index']}, {settings['nprobe']} read per query) in "
            f"{time.perf_counter() - t0:.1f} s",
            highlight=False,
        )


def read_items(spec: str, field: str | None, column: str | None):
    """The input as a lazily read, already validated ItemSource (stdin is read whole: it cannot rewind)."""
    from llmkit.core.jobs.embed import ItemSource

    if spec == "-":
        return ItemSource.from_text(sys.stdin.read(), "stdin", field=field, column=column).scan()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"input not found: {spec}")
    return ItemSource.from_file(path, field=field, column=column).scan()


def _show_hits(hits) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="nearest items", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("id", justify="right")
    table.add_column("text")
    for rank, (row, score, text) in enumerate(hits, 1):
        table.add_row(str(rank), f"{score:.4f}", str(row), escape(text[:200]))
    Console(highlight=False).print(table)
