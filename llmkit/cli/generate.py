"""Generate text from a checkpoint: greedy, or sampling with temperature and top-k.

The prompt and its continuation are streamed to stdout as they are decoded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import DeviceOpt, SeedOpt
from llmkit.core.errors import CheckpointError


def generate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy; higher is more random.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).")] = 50,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token (= --temperature 0).")] = False,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
) -> None:
    from llmkit.core.checkpoint import load_model
    from llmkit.core.config import SampleConfig
    from llmkit.core.device import pick_device
    from llmkit.core.generate import Finished, fit_prompt, generate_ids

    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                       top_k=top_k, seed=seed)
    dev = pick_device(device or "auto")
    model, ckpt = load_model(checkpoint, dev)
    if ckpt.kind != "lm":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not a language model")
    tok = ckpt.tokenizer
    ids = tok.encode(prompt) if prompt else [tok.bos_id]
    _, truncated = fit_prompt(ids, model.cfg.context)
    if truncated:
        from llmkit.cli.render import err_console

        err_console().print(f"[yellow]warning:[/] prompt longer than the context ({model.cfg.context} tokens): "
                            "keeping its end", highlight=False)
    sys.stdout.write(prompt)
    new: list[int] = []
    shown = ""
    for t in generate_ids(model, ids, cfg, eos_id=tok.eos_id, device=dev):
        if isinstance(t, Finished):
            break
        new.append(t)
        text = tok.decode(new)
        # Hold back while the text ends inside a multi-byte character split over byte tokens.
        if text.endswith("\ufffd"):
            continue
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
