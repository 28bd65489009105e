"""Generate text from a checkpoint: greedy, sampling, penalties, beam search, stop strings, and
structured outputs (--choices, --regex, --json-schema, --json-object).

One prompt streams its continuation to stdout as it is decoded; many prompts (--prompt-file or
stdin) are decoded in batches. On an instruct or translate checkpoint each prompt goes through the
checkpoint's template and only the response is printed (--raw sends prompts as they are); a
translate checkpoint decodes greedily unless sampling options are given. --json writes one object
per output; --show-probs shows each token's probability and the alternatives; --interactive opens
a prompt loop.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmkit.cli.options import DeviceOpt, JsonOpt, QuietOpt, SampleSeedOpt, check_quantize, default, opt, require_kind
from llmkit.core.config import SampleConfig as S
from llmkit.core.errors import DataError


def generate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint or run directory.", show_default=False)],
    prompt: Annotated[Optional[str], opt("Text to continue.", "--prompt", "-p")] = None,
    prompt_file: Annotated[Optional[Path], opt("One prompt per line, or JSONL (see --field).", "--prompt-file")] = None,
    field: Annotated[str, typer.Option("--field", help="JSONL field holding the prompt.")] = "prompt",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")
    ] = S.max_new_tokens,
    temperature: Annotated[
        Optional[float], opt("Randomness: 0 is greedy." + default(S, "temperature"), "--temperature", "-t")
    ] = None,
    top_k: Annotated[
        Optional[int], opt("Sample among the k most likely tokens; 0: all." + default(S, "top_k"), "--top-k")
    ] = None,
    top_p: Annotated[
        Optional[float], opt("Nucleus: smallest set of tokens with this probability." + default(S, "top_p"), "--top-p")
    ] = None,
    min_p: Annotated[
        Optional[float], opt("Drop tokens under min-p × the top token's probability." + default(S, "min_p"), "--min-p")
    ] = None,
    repetition_penalty: Annotated[
        Optional[float],
        opt("> 1 discourages tokens already present." + default(S, "repetition_penalty"), "--repetition-penalty"),
    ] = None,
    presence_penalty: Annotated[
        Optional[float],
        opt("Subtract from tokens already present." + default(S, "presence_penalty"), "--presence-penalty"),
    ] = None,
    frequency_penalty: Annotated[
        Optional[float],
        opt("Subtract per previous occurrence." + default(S, "frequency_penalty"), "--frequency-penalty"),
    ] = None,
    no_repeat_ngram: Annotated[
        Optional[int],
        opt("Never repeat an n-gram of this size; 0: off." + default(S, "no_repeat_ngram"), "--no-repeat-ngram"),
    ] = None,
    num_beams: Annotated[
        Optional[int], opt("Beam search with this many beams." + default(S, "num_beams"), "--num-beams")
    ] = None,
    length_penalty: Annotated[
        Optional[float],
        opt("Beam score / length**this; > 1 favours long." + default(S, "length_penalty"), "--length-penalty"),
    ] = None,
    early_stopping: Annotated[
        Optional[bool],
        opt(
            "Stop beam search once num-beams hypotheses ended." + default(S, "early_stopping"),
            "--early-stopping/--no-early-stopping",
        ),
    ] = None,
    stop: Annotated[
        Optional[list[str]], opt("End the output before this text (repeatable).", "--stop", metavar="TEXT")
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Always take the most likely token (= --temperature 0).")
    ] = False,
    num_samples: Annotated[
        Optional[int], opt("Outputs per prompt." + default(S, "num_samples"), "--num-samples")
    ] = None,
    batch_size: Annotated[
        Optional[int], opt("Prompts decoded together." + default(S, "batch_size"), "--batch-size")
    ] = None,
    seed: SampleSeedOpt = None,
    show_probs: Annotated[
        bool, typer.Option("--show-probs", help="Table of each token's probability and the top alternatives.")
    ] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="A prompt loop in the terminal.")] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Do not apply an instruct/translate checkpoint's prompt template.")
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help=(
                "Put each prompt through the model's own chat template (pretrained chat models; --interactive "
                "does it by itself)."
            ),
        ),
    ] = False,
    lookup: Annotated[
        Optional[int],
        opt(
            "Prompt lookup: guess tokens by matching the last n-gram (up to n) earlier in the text; greedy only; "
            "0: off." + default(S, "lookup"),
            "--lookup",
        ),
    ] = None,
    draft: Annotated[
        Optional[str],
        opt(
            "Speculative decoding: a smaller checkpoint with the same tokenizer guesses ahead, or int8: the "
            "model's own int8 twin does (exact output, for large models); greedy only.",
            "--draft",
        ),
    ] = None,
    draft_tokens: Annotated[
        Optional[int],
        opt("Tokens guessed per pass (--draft, --lookup)." + default(S, "draft_tokens"), "--draft-tokens"),
    ] = None,
    quantize: Annotated[
        Optional[str],
        opt(
            "int8: int8 weight-only linear layers (faster on CPUs with bf16 units; perplexity moves slightly: "
            "docs/generate.md).",
            "--quantize",
        ),
    ] = None,
    choices: Annotated[
        Optional[str],
        opt("Answer with exactly one of these: A|B|C, or @FILE with one choice per line.", "--choices"),
    ] = None,
    regex: Annotated[Optional[str], opt("Answer with a match of this regular expression.", "--regex")] = None,
    json_schema: Annotated[
        Optional[Path], opt("Answer with JSON that fits this JSON schema (a file).", "--json-schema")
    ] = None,
    json_object: Annotated[bool, typer.Option("--json-object", help="Answer with a JSON object (any).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
) -> None:
    from llmkit.cli.generate_run import GenerateView
    from llmkit.cli.render import err_console
    from llmkit.core.config import sample_config
    from llmkit.core.decoding.decoder import Decoder, Prompts
    from llmkit.core.errors import ConfigError
    from llmkit.core.host.device import pick_device
    from llmkit.core.interop.resolve import open_checkpoint, open_model

    ckpt = open_checkpoint(checkpoint)  # a bad path fails before any prompt is read
    require_kind(ckpt, ("lm", "instruct", "translate"), "a language model")
    sampling = (temperature, top_k, top_p, min_p, num_samples)
    if ckpt.kind == "translate" and not greedy and all(v is None for v in sampling):
        greedy = True  # a translation is wanted, not a draw: decode greedily unless asked otherwise
    cfg = sample_config(
        {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0 if greedy else temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "no_repeat_ngram": no_repeat_ngram,
            "num_beams": num_beams,
            "length_penalty": length_penalty,
            "early_stopping": early_stopping,
            "stop": tuple(stop) if stop else None,
            "seed": seed,
            "num_samples": num_samples,
            "batch_size": batch_size,
            "lookup": lookup,
            "draft_tokens": draft_tokens,
        }
    )
    check_quantize(quantize)
    from llmkit.core.decoding.structure import from_options

    structure = from_options(choices, regex, json_schema, json_object)  # a bad schema fails before the model loads
    prompts = None if interactive else _prompts(prompt, prompt_file, field)
    dev = pick_device(device or "auto")
    model, ckpt = open_model(ckpt, dev)
    draft_model = None
    if draft == "int8":  # the model's int8 twin guesses, the model checks: its exact output
        if quantize == "int8":
            raise ConfigError(
                "--draft int8: the model is int8 already (--quantize int8); its twin would "
                "guess no faster than it checks"
            )
        if Path(draft).exists():
            raise ConfigError("--draft int8: ambiguous, a path int8 exists here; write ./int8 for that checkpoint")
        from llmkit.core.model.quantize import int8_copy

        draft_model = int8_copy(model)
    elif draft is not None:
        draft_ckpt = open_checkpoint(Path(draft))
        require_kind(draft_ckpt, ("lm", "instruct", "translate"), "a language model (--draft)")
        draft_model, _ = open_model(draft_ckpt, dev)
    if quantize == "int8":
        from llmkit.core.model.quantize import quantize_int8

        model = quantize_int8(model)
        draft_model = quantize_int8(draft_model) if draft_model is not None else None
    # A pretrained chat model talks in its own format when asked, or in a session with no task template.
    use_chat = not raw and (chat or (interactive and not ckpt.task.uses_template))
    if chat and not (use_chat and ckpt.tokenizer.chat_template):
        raise ConfigError(f"--chat: {ckpt.path} has no chat template")
    template = None if raw else Prompts.template_for(ckpt.task, ckpt.tokenizer, chat=use_chat)
    view = GenerateView(
        Decoder(model, ckpt.tokenizer, cfg, dev, template=template, draft=draft_model, structure=structure),
        console=err_console(),
        quiet=quiet,
    )
    if interactive:
        view.interactive()
    else:
        view.run(prompts, json_out=json_out, show_probs=show_probs)


def _prompts(prompt: str | None, prompt_file: Path | None, field: str) -> list[str]:
    if prompt is not None and prompt_file is not None:
        raise DataError("give --prompt or --prompt-file, not both")
    from llmkit.core.files.records import read_prompts
    from llmkit.core.text.tokenizer import check_text

    if prompt is not None:
        check_text(prompt)  # bytes that were not UTF-8 are refused before anything is printed
        return [prompt]
    if prompt_file is not None:
        from llmkit.core.files.corpus import read_text

        return read_prompts(read_text(prompt_file), str(prompt_file), field)
    if sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read()
        if text.strip():  # an empty or closed stdin means no prompt, as in a terminal
            check_text(text)
            return read_prompts(text, "stdin", field)
    return [""]  # no prompt at all: generate from the beginning-of-text token
