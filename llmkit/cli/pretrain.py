"""Pretrain a decoder-only transformer by next-token prediction.

CORPUS is files, directories or globs: UTF-8 text, JSON lines (--text-field) or parquet, any of
the first two compressed (.gz, .zst); without one, llmkit trains on its bundled French sample.
--mix PATH=WEIGHT (repeatable) mixes several sources by weight; --val FILE holds out a set of its
own. A tokenizer is trained into the run directory unless --tokenizer is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import (
    ConfigOpt,
    DeviceOpt,
    JsonOpt,
    ProcessesOpt,
    QuietOpt,
    SetOpt,
    TrainSeedOpt,
    check_positive,
    default,
    out_opt,
    preset_default,
    relaunch_under_torchrun,
)
from llmkit.core.config import DataConfig, TrainConfig
from llmkit.core.training.recipe import SHAPE_KEYS


def given_keys(sets: list[str], flags: dict) -> frozenset[str]:
    """The "section.key" settings a user gave on the command line (--set, and flags not left out)."""
    keys = {item.split("=", 1)[0].strip() for item in sets}
    keys |= {f"{section}.{k}" for section, values in flags.items() for k, v in values.items() if v is not None}
    return frozenset(keys)


def pretrain(
    corpus: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Files, directories or globs (default: the bundled sample).", show_default=False, metavar="CORPUS"
        ),
    ] = None,
    mix: Annotated[
        Optional[list[str]],
        typer.Option(
            "--mix",
            help="A source and its weight, PATH=WEIGHT (repeatable; weights sum to 1).",
            show_default=False,
            metavar="PATH=WEIGHT",
        ),
    ] = None,
    val: Annotated[
        Optional[list[str]],
        typer.Option(
            "--val",
            help="Validation files (repeatable), instead of each document's tail.",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    text_field: Annotated[
        Optional[str],
        typer.Option(
            "--text-field",
            help="The text's field in JSON lines, or column in parquet." + default(DataConfig, "text_field"),
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers", help="Processes that tokenize the corpus (default: one per core).", show_default=False
        ),
    ] = None,
    out: Annotated[Optional[Path], out_opt("runs/PRESET, or runs/auto when sized to the budget")] = None,
    preset: Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            help="Model preset: tiny, small or base (default: sized to --time or --tokens when given, else tiny).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option("--tokenizer", help="Use this tokenizer instead of training one.", show_default=False),
    ] = None,
    init: Annotated[
        Optional[Path],
        typer.Option(
            "--init",
            help="Continue pretraining this checkpoint or pretrained model (folder, .gguf): its network and tokenizer.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(
            "--steps",
            help="Stop after this many optimizer steps" + preset_default("train", "steps"),
            show_default=False,
        ),
    ] = None,
    tokens: Annotated[
        Optional[str],
        typer.Option("--tokens", help="Stop after this many training tokens (e.g. 5M).", show_default=False),
    ] = None,
    time: Annotated[
        Optional[str], typer.Option("--time", help="Stop after this much time (e.g. 90s, 10m, 1h).", show_default=False)
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            help="Sequences per micro-batch (per process)" + preset_default("train", "batch_size"),
            show_default=False,
        ),
    ] = None,
    global_batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--global-batch-size",
            help="Sequences per optimizer step over all processes; micro-batches accumulate to reach it.",
            show_default=False,
        ),
    ] = None,
    strategy: Annotated[
        Optional[str],
        typer.Option("--strategy", help="Under torchrun: ddp (default) or fsdp (sharded).", show_default=False),
    ] = None,
    processes: ProcessesOpt = 1,
    lr: Annotated[
        Optional[float],
        typer.Option("--lr", help="Peak learning rate" + preset_default("optim", "lr"), show_default=False),
    ] = None,
    device: DeviceOpt = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="auto, fp32, bf16 or fp16." + default(TrainConfig, "dtype"), show_default=False),
    ] = None,
    seed: TrainSeedOpt = None,
    resume: Annotated[
        Optional[str],
        typer.Option(
            "--resume", help="'auto' (the newest checkpoint in --out) or a checkpoint path.", show_default=False
        ),
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from llmkit.cli.render import PretrainView, end_interrupted, print_result, sample_block, training_view
    from llmkit.core.jobs.pretrain import plan

    relaunch_under_torchrun(processes)
    check_positive(steps=steps, batch_size=batch_size, lr=lr)
    flags = {
        "train": {
            "steps": steps,
            "tokens": tokens,
            "time": time,
            "batch_size": batch_size,
            "global_batch_size": global_batch_size,
            "strategy": strategy,
            "device": device,
            "dtype": dtype,
            "seed": seed,
        },
        "optim": {"lr": lr},
        "data": {
            "sources": tuple(mix) if mix else None,
            "val": tuple(val) if val else None,
            "text_field": text_field,
            "workers": workers,
        },
    }
    # No preset but a time or token budget: the model is sized to it (core/training/recipe.py), unless
    # the model's shape is already given (--set model.d_model and the like, a config file) or comes
    # from --init. Architecture options (--set model.mlp=relu2) are kept on the sized shape.
    given = given_keys(set_ or [], flags)
    sized = (
        preset is None
        and bool(time or tokens)
        and init is None
        and config is None
        and not any(k in SHAPE_KEYS for k in given)
    )
    name = "auto" if sized else (preset or "tiny")
    out = out or Path("runs") / name
    # The config the run will use: with --resume, the resumed run's own, with what is given on top.
    cfg, resume_from = plan(
        out, resume=resume, preset=None if sized else name, config_file=config, sets=set_ or [], flags=flags, init=init
    )
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return

    from llmkit.core.jobs.pretrain import pretrain as run_pretrain

    view, main = training_view(PretrainView, quiet=quiet, json_out=json_out)
    quiet = view.quiet
    result = run_pretrain(
        corpus,
        out,
        cfg,
        resume_from=resume_from,
        tokenizer_dir=tokenizer,
        on_event=view,
        budget_sized=given if sized else None,
    )
    end_interrupted(view, result)
    if not quiet and result.samples:
        view.log("[bold]samples[/] (from best/):")
        for prompt, text in result.samples:
            view.log(sample_block(prompt, text))
    if not quiet:
        best = f"best val loss {result.state.best_val_loss:.4f} at step {result.state.best_step}"
        pictures = [str(out / n) for n in ("loss.svg", "report.html") if (out / n).is_file()]
        view.log(
            f"{result.params:,} parameters, {result.state.step} steps, {best}"
            + (f"; {', '.join(pictures)}" if pictures else "")
        )
    if main:
        print_result(result, json_out)
