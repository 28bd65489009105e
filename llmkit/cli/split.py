"""Split a file of examples into train and dev (and test) files: a fixed shuffle, whole groups
with --by (e.g. every question about one article on the same side)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import opt


def split(
    data: Annotated[Path, typer.Argument(help="A JSONL, CSV or TSV file of examples.", show_default=False)],
    dev: Annotated[str, typer.Option("--dev", help="Rows for dev: a count (200) or a share (10%).")] = "10%",
    test: Annotated[str, typer.Option("--test", help="Rows for test, likewise (0: no test file).")] = "0",
    by: Annotated[
        Optional[str], opt("Keep rows sharing this field's value on one side [default: none].", "--by")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffle.")] = 0,
    out: Annotated[Optional[Path], opt("Folder of the outputs [default: the file's folder].", "--out", "-o")] = None,
) -> None:
    from llmkit.cli.render import err_console
    from llmkit.core.text.split import split_file

    written = split_file(data, out or data.parent, dev=dev, test=test, by=by, seed=seed)
    console = err_console()
    for side, (path, n) in written.items():
        console.print(f"{side}: {n} rows → {path}", highlight=False)
        print(path)
