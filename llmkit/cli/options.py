"""What every command shares, defined once so it behaves the same everywhere: option types, the
option helper, help text defaults taken from the config dataclasses, markup escaping, and which
command fits which kind of checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config", "-c", help="YAML config file (sections: tokenizer, data, model, optim, train).", show_default=False
    ),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", "-s", help="Override one key: section.key=value (repeatable).", show_default=False, metavar="KEY=VALUE"
    ),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps [default: auto].", show_default=False)
]
TrainSeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed [default: 1337].", show_default=False)]
SampleSeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Random seed [default: a fresh one each run].", show_default=False)
]


def out_opt(default: str):
    """``--out``/``-o`` whose help names the default the command uses."""
    return typer.Option("--out", "-o", help=f"Output directory [default: {default}].", show_default=False)


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr; results only.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]


def opt(help: str, *names: str, metavar: str | None = None):
    """An option whose help says its default itself (or has none worth showing)."""
    return typer.Option(*names, help=help, show_default=False, metavar=metavar)


def default(cls: type, name: str) -> str:
    """' [default: X]' for a help text, X read from the dataclass field: never repeated by hand."""
    from llmkit.core.config import default_of

    value = default_of(cls, name)
    if isinstance(value, tuple):
        value = ",".join(value) if value else "none"
    elif isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f" [default: {value}]"


def preset_default(section: str, key: str, preset: str = "tiny") -> str:
    """' [default: the preset's; tiny: X]' for a setting a preset gives (read from the preset file)."""
    from llmkit.core.config import load_preset

    return f" [default: the preset's; {preset}: {load_preset(preset)[section][key]:g}]"


def escape(text: str) -> str:
    """Text shown through rich markup, with its own brackets kept literal."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def check_quantize(value: str | None) -> None:
    """--quantize (generate, serve): int8 or nothing."""
    if value not in (None, "int8"):
        from llmkit.core.errors import ConfigError

        raise ConfigError(f"--quantize: the choice is int8, not {value!r}")


def check_positive(*, allow_zero: tuple[str, ...] = (), **given) -> None:
    """Refuse a flag given as zero or less (or below zero, for the names in ``allow_zero``):
    ``check_positive(steps=...)`` names it ``--steps``. The one check every command uses."""
    from llmkit.core.errors import ConfigError

    for name, value in given.items():
        zero_ok = name in allow_zero
        if value is not None and (value < 0 if zero_ok else value <= 0):
            rule = "must not be negative" if zero_ok else "must be positive"
            raise ConfigError(f"--{name.replace('_', '-')} {rule}, not {value}")


COMMAND_FOR_KIND = {
    "lm": "llmkit generate",
    "instruct": "llmkit generate",
    "translate": "llmkit generate",
    "classify": "llmkit classify (or llmkit encode for its embeddings)",
    "embed": "llmkit encode (and llmkit encode --query to search what it wrote)",
}
"""The command that uses a checkpoint of each kind, for refusals that say where to go instead."""


def require_kind(ckpt, kinds: tuple[str, ...], what: str, hint: str = "") -> None:
    """Refuse a checkpoint of another kind, naming the command that fits it (and ``hint``)."""
    from llmkit.core.errors import CheckpointError

    if ckpt.kind not in kinds:
        fits = COMMAND_FOR_KIND.get(ckpt.kind, "the command for that task")
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not {what}: use {fits}{hint}")


ProcessesOpt = Annotated[
    int,
    typer.Option(
        "--processes",
        help="Train with N processes on this machine: llmkit launches torchrun itself (1: no torchrun).",
    ),
]


def relaunch_under_torchrun(processes: int) -> None:
    """``--processes N`` > 1 outside torchrun: run the same command under torchrun, exit with its
    code. Inside torchrun (or with N = 1) nothing happens; N given under torchrun is refused."""
    import os

    from llmkit.core.errors import ConfigError

    check_positive(processes=processes)
    if processes == 1:
        return
    if os.environ.get("WORLD_SIZE"):
        raise ConfigError("--processes launches torchrun itself: under torchrun, leave it out")
    from llmkit.cli import app
    from llmkit.cli.launch import launch

    raise typer.Exit(launch(processes, app.ARGV))


ZeroShotTemplateOpt = Annotated[
    Optional[str],
    typer.Option(
        "--template",
        help="Zero-shot prompt: {text}, and {label} at its end [default: 'Texte : {text}\\nCatégorie : {label}'].",
        show_default=False,
    ),
]
ZeroShotNormalizeOpt = Annotated[
    str, typer.Option("--normalize", help="Zero-shot scores per label: sum, char or token of log-probabilities.")
]
