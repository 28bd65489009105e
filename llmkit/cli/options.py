"""Option types shared by every command, defined once so they behave the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (sections: tokenizer, data, model, optim, train).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.", show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr; results only.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]
