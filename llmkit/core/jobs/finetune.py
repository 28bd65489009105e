"""Fine-tuning a checkpoint end to end: task data -> model (+ head, + LoRA) -> fit -> checkpoints.

Tasks: ``classify`` (a head on the pooled hidden state), ``instruct`` and ``translate``
(prompt -> response through a template, loss on the response), ``lm`` (continued pretraining on
text), ``embed`` (query -> passage pairs, contrastive: vectors for search). Full fine-tuning, a
frozen trunk (linear probe) or LoRA adapters. The run directory is the same as pretraining's
(core/jobs/run.py), and every checkpoint carries the task, its template and label map, so
``generate``, ``classify``, ``encode`` and ``eval`` need no flags to use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llmkit.core import events
from llmkit.core.config import (
    EMBED_LR,
    EMBED_PREFIXES,
    FINETUNE_DEFAULTS,
    FINETUNE_EPOCHS,
    LARGE_BASE_LR,
    LARGE_BASE_PARAMS,
    LORA_LR,
    SECTIONS,
    RunConfig,
    resolve_run_config,
)
from llmkit.core.errors import ConfigError, DataError
from llmkit.core.events import EventFn
from llmkit.core.interop.resolve import open_checkpoint
from llmkit.core.jobs.run import (
    RunResult,
    check_launch,
    check_same_model,
    epoch_steps,
    main_first,
    main_only,
    start_process,
    train_run,
    with_epoch_budget,
)
from llmkit.core.model.heads import attach_classifier
from llmkit.core.model.lora import apply_lora
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.store.lock import run_lock
from llmkit.core.store.rundir import new_run_dir, resume_source
from llmkit.core.tasks.objectives import ClassifyTask, LMTask, PairTask, balanced_weights
from llmkit.core.tasks.retrieval import EmbedTask
from llmkit.core.text.examples import (
    ExampleSet,
    classify_ids,
    context_report,
    drop_unseen,
    holdout,
    label_map,
    pair_sequence,
    read_examples,
)
from llmkit.core.text.mix import check_fits, load_corpus, plan_sources
from llmkit.core.text.tokenizer import check_compatible
from llmkit.core.training import recipe


def plan(
    checkpoint: Path,
    out: Path,
    *,
    resume: str | None,
    config_file: Path | None,
    sets: list[str],
    flags: Mapping[str, Mapping[str, Any]],
) -> tuple[RunConfig, ckpt_io.Checkpoint, Path | None]:
    """The run config, the checkpoint fine-tuning starts from, and the one to resume (if any)."""
    base = open_checkpoint(checkpoint)
    if not flags.get("task", {}).get("kind") and resume is None:
        raise ConfigError("--task is required: classify, instruct, translate, embed or lm")
    resume_from = resume_source(out, resume)
    layers: dict[str, Any] = {k: base.config[k] for k in ("tokenizer", "data", "model") if k in base.config}
    if resume_from is not None:
        saved = ckpt_io.read_checkpoint(resume_from)
        check_compatible(base.tokenizer.contract, saved.tokenizer.contract, what=f"the tokenizer of {resume_from}")
        asked = flags.get("task", {}).get("kind")
        if asked and asked != saved.kind:
            raise ConfigError(f"--task {asked} does not match the run being resumed ({saved.kind})")
        layers = {k: v for k, v in saved.config.items() if k in SECTIONS}
    else:
        layers.update({k: dict(v) for k, v in FINETUNE_DEFAULTS.items()})

    def defaults(cfg: RunConfig) -> dict[str, dict[str, Any]]:
        """A new run's defaults that depend on the user's choices (which always win over them)."""
        if resume_from is not None:
            return {}
        chat = cfg.task.kind == "instruct" and base.tokenizer.chat_template  # a chat model keeps its format
        large = recipe.params(base.model_cfg) >= LARGE_BASE_PARAMS  # a pretrained model's gentler rate
        # An embedding run pools the mean of the real tokens (a decoder's last token has read the
        # whole text, but its state is shaped to predict the next token, not to sum the text up).
        embed = {"pooling": "mean", **EMBED_PREFIXES} if cfg.task.kind == "embed" else {}
        if cfg.lora.enabled:
            optim = {"lr": LORA_LR}
        elif large:
            optim = {"lr": EMBED_LR if embed else LARGE_BASE_LR}
        else:
            optim = {}
        return {
            "optim": optim,
            "train": {} if cfg.train.has_budget else {"epochs": FINETUNE_EPOCHS},
            "task": {"init_from": str(base.path), **({"template": "chat"} if chat else {}), **embed},
        }

    cfg = resolve_run_config(base=layers, config_file=config_file, sets=sets, flags=flags, defaults=defaults)
    weighted = [
        k
        for k in cfg.model.__dataclass_fields__
        if k not in ("context", "dropout") and getattr(cfg.model, k) != getattr(base.model_cfg, k)
    ]
    if weighted and resume_from is None:
        raise ConfigError(
            f"model.{weighted[0]} differs from the base checkpoint's: fine-tuning keeps the base's "
            "network (only model.context and model.dropout can change)"
        )
    if cfg.task.kind != "classify" and cfg.task.freeze_trunk:
        raise ConfigError("--freeze-trunk trains a classification head only: it needs --task classify")
    check_launch(cfg)
    return cfg, base, resume_from


def _split(cfg: RunConfig, data: Path, val: Path | None) -> tuple[ExampleSet, ExampleSet, str]:
    train = read_examples(data, cfg.task)
    if val is not None:
        return train, read_examples(val, cfg.task), str(val)
    train, dev = holdout(train, cfg.task.val_fraction, cfg.train.seed)
    return train, dev, f"{len(dev.examples)} examples held out of {data} (task.val_fraction {cfg.task.val_fraction})"


def build_task(cfg: RunConfig, tok, data: list[str], val: Path | None, device) -> tuple[Any, RunConfig, dict[str, Any]]:
    """The task object for ``fit``, the config completed from the data (label map), and a summary
    of the data for the user (counts of examples, skipped, truncated, unseen labels)."""
    context = cfg.model.context
    if cfg.task.kind == "lm":
        if val is not None:
            raise ConfigError(
                "--val is not used by --task lm: the tail of each document is held out (data.val_fraction)"
            )
        sources, held, _ = plan_sources(data, cfg.data)
        corpus = load_corpus(sources, held, tok, cfg.data)
        check_fits(corpus, context)
        summary = {
            k: v
            for k, v in corpus.report().items()
            if k in ("documents", "duplicates", "train_tokens", "val_tokens", "val_bytes")
        }
        return LMTask(corpus, cfg, device), cfg, {"kind": "lm", **summary}
    if len(data) != 1:
        raise ConfigError(f"--task {cfg.task.kind} reads one --data file (got {len(data)})")
    train, dev, val_source = _split(cfg, Path(data[0]), val)
    summary: dict[str, Any] = {
        "kind": cfg.task.kind,
        "train": len(train.examples),
        "val_source": val_source,
        "blank": train.blank + dev.blank,
    }
    if cfg.task.kind == "classify":
        labels = cfg.task.labels or label_map(train)
        unknown = sorted({e.label for e in train.examples} - set(labels))
        if unknown:
            raise DataError(f"{train.path}: label {unknown[0]!r} is not in the checkpoint's label map")
        dev, unseen = drop_unseen(dev, labels)
        index = {label: i for i, label in enumerate(labels)}
        rows, lengths = zip(*(classify_ids(tok, e.text, context) for e in train.examples))
        dev_rows, dev_lengths = zip(*(classify_ids(tok, e.text, context) for e in dev.examples))
        y = [index[e.label] for e in train.examples]
        weights = balanced_weights(y, len(labels)) if cfg.task.class_weights == "balanced" else None
        cfg = cfg.replace("task", labels=tuple(labels))
        counts = Counter(e.label for e in train.examples)
        summary.update(
            val=len(dev.examples),
            labels={lab: counts[lab] for lab in labels},
            unseen=dict(unseen),
            **context_report([*lengths, *dev_lengths], context),
            context=context,
        )
        task = ClassifyTask(
            (list(rows), y), (list(dev_rows), [index[e.label] for e in dev.examples]), labels, cfg, device, weights
        )
        return task, cfg, summary
    if cfg.task.kind == "embed":
        task = EmbedTask(train.examples, dev.examples, cfg, tok, device)
        summary.update(
            val=len(dev.examples),
            corpus=len(task.dev.corpus),
            negatives=sum(len(e.negatives) for e in train.examples),
            context=context,
            **context_report(task.lengths, context),  # the passages: the long side of a pair
        )
        return task, cfg, summary
    template = cfg.task.prompt_template
    seqs = [pair_sequence(tok, template, e.turns, context) for e in train.examples]
    dev_seqs = [pair_sequence(tok, template, e.turns, context) for e in dev.examples]
    summary.update(
        val=len(dev.examples),
        template=template,
        context=context,
        **context_report([s.length for s in seqs + dev_seqs], context, room=context + 1),
    )
    return PairTask(seqs, dev_seqs, dev.examples, cfg, tok, device), cfg, summary


def prepare_model(cfg: RunConfig, base: ckpt_io.Checkpoint, resume_from: Path | None, device) -> torch.nn.Module:
    """The model to train: the resumed one as it was (LoRA modules in place), or the base
    checkpoint's weights with the task's head and adapters added; trainable parameters set."""
    if resume_from is not None:
        saved = ckpt_io.read_checkpoint(resume_from)
        check_same_model(resume_from, saved.model_cfg, cfg.model)
        model = ckpt_io.build_model(saved, device, merge=False)
    else:
        model = ckpt_io.build_model(base, device, merge=True, model_cfg=cfg.model)
        torch.manual_seed(cfg.train.seed)  # a new head and new adapters start the same for the same seed
        keep_head = base.kind == "classify" and base.task.labels == cfg.task.labels
        if hasattr(model, "cls_head") and not keep_head:
            del model.cls_head
        if cfg.task.kind == "classify" and not keep_head:
            attach_classifier(model, len(cfg.task.labels))
        if cfg.lora.enabled:
            apply_lora(
                model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets
            )
    if cfg.task.freeze_trunk:
        for p in model.parameters():
            p.requires_grad_(False)
    if cfg.lora.enabled or cfg.task.freeze_trunk:
        if hasattr(model, "cls_head"):  # a new head always trains
            for p in model.cls_head.parameters():
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def finetune(
    data: list[str],
    out: Path,
    cfg: RunConfig,
    *,
    base: ckpt_io.Checkpoint,
    val: Path | None = None,
    resume_from: Path | None = None,
    merge: bool = False,
    on_event: EventFn = events.ignore,
) -> RunResult:
    """Run (or resume) a fine-tuning run of ``base`` in ``out``."""
    if merge and not cfg.lora.enabled:
        raise ConfigError("--merge folds LoRA adapters into the weights: it needs --lora")
    dist, device, threads = start_process(cfg)
    on_event = main_only(on_event, dist)
    task, cfg, summary = main_first(dist, lambda: build_task(cfg, base.tokenizer, data, val, device))
    on_event(events.FinetuneData(summary=summary))
    sequences = summary["train_tokens"] / cfg.model.context if cfg.task.kind == "lm" else summary["train"]
    epochs = {"epochs": cfg.train.epochs, "epoch_steps": epoch_steps(cfg, sequences, dist.world)}
    cfg = with_epoch_budget(cfg, sequences, dist.world)
    with run_lock(out, dist):
        with new_run_dir(out, dist):
            model = prepare_model(cfg, base, resume_from, device)
        result = train_run(
            out,
            cfg,
            model=model,
            task=task,
            tokenizer=base.tokenizer,
            dist=dist,
            device=device,
            resume_from=resume_from,
            threads=threads,
            kind=cfg.task.kind,
            on_event=on_event,
            val_tokens=summary.get("val_tokens", 0),
            val_bytes=summary.get("val_bytes", 0),
            extra={"lora": cfg.lora.enabled, **(epochs if epochs["epochs"] else {})},
            reports={"data": summary},
        )
        finished = result.stop_reason not in ("interrupted", "terminated")
        if dist.is_main and merge and (result.best or result.last) is not None and finished:
            result.merged = merge_checkpoint(result.best or result.last, out / "merged")
            on_event(events.Save(what="merged", path=str(result.merged), step=result.state.step))
    return result


def merge_checkpoint(src: Path, dest: Path) -> Path:
    """A LoRA checkpoint with its adapter folded in: plain weights any command reads, no lora section."""
    ckpt = ckpt_io.read_checkpoint(src)
    model = ckpt_io.build_model(ckpt, "cpu", merge=True)
    config = {**ckpt.config, "lora": {**ckpt.config.get("lora", {}), "enabled": False}}
    return ckpt_io.save_checkpoint(
        dest, model=model, config=config, tokenizer=ckpt.tokenizer, state={**ckpt.state, "merged_from": str(src)}
    )
