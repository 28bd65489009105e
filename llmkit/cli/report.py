"""Write a run's report.html: one self-contained page (settings, tokenizer, curves, evaluations,
confusion matrix, samples, checkpoints, every logged number) that opens offline in any browser.
Training writes it by itself (train.report); this command rewrites it, e.g. for an older run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    run: Annotated[Path, typer.Argument(help="A run directory (with metrics.jsonl).", show_default=False)],
) -> None:
    from llmkit.core.errors import ConfigError
    from llmkit.core.jobs.report import write_report

    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run} is not a run directory (no metrics.jsonl)")
    typer.echo(str(write_report(run)))
