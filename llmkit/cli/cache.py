"""``llmkit cache``: the pretrained models imported on their first use (a Hugging Face folder or a
.gguf given where a checkpoint is expected), listed with their sizes, and cleaned.

Each entry is an ordinary llmkit checkpoint in ``$LLMKIT_CACHE/imported`` (``~/.cache/llmkit``),
keyed by the source's content. ``LLMKIT_CACHE_MAX=20G`` bounds the cache: after an import, the least
recently used entries go until it fits.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmkit.cli.options import JsonOpt, opt

app = typer.Typer(no_args_is_help=False, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.callback(invoke_without_command=True)
def cache(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the imported models, most recently used first, with their sizes."""
    if ctx.invoked_subcommand is not None:
        return
    import json
    import time

    from rich.table import Table

    from llmkit.cli.render import err_console, human
    from llmkit.core.interop.resolve import cache_entries, cache_root

    entries = cache_entries()
    if json_out:
        for e in entries:
            print(json.dumps(e, ensure_ascii=False))
        return
    table = Table(title=f"{cache_root()}: {len(entries)} imported model(s), "
                        f"{human(sum(e['bytes'] for e in entries))}B", title_justify="left")  # fmt: skip
    for name in ("entry", "size", "last used", "imported from"):
        table.add_column(name, justify="right" if name == "size" else "left")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["used"]))
        table.add_row(e["name"], f"{human(e['bytes'])}B", used, e["source"])
    err_console().print(table)


@app.command("clean")
def clean(
    keep: Annotated[
        Optional[str],
        opt("Keep the most recently used entries that fit in this size (e.g. 5G) [default: none].", "--keep"),
    ] = None,
) -> None:
    """Remove imported models (all of them, or the least recently used beyond --keep); each is
    imported again on its next use."""
    from llmkit.cli.render import human
    from llmkit.core.interop.resolve import clean_cache, parse_size

    removed = clean_cache(keep_bytes=parse_size(keep) if keep else 0)
    for e in removed:
        typer.echo(f"removed {e['name']} ({human(e['bytes'])}B, from {e['source']})")
    freed = human(sum(e["bytes"] for e in removed))
    typer.echo(f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'} removed, {freed}B freed")
