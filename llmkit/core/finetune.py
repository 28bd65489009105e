"""Fine-tuning a checkpoint end to end: task data -> model (+ head, + LoRA) -> fit -> checkpoints.

Tasks: ``classify`` (a head on the pooled hidden state), ``instruct`` and ``translate``
(prompt -> response through a template, loss on the response), ``lm`` (continued pretraining on
text). Full fine-tuning, a frozen trunk (linear probe) or LoRA adapters. The run directory is the
same as pretraining's (core/run.py), and every checkpoint carries the task, its template and label
map, so ``generate``, ``classify``, ``encode`` and ``eval`` need no flags to use it.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from llmkit.core import checkpoint as ckpt_io
from llmkit.core.config import SECTIONS, RunConfig, resolve_run_config
from llmkit.core.corpus import resolve_corpus
from llmkit.core.data import check_fits, load_or_build
from llmkit.core.device import pick_device, pick_precision, set_threads
from llmkit.core.errors import ConfigError, DataError, TrainingDiverged
from llmkit.core.task_data import (ExampleSet, classify_ids, drop_unseen, holdout, label_map, pair_sequence,
                                  read_examples)
from llmkit.core.heads import attach_classifier
from llmkit.core.lora import apply_lora, trainable_parameters
from llmkit.core.plot import write_loss_curve
from llmkit.core.distributed import Dist
from llmkit.core.run import (Checkpointer, MetricsLog, check_same_model, main_first, main_only,
                             outcome, resume_source, start_training)
from llmkit.core.tasks import ClassifyTask, PairTask, balanced_weights
from llmkit.core.tokenizer import check_compatible
from llmkit.core.train import TrainState, fit

EventFn = Callable[[str, dict[str, Any]], None]

# Fine-tuning starts from a trained model: a short warmup, a lower rate, frequent validation.
DEFAULTS = {
    "optim": {"lr": 3e-4, "warmup_steps": 20, "weight_decay": 0.0},
    "train": {"batch_size": 16, "eval_every": 50, "save_every": 200, "patience": 5, "samples": 0},
}
LORA_LR = 1e-3  # adapters start at zero and are small: they take a higher rate
DEFAULT_EPOCHS = 3


def plan(checkpoint: Path, out: Path, *, resume: str | None, config_file: Path | None, sets: list[str],
         flags: Mapping[str, Mapping[str, Any]]) -> tuple[RunConfig, ckpt_io.Checkpoint, Path | None]:
    """The run config, the checkpoint fine-tuning starts from, and the one to resume (if any)."""
    base = ckpt_io.read_checkpoint(checkpoint)
    if not flags.get("task", {}).get("kind") and resume is None:
        raise ConfigError("--task is required: classify, instruct, translate or lm")
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
        layers.update({k: dict(v) for k, v in DEFAULTS.items()})

    cfg = resolve_run_config(base=layers, config_file=config_file, sets=sets, flags=flags)
    if resume_from is None and cfg.lora.enabled and not _lr_given(config_file, sets, flags):
        cfg = cfg.replace("optim", lr=LORA_LR)  # LoRA's default rate, unless the user chose one
    if resume_from is None:
        cfg = cfg.replace("task", init_from=str(base.path))
        if not cfg.train.has_budget:
            cfg = cfg.replace("train", epochs=float(DEFAULT_EPOCHS))
    if cfg.task.kind != "classify" and cfg.task.freeze_trunk:
        raise ConfigError("--freeze-trunk trains a classification head only: it needs --task classify")
    return cfg, base, resume_from


def _lr_given(config_file: Path | None, sets: list[str], flags: Mapping[str, Mapping[str, Any]]) -> bool:
    from llmkit.core.config import load_yaml

    in_file = bool(config_file) and "lr" in (load_yaml(config_file).get("optim") or {})
    return in_file or any(s.replace(" ", "").startswith("optim.lr=") for s in sets) \
        or flags.get("optim", {}).get("lr") is not None


@dataclass
class FinetuneResult:
    out: Path
    stop_reason: str
    state: TrainState
    params: int
    trainable: int
    precision: str
    best: Path | None
    last: Path | None
    merged: Path | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)


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
            raise ConfigError("--val is not used by --task lm: the tail of each document is held out "
                              "(data.val_fraction)")
        from llmkit.core.pretrain import LMTask

        corpus = load_or_build(resolve_corpus(data), tok, cfg.data)
        check_fits(corpus, context)
        summary = {k: corpus.meta[k] for k in ("documents", "train_tokens", "val_tokens")}
        return LMTask(corpus, cfg, device), cfg, {"kind": "lm", **summary, "val_bytes": corpus.meta["val_bytes"]}
    if len(data) != 1:
        raise ConfigError(f"--task {cfg.task.kind} reads one --data file (got {len(data)})")
    train, dev, val_source = _split(cfg, Path(data[0]), val)
    summary: dict[str, Any] = {"kind": cfg.task.kind, "train": len(train.examples), "val_source": val_source,
                               "blank": train.blank + dev.blank}
    if cfg.task.kind == "classify":
        labels = cfg.task.labels or label_map(train)
        unknown = sorted({e.label for e in train.examples} - set(labels))
        if unknown:
            raise DataError(f"{train.path}: label {unknown[0]!r} is not in the checkpoint's label map")
        dev, unseen = drop_unseen(dev, labels)
        index = {label: i for i, label in enumerate(labels)}
        rows, cut = zip(*(classify_ids(tok, e.text, context) for e in train.examples))
        dev_rows, dev_cut = zip(*(classify_ids(tok, e.text, context) for e in dev.examples))
        y = [index[e.label] for e in train.examples]
        weights = balanced_weights(y, len(labels)) if cfg.task.class_weights == "balanced" else None
        cfg = cfg.replace("task", labels=tuple(labels))
        counts = Counter(e.label for e in train.examples)
        summary.update(val=len(dev.examples), labels={lab: counts[lab] for lab in labels},
                       unseen=dict(unseen), truncated=sum(cut) + sum(dev_cut))
        task = ClassifyTask((list(rows), y), (list(dev_rows), [index[e.label] for e in dev.examples]),
                            labels, cfg, device, weights)
        return task, cfg, summary
    template = cfg.task.prompt_template
    seqs = [pair_sequence(tok, template, e.turns, context) for e in train.examples]
    dev_seqs = [pair_sequence(tok, template, e.turns, context) for e in dev.examples]
    summary.update(val=len(dev.examples), template=template,
                   truncated=sum(s.truncated for s in seqs) + sum(s.truncated for s in dev_seqs))
    return PairTask(seqs, dev_seqs, dev.examples, cfg, tok, device), cfg, summary


def prepare_model(cfg: RunConfig, base: ckpt_io.Checkpoint, resume_from: Path | None, device) -> torch.nn.Module:
    """The model to train: the resumed one as it was (LoRA modules in place), or the base
    checkpoint's weights with the task's head and adapters added; trainable parameters set."""
    if resume_from is not None:
        saved = ckpt_io.read_checkpoint(resume_from)
        check_same_model(resume_from, saved.model_cfg, cfg.model)
        model = ckpt_io.build_model(saved, device, merge=False)
    else:
        model = ckpt_io.build_model(base, device, merge=True)
        torch.manual_seed(cfg.train.seed)  # a new head and new adapters start the same for the same seed
        keep_head = base.kind == "classify" and base.task.labels == cfg.task.labels
        if hasattr(model, "cls_head") and not keep_head:
            del model.cls_head
        if cfg.task.kind == "classify" and not keep_head:
            attach_classifier(model, len(cfg.task.labels))
        if cfg.lora.enabled:
            apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                       targets=cfg.lora.targets)
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


def finetune(checkpoint: Path, data: list[str], out: Path, cfg: RunConfig, *, base: ckpt_io.Checkpoint,
             val: Path | None = None, resume_from: Path | None = None, merge: bool = False,
             on_event: EventFn = lambda k, d: None) -> FinetuneResult:
    """Run (or resume) a fine-tuning run in ``out``."""
    if merge and not cfg.lora.enabled:
        raise ConfigError("--merge folds LoRA adapters into the weights: it needs --lora")
    dist = Dist.from_env(cfg.train.device)
    on_event = main_only(on_event, dist)
    tok = base.tokenizer
    set_threads(cfg.train.threads)
    device = dist.device(pick_device(cfg.train.device))
    task, cfg, summary = main_first(dist, lambda: build_task(cfg, tok, data, val, device))
    on_event("finetune_data", summary)
    global_batch = cfg.train.global_batch(dist.world)
    if cfg.train.epochs:
        n = summary["train_tokens"] / cfg.model.context if cfg.task.kind == "lm" else summary["train"]
        epoch_steps = math.ceil(cfg.train.epochs * n / global_batch)
        cfg = cfg.replace("train", steps=min(s for s in (cfg.train.steps, epoch_steps) if s))
    precision = pick_precision(cfg.train.dtype, device, cfg.model.d_model)
    created = not out.exists()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        model = prepare_model(cfg, base, resume_from, device)
    except BaseException:
        if created and dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    params, trainable = model.num_params(), trainable_parameters(model)
    optimizer, state = start_training(model, cfg, dist, resume_from, on_event)
    on_event("model", {"params": params, "trainable": trainable, "device": str(device),
                       "precision": precision.name, "precision_reason": precision.reason, "config": cfg.model,
                       "lora": cfg.lora.enabled, "task": cfg.task.kind, "processes": dist.world})

    config_dict = cfg.to_dict()
    if dist.is_main:
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    metrics = MetricsLog(out / "metrics.jsonl", summary.get("val_tokens", 0), summary.get("val_bytes", 0))
    save = Checkpointer(out, model=model, config=config_dict, tokenizer=tok, optimizer=optimizer,
                        extra_state={"seed": cfg.train.seed, "kind": cfg.task.kind, "precision": precision.name,
                                     "device": str(device), "params": params, "trainable": trainable},
                        keep=cfg.train.keep_checkpoints, on_event=on_event, dist=dist)
    best_metrics: dict[str, Any] = {}

    def events(kind: str, d: dict[str, Any]) -> None:
        if dist.is_main:
            metrics(kind, d)
        if kind == "eval" and d.get("improved"):
            best_metrics.clear()
            best_metrics.update(d)
        on_event(kind, d)

    reason = fit(model, task, optim_cfg=cfg.optim, train_cfg=cfg.train, optimizer=optimizer, state=state,
                 device=device, precision=precision, tokens_per_step=global_batch * cfg.model.context, save=save,
                 on_event=events, metric=cfg.task.best_metric, dist=dist)
    dist.close()
    best, last = outcome(out)
    result = FinetuneResult(out, reason, state, params, trainable, precision.name, best, last, None, best_metrics)
    if not dist.is_main:
        return result
    write_loss_curve(out / "loss.svg", metrics.train, metrics.val, f"{out.name}: loss ({cfg.task.kind})")
    if reason == "diverged":
        raise TrainingDiverged(f"training diverged at step {state.step} (loss is NaN or infinite); "
                               f"last good checkpoint: {last or best or 'none'}; lower optim.lr")
    if merge and (best or last) is not None and reason != "interrupted":
        result.merged = merge_checkpoint(best or last, out / "merged")
        on_event("save", {"kind": "merged", "path": str(result.merged), "step": state.step})
    return result


def merge_checkpoint(src: Path, dest: Path) -> Path:
    """A LoRA checkpoint with its adapter folded in: plain weights any command reads, no lora section."""
    ckpt = ckpt_io.read_checkpoint(src)
    model = ckpt_io.build_model(ckpt, "cpu", merge=True)
    config = {**ckpt.config, "lora": {**ckpt.config.get("lora", {}), "enabled": False}}
    return ckpt_io.save_checkpoint(dest, model=model, config=config, tokenizer=ckpt.tokenizer,
                                   state={**ckpt.state, "merged_from": str(src)})
