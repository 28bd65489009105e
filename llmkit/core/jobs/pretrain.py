"""Pretraining end to end: corpus -> tokenizer -> token cache -> model, then the shared run driver.

This module owns what is particular to pretraining: resolving its config (a preset, or the run
being resumed), the tokenizer (trained into ``runs/NAME/tokenizer/``, given, or the resumed
run's), the token cache, a fresh model, and the sample lines written from best/ at the end.
The run directory, checkpoints, resume and the loop belong to ``core/jobs/run.py`` and
``core/training/loop.py``. Progress goes out through ``on_event(event)`` (``core/events.py``); nothing here prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.core import events
from llmkit.core.config import SECTIONS, RunConfig, SampleConfig, load_preset, resolve_run_config
from llmkit.core.decoding.steps import decode_batch, row_seed
from llmkit.core.errors import ConfigError
from llmkit.core.events import EventFn
from llmkit.core.interop.resolve import open_checkpoint
from llmkit.core.jobs.run import (
    RunResult,
    check_launch,
    check_same_model,
    main_only,
    start_process,
    train_run,
    with_epoch_budget,
)
from llmkit.core.model.transformer import Transformer
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.lock import run_lock
from llmkit.core.store.rundir import new_run_dir, resume_source
from llmkit.core.tasks.objectives import LMTask
from llmkit.core.text.mix import Corpus, check_fits, load_corpus, plan_sources
from llmkit.core.text.token_cache import Source
from llmkit.core.text.tokenizer import Tokenizer, check_compatible, train_on_files
from llmkit.core.training import recipe, speed


def plan(
    out: Path,
    *,
    resume: str | None,
    preset: str | None,
    config_file: Path | None,
    sets: list[str],
    flags: Mapping[str, Mapping[str, Any]],
    init: Path | None = None,
) -> tuple[RunConfig, Path | None]:
    """Resolve the run config and the checkpoint to resume from (if any).

    On resume the saved config is the base, so a bare ``--resume auto`` continues the very run;
    a config file, --set or flags given alongside still apply (e.g. a larger --steps). With
    ``init`` (continued pretraining of any checkpoint or pretrained model), the network and its
    tokenizer are that checkpoint's; the preset still gives the training recipe.
    """
    resume_from = resume_source(out, resume)
    if resume_from is not None:
        saved = ckpt_io.read_checkpoint(resume_from).config
        base = {k: v for k, v in saved.items() if k in SECTIONS}
        cfg = resolve_run_config(base=base, config_file=config_file, sets=sets, flags=flags)
    elif init is not None:
        start = open_checkpoint(init)
        recipe = {k: v for k, v in (load_preset(preset) if preset else {}).items() if k not in ("model", "tokenizer")}
        base = {
            **recipe,
            "model": start.config["model"],
            "tokenizer": start.config.get("tokenizer", {}),
            "task": {"init_from": str(start.path)},
        }
        cfg = resolve_run_config(base=base, config_file=config_file, sets=sets, flags=flags)
    else:
        cfg = resolve_run_config(preset=preset, config_file=config_file, sets=sets, flags=flags)
    if not cfg.train.has_budget:
        raise ConfigError("no stopping budget: give --steps, --tokens or --time (or train.steps in the config)")
    if cfg.task.kind != "lm":
        raise ConfigError(
            f"task.kind is {cfg.task.kind!r}: pretraining is next-token prediction (kind lm); "
            "use llmkit finetune for other tasks"
        )
    check_launch(cfg)
    return cfg, resume_from


def _given_tokenizer(tokenizer_dir: Path | None, resume_from: Path | None, on_event: EventFn) -> Tokenizer | None:
    """The checkpoint's tokenizer on resume (a --tokenizer must then match it), else --tokenizer's."""
    if resume_from is not None:
        tok = Tokenizer.load(resume_from)
        if tokenizer_dir is not None:
            check_compatible(tok.contract, Tokenizer.load(tokenizer_dir).contract, what=f"--tokenizer {tokenizer_dir}")
        return tok
    if tokenizer_dir is not None:
        tok = Tokenizer.load(tokenizer_dir)
        on_event(events.Tokenizer(source=str(tokenizer_dir), vocab_size=tok.vocab_size))
        return tok
    return None


def _initial(init: Path, cfg: RunConfig, device) -> Transformer:
    """The network continued pretraining starts from: the checkpoint's weights (LoRA merged, any
    classification head left out), in the run's model config (its context and dropout)."""
    start = open_checkpoint(init)
    model = ckpt_io.build_model(start, device, merge=True, model_cfg=cfg.model)
    if hasattr(model, "cls_head"):
        del model.cls_head
    return model


def _sample_prompts(data: Corpus, tok: Tokenizer, n: int) -> list[list[int]]:
    """A few prompts taken from validation line starts: the first 3 tokens after a line break."""
    val = np.asarray(data.val[: min(data.val.size, 200_000)])
    starts = np.flatnonzero(val == tok.newline_id) + 1
    starts = [s for s in starts.tolist() if s + 3 < val.size and tok.newline_id not in val[s : s + 3]]
    if not starts:
        return [[tok.bos_id]] * n
    picks = np.linspace(0, len(starts) - 1, num=n).astype(int)
    return [val[starts[i] : starts[i] + 3].astype(np.int64).tolist() for i in picks]


def write_samples(
    model: Transformer, tok: Tokenizer, prompts: list[list[int]], device, seed: int, max_new_tokens: int = 40
) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs sampled in one batch, each row with its own seed."""
    model.eval()
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50)
    outs = decode_batch(
        model,
        prompts,
        cfg,
        eos_id=tok.eos_id,
        decode=tok.decode,
        device=device,
        seeds=[row_seed(seed, i) for i in range(len(prompts))],
    )
    return [(tok.decode(p), o.text) for p, o in zip(prompts, outs)]


def _prepare(
    cfg: RunConfig,
    out: Path,
    sources: list[Source],
    val: Source | None,
    sample: bool,
    tokenizer_dir: Path | None,
    resume_from: Path | None,
    on_event: EventFn,
) -> tuple[Tokenizer, Corpus, RunConfig, dict[str, Any]]:
    """Tokenizer and token cache for a run; the model config takes the tokenizer's vocab size. The
    last item holds the data report (and the tokenizer's, when one was trained) for report.html."""
    reports: dict[str, Any] = {}
    tok = _given_tokenizer(tokenizer_dir, resume_from, on_event)
    files = [cf for s in sources for cf in s.files]
    on_event(
        events.Corpus(
            files=[str(cf.path) for cf in files],
            sample=sample,
            sources=[{"name": s.name, "weight": s.weight, "files": len(s.files)} for s in sources]
            if len(sources) > 1
            else [],
            val=[str(cf.path) for cf in val.files] if val else [],
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    if tok is None:
        on_event(events.TokenizerTraining(vocab_size=cfg.tokenizer.vocab_size, model_type=cfg.tokenizer.model_type))
        tok, report = train_on_files(files, cfg.tokenizer, text_field=cfg.data.text_field, seed=cfg.train.seed)
        tok.save(out / "tokenizer")
        on_event(
            events.Tokenizer(
                source="trained", path=str(out / "tokenizer"), report=report.as_dict(), vocab_size=tok.vocab_size
            )
        )
        reports["tokenizer"] = report.as_dict()
    data = load_corpus(
        sources,
        val,
        tok,
        cfg.data,
        on_progress=lambda p: on_event(events.Tokenizing(done=p.done, total=p.total, source=p.name)),
    )
    reports["data"] = data.report()
    on_event(events.Data(report=reports["data"]))
    if cfg.model.vocab_size and cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if not cfg.model.vocab_size:
        cfg = cfg.replace("model", vocab_size=tok.vocab_size)
    check_fits(data, cfg.model.context)
    return tok, data, cfg, reports


def size_to_budget(cfg: RunConfig, vocab: int, data: Corpus, given: frozenset[str], on_event: EventFn) -> RunConfig:
    """The budget-sized recipe (core/training/recipe.py) applied to a fresh single-process CPU run."""
    sizing = recipe.size_for_budget(
        cfg, vocab, seconds=cfg.train.time_s or None, tokens=cfg.train.tokens or None, rate=speed.eager_rate
    )
    cfg = recipe.apply(cfg, sizing, given)
    levers = recipe.levers_in(cfg)
    reason = sizing.reason() + (f"; trained with {levers}" if levers else "")
    on_event(events.Recipe(shape=sizing.shape.name, reason=reason, table=sizing.table))
    check_fits(data, cfg.model.context)
    return cfg


def pretrain(
    corpus: list[str] | None,
    out: Path,
    cfg: RunConfig,
    *,
    resume_from: Path | None = None,
    tokenizer_dir: Path | None = None,
    on_event: EventFn = events.ignore,
    budget_sized: frozenset[str] | None = None,
) -> RunResult:
    """Run (or resume) a pretraining run in ``out``; see the module docstring for what it writes.

    ``budget_sized`` (the "section.key" settings the user gave) asks for the model to be sized to
    the run's budget (core/training/recipe.py) once the tokenizer is known: a fresh run on one CPU process.

    Under torchrun each process calls this; rank 0 trains the tokenizer and builds the token cache
    while the others wait, then every process trains on its share of each global batch."""
    dist, device, threads = start_process(cfg)
    on_event = main_only(on_event, dist)
    init = Path(cfg.task.init_from) if cfg.task.init_from and resume_from is None else None
    if init is not None and tokenizer_dir is None:
        tokenizer_dir = init  # continued pretraining keeps the model's own tokenizer
    sources, val, sample = plan_sources(corpus, cfg.data)  # files found and checked before any output
    with run_lock(out, dist):
        with new_run_dir(out, dist):
            if dist.is_main:
                tok, data, cfg, reports = _prepare(cfg, out, sources, val, sample, tokenizer_dir, resume_from, on_event)
            dist.barrier()
            if not dist.is_main:  # the tokenizer rank 0 trained or was given; the cache it built
                given = tokenizer_dir or (None if resume_from else out / "tokenizer")
                tok, data, cfg, reports = _prepare(cfg, out, sources, val, sample, given, resume_from, on_event)
            if budget_sized is not None and resume_from is None and init is None:
                if dist.enabled or device.type != "cpu":
                    raise ConfigError(
                        "sizing the model to the budget is for one CPU process: give --preset "
                        "(tiny, small, base) under torchrun or on a GPU"
                    )
                cfg = size_to_budget(cfg, tok.vocab_size, data, budget_sized, on_event)
            cfg = with_epoch_budget(cfg, data.train_tokens / cfg.model.context, dist.world)
            torch.manual_seed(cfg.train.seed)
            model = Transformer(cfg.model).to(device) if init is None else _initial(init, cfg, device)
            if resume_from is not None:
                check_same_model(resume_from, ckpt_io.read_checkpoint(resume_from).model_cfg, cfg.model)
                ckpt_io.load_weights(model, resume_from)

        result = train_run(
            out,
            cfg,
            model=model,
            task=LMTask(data, cfg, device),
            tokenizer=tok,
            dist=dist,
            device=device,
            resume_from=resume_from,
            threads=threads,
            kind="lm",
            on_event=on_event,
            val_tokens=data.val_tokens,
            val_bytes=data.val_bytes,
            reports=reports,
        )
        stopped_by_signal = result.stop_reason in ("interrupted", "terminated")
        if dist.is_main and cfg.train.samples and result.best is not None and not stopped_by_signal:
            trained, _ = ckpt_io.load_model(result.best, device)
            prompts = _sample_prompts(data, tok, cfg.train.samples)
            result.samples = write_samples(trained, tok, prompts, device, cfg.train.seed)
    return result
