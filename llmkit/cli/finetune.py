"""Fine-tune a checkpoint: --task classify, instruct, translate, embed (vectors for search) or lm
(continued pretraining).

DATA is JSONL, CSV or TSV (text files for --task lm). Without --val, a fixed share of DATA is held
out for validation. --lora trains low-rank adapters instead of every weight; --freeze-trunk trains
a classification head only. The task, its template and label map are stored in every checkpoint.
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
    opt,
    out_opt,
    relaunch_under_torchrun,
)
from llmkit.core.config import (
    EMBED_LR,
    FINETUNE_DEFAULTS,
    FINETUNE_EPOCHS,
    LARGE_BASE_LR,
    LARGE_BASE_PARAMS,
    LORA_LR,
)
from llmkit.core.config import LoRAConfig as L
from llmkit.core.config import TaskConfig as T
from llmkit.core.errors import ConfigError


def finetune(
    checkpoint: Annotated[
        Path, typer.Argument(help="The checkpoint (or run directory) to start from.", show_default=False)
    ],
    task: Annotated[
        Optional[str], opt("classify, instruct, translate, embed or lm (taken from the run on --resume).", "--task")
    ] = None,
    data: Annotated[
        Optional[list[str]],
        opt("Training data: JSONL/CSV/TSV (text files for lm; repeatable).", "--data", "-d", metavar="FILE"),
    ] = None,
    val: Annotated[
        Optional[Path], opt("Validation file (default: hold out task.val_fraction of --data).", "--val")
    ] = None,
    text_field: Annotated[
        Optional[str], opt("Field or column of the text." + default(T, "text_field"), "--text-field")
    ] = None,
    label_field: Annotated[
        Optional[str], opt("Field or column of the label." + default(T, "label_field"), "--label-field")
    ] = None,
    prompt_field: Annotated[
        Optional[str], opt("Field of the prompt." + default(T, "prompt_field"), "--prompt-field")
    ] = None,
    response_field: Annotated[
        Optional[str], opt("Field of the response." + default(T, "response_field"), "--response-field")
    ] = None,
    src_field: Annotated[
        Optional[str], opt("Field of the source text." + default(T, "src_field"), "--src-field")
    ] = None,
    tgt_field: Annotated[
        Optional[str], opt("Field of the translation." + default(T, "tgt_field"), "--tgt-field")
    ] = None,
    template: Annotated[
        Optional[str], opt("Prompt template, {prompt} marks the input (instruct, translate).", "--template")
    ] = None,
    query_field: Annotated[
        Optional[str], opt("Field of the query (embed)." + default(T, "query_field"), "--query-field")
    ] = None,
    positive_field: Annotated[
        Optional[str],
        opt("Field of the passage that answers it (embed)." + default(T, "positive_field"), "--positive-field"),
    ] = None,
    negative_field: Annotated[
        Optional[str],
        opt("Field of passages that do not, optional (embed)." + default(T, "negative_field"), "--negative-field"),
    ] = None,
    pooling: Annotated[
        Optional[str],
        opt("Classifier or embedding input: last (token) or mean [default: last; mean for embed].", "--pooling"),
    ] = None,
    class_weights: Annotated[
        Optional[str],
        opt("none or balanced (for imbalanced classes)." + default(T, "class_weights"), "--class-weights"),
    ] = None,
    freeze_trunk: Annotated[
        Optional[bool], opt("Train the classification head only (a linear probe).", "--freeze-trunk")
    ] = None,
    mask_prompt: Annotated[
        Optional[bool], opt("Loss on the response only." + default(T, "mask_prompt"), "--mask-prompt/--no-mask-prompt")
    ] = None,
    lora: Annotated[Optional[bool], opt("Train LoRA adapters instead of every weight.", "--lora")] = None,
    lora_rank: Annotated[Optional[int], opt("LoRA rank." + default(L, "rank"), "--lora-rank")] = None,
    lora_alpha: Annotated[
        Optional[float], opt("LoRA alpha; the update is scaled by alpha/rank." + default(L, "alpha"), "--lora-alpha")
    ] = None,
    lora_dropout: Annotated[
        Optional[float], opt("Dropout on the LoRA input." + default(L, "dropout"), "--lora-dropout")
    ] = None,
    lora_targets: Annotated[
        Optional[str], opt("Comma-separated layers to adapt." + default(L, "targets"), "--lora-targets")
    ] = None,
    context: Annotated[Optional[int], opt("Context length for fine-tuning [default: the base's].", "--context")] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Also write OUT/merged: the adapter folded into plain weights.")
    ] = False,
    out: Annotated[Optional[Path], out_opt("runs/NAME-TASK, NAME the checkpoint's folder")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[
        Optional[int], opt("Stop after this many optimizer steps [default: none, --epochs decides].", "--steps")
    ] = None,
    epochs: Annotated[
        Optional[float],
        opt(f"Stop after this many passes over the data [default: {FINETUNE_EPOCHS:g} when no budget].", "--epochs"),
    ] = None,
    time: Annotated[Optional[str], opt("Stop after this much time (e.g. 90s, 10m).", "--time")] = None,
    batch_size: Annotated[
        Optional[int],
        opt(
            f"Examples per micro-batch, per process [default: {FINETUNE_DEFAULTS['train']['batch_size']}].",
            "--batch-size",
        ),
    ] = None,
    global_batch_size: Annotated[
        Optional[int], opt("Examples per optimizer step over all processes.", "--global-batch-size")
    ] = None,
    strategy: Annotated[Optional[str], opt("Under torchrun: ddp (default) or fsdp (sharded).", "--strategy")] = None,
    processes: ProcessesOpt = 1,
    lr: Annotated[
        Optional[float],
        opt(
            f"Peak learning rate [default: {FINETUNE_DEFAULTS['optim']['lr']:g}; {LARGE_BASE_LR:g} for a base of "
            f"{LARGE_BASE_PARAMS / 1e6:.0f}M parameters or more ({EMBED_LR:g} for embed); {LORA_LR:g} with --lora].",
            "--lr",
        ),
    ] = None,
    device: DeviceOpt = None,
    seed: TrainSeedOpt = None,
    resume: Annotated[
        Optional[str], opt("'auto' (the newest checkpoint in --out) or a checkpoint path.", "--resume")
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from llmkit.cli.render import FinetuneView, end_interrupted, print_result, training_view
    from llmkit.core.jobs.finetune import finetune as run_finetune
    from llmkit.core.jobs.finetune import plan

    relaunch_under_torchrun(processes)
    check_positive(steps=steps, batch_size=batch_size, lr=lr, epochs=epochs, context=context)
    if not data:
        raise ConfigError("--data is required: the training examples (JSONL, CSV or TSV; text for --task lm)")
    flags = {
        "task": {
            "kind": task,
            "text_field": text_field,
            "label_field": label_field,
            "prompt_field": prompt_field,
            "response_field": response_field,
            "src_field": src_field,
            "tgt_field": tgt_field,
            "query_field": query_field,
            "positive_field": positive_field,
            "negative_field": negative_field,
            "template": template,
            "pooling": pooling,
            "class_weights": class_weights,
            "freeze_trunk": freeze_trunk,
            "mask_prompt": mask_prompt,
        },
        "lora": {
            "enabled": lora,
            "rank": lora_rank,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "targets": lora_targets,
        },
        "train": {
            "steps": steps,
            "epochs": epochs,
            "time": time,
            "batch_size": batch_size,
            "device": device,
            "seed": seed,
            "global_batch_size": global_batch_size,
            "strategy": strategy,
        },
        "optim": {"lr": lr},
        "model": {"context": context},
    }
    out = out or Path("runs") / f"{Path(checkpoint).name}-{task or 'finetune'}"
    cfg, base, resume_from = plan(checkpoint, out, resume=resume, config_file=config, sets=set_ or [], flags=flags)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    view, main = training_view(FinetuneView, quiet=quiet, json_out=json_out)
    result = run_finetune(data, out, cfg, base=base, val=val, resume_from=resume_from, merge=merge, on_event=view)
    end_interrupted(view, result)
    view.summary(result)
    if main:
        print_result(result, json_out)
