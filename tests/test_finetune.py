"""Fine-tuning in core: classification head and pooling, prompt masking, LoRA runs, resume, merge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmkit.core.config import TaskConfig
from llmkit.core.jobs.finetune import finetune, plan
from llmkit.core.model.heads import attach_classifier, classify_logits
from llmkit.core.model.transformer import Transformer
from llmkit.core.store import checkpoint as ckpt_io
from llmkit.core.tasks.objectives import balanced_weights, classify_texts, epoch_indices, pair_batch
from llmkit.core.text.examples import pair_sequence, read_examples

FT_SETS = [
    "train.eval_every=4",
    "train.save_every=4",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.batch_size=8",
    "train.dtype=fp32",
    "train.device=cpu",
]

SUMMER = [
    "Le soleil brille et il fait chaud.",
    "La plage est chaude en été.",
    "Le soleil de midi est brûlant.",
    "Nous nageons dans la mer chaude.",
    "Un été chaud sous le soleil.",
    "La chaleur du soleil d'été.",
]
WINTER = [
    "La neige tombe et il fait froid.",
    "Le froid de l'hiver est glacial.",
    "La neige couvre la ville.",
    "Un hiver froid et gris.",
    "Il gèle, la neige est froide.",
    "Le vent d'hiver est glacé.",
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def seasons(tmp_path):
    rows = [{"text": t, "label": "été"} for t in SUMMER] + [{"text": t, "label": "hiver"} for t in WINTER]
    return write_jsonl(tmp_path / "seasons.jsonl", rows)


@pytest.fixture
def pairs(tmp_path):
    rows = [
        {"src": f"le {w} est grand", "tgt": f"the {e} is big"}
        for w, e in (
            ("chat", "cat"),
            ("chien", "dog"),
            ("pain", "bread"),
            ("ciel", "sky"),
            ("mur", "wall"),
            ("lac", "lake"),
            ("roi", "king"),
            ("port", "harbour"),
        )
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def run_finetune(base, out, data, *sets, val=None, merge=False, resume=None, task="classify", stop_at=None):
    cfg, ckpt, resume_from = plan(
        base,
        out,
        resume=resume,
        config_file=None,
        sets=[*FT_SETS, *sets],
        flags={"task": {"kind": task if resume is None else None}},
    )
    events = []

    def on_event(event):
        kind, data = event.kind, event.as_dict()
        events.append((kind, data))
        if kind == "step" and data["step"] == stop_at:
            raise KeyboardInterrupt

    result = finetune(
        [str(d) for d in data], out, cfg, base=ckpt, val=val, resume_from=resume_from, merge=merge, on_event=on_event
    )
    return result, events


def test_pooling_is_the_same_alone_and_in_a_padded_batch(tiny_model_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg).eval()
    attach_classifier(model, 3)
    rows = [[5, 9, 11, 4], [7, 8], [3, 14, 15, 9, 2, 6, 5], [12]]
    for pooling in ("last", "mean"):
        for side in ("left", "right"):
            with torch.no_grad():
                batch = classify_logits(model, rows, pooling=pooling, side=side)
                for i, r in enumerate(rows):
                    alone = classify_logits(model, [r], pooling=pooling, side=side)
                    torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=1e-5)


def test_prompt_is_masked_out_of_the_loss(tokenizer):
    template = "Q : {prompt}\nR : "
    seq = pair_sequence(tokenizer, template, [("user", "la mer"), ("assistant", "le sel")], context=64)
    prompt = tokenizer.encode("Q : la mer\nR : ")
    assert seq.ids[: seq.n_prompt] == prompt and seq.ids[-1] == tokenizer.eos_id
    x, y = pair_batch([seq], mask_prompt=True)
    targets = y[0].tolist()
    assert targets[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert targets[len(prompt) - 1 :] == seq.ids[len(prompt) :]
    # Behaviour, not bookkeeping: the loss does not depend on the logits at prompt positions.
    logits = torch.randn(1, x.size(1), tokenizer.vocab_size, requires_grad=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    assert logits.grad[0, : len(prompt) - 1].abs().sum() == 0
    assert logits.grad[0, len(prompt) - 1 :].abs().sum() > 0
    _, y_all = pair_batch([seq], mask_prompt=False)
    assert (y_all[0] != -100).all()


def test_long_examples_keep_the_start_of_the_response(tokenizer):
    long_prompt = "mot " * 80
    seq = pair_sequence(tokenizer, "{prompt}", [("user", long_prompt), ("assistant", "fin de la réponse")], context=24)
    assert seq.truncated and len(seq.ids) == 25
    assert seq.ids[seq.n_prompt :] == tokenizer.encode("fin de la réponse") + [tokenizer.eos_id]


def test_epoch_indices_cover_each_example_once_per_epoch():
    idx = epoch_indices(10, seed=3, start=0, count=30)
    for e in range(3):
        assert sorted(idx[10 * e : 10 * (e + 1)]) == list(range(10))
    assert epoch_indices(10, 3, 7, 9) == idx[7:16]  # a pure function of the position: exact resume


def test_balanced_weights():
    w = balanced_weights([0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))


def test_instruct_row_shapes(tmp_path):
    f = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"prompt": "a", "response": "b"},
            {"instruction": "traduis", "input": "chat", "output": "cat"},
            {
                "messages": [
                    {"role": "system", "content": "sois bref"},
                    {"role": "user", "content": "u1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "u2"},
                    {"role": "assistant", "content": "a2"},
                ]
            },
            {"prompt": "  ", "response": "vide"},
        ],
    )
    s = read_examples(f, TaskConfig(kind="instruct"))
    assert [e.response for e in s.examples] == ["b", "cat", "a2"] and s.blank == 1
    assert s.examples[1].prompt == "traduis\n\nchat"
    assert s.examples[2].turns[0] == ("system", "sois bref")


def test_a_tiny_classifier_learns_a_separable_task(trained_run, seasons, tmp_path):
    result, events = run_finetune(
        trained_run, tmp_path / "clf", [seasons], "train.steps=60", "optim.lr=3e-3", "task.val_fraction=0.2"
    )
    assert result.best is not None
    model, ckpt = ckpt_io.load_model(result.last)
    assert ckpt.kind == "classify" and ckpt.task.labels == ("hiver", "été")
    probs, _ = classify_texts(model, ckpt.tokenizer, SUMMER + WINTER, pooling="last")
    pred = [ckpt.task.labels[i] for i in probs.argmax(-1).tolist()]
    assert pred == ["été"] * len(SUMMER) + ["hiver"] * len(WINTER)
    evals = [d for k, d in events if k == "eval"]
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(evals[-1])
    assert any(k == "finetune_data" and "held out" in d["val_source"] for k, d in events)


def test_freeze_trunk_trains_the_head_only(trained_run, seasons, tmp_path):
    result, _ = run_finetune(trained_run, tmp_path / "probe", [seasons], "train.steps=4", "task.freeze_trunk=true")
    base = load_file(str(ckpt_io.resolve_checkpoint(trained_run) / "model.safetensors"))
    tuned = load_file(str(result.last / "model.safetensors"))
    assert set(tuned) - set(base) == {"cls_head.weight", "cls_head.bias"}
    assert all(torch.equal(base[k], tuned[k]) for k in base)
    assert result.trainable == 2 * 32 + 2


def test_lora_run_saves_the_adapter_apart_and_merges(trained_run, pairs, tmp_path):
    result, events = run_finetune(
        trained_run,
        tmp_path / "tr",
        [pairs],
        "train.steps=4",
        "lora.enabled=true",
        "lora.rank=4",
        "optim.lr=1e-2",
        merge=True,
        task="translate",
    )
    best = result.best
    adapter = load_file(str(best / "adapter.safetensors"))
    assert adapter and all(k.endswith(("lora_a", "lora_b")) for k in adapter)
    base = load_file(str(ckpt_io.resolve_checkpoint(trained_run) / "model.safetensors"))
    weights = load_file(str(best / "model.safetensors"))
    assert set(weights) == set(base) and all(torch.equal(base[k], weights[k]) for k in base)  # base untouched
    assert any(b.abs().sum() > 0 for k, b in adapter.items() if k.endswith("lora_b"))  # the adapter learned
    # The merged checkpoint is a plain model that computes what base + adapter computes.
    unmerged = ckpt_io.build_model(ckpt_io.read_checkpoint(best), merge=False).eval()
    merged, ckpt = ckpt_io.load_model(result.merged)
    assert not ckpt.lora.enabled and not (result.merged / "adapter.safetensors").exists()
    x = torch.randint(0, merged.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), merged(x), atol=1e-5, rtol=1e-5)
    evals = [d for k, d in events if k == "eval"]
    assert {"chrf", "bleu", "samples"} <= set(evals[-1]) and evals[-1]["metric"] == "chrf"


def test_lora_resume_is_exact(trained_run, pairs, tmp_path):
    sets = (
        "lora.enabled=true",
        "lora.rank=4",
        "lora.dropout=0.1",
        "optim.lr=1e-2",
        "train.save_every=2",
        "train.eval_every=2",
        "train.keep_checkpoints=0",
        "task.eval_limit=2",
    )
    assert_resume_is_exact(trained_run, pairs, tmp_path, ("train.steps=4", *sets), "translate", "adapter.safetensors")


def assert_resume_is_exact(base, data, tmp_path, sets, task, weights):
    """Four steps straight, and two + two interrupted and resumed, give identical ``weights``."""
    straight, _ = run_finetune(base, tmp_path / "a", [data], *sets, task=task)
    first, _ = run_finetune(base, tmp_path / "b", [data], *sets, task=task, stop_at=2)
    assert first.stop_reason == "interrupted"
    resumed, events = run_finetune(base, tmp_path / "b", [data], *sets, resume="auto")
    assert any(k == "resume" for k, _ in events)
    a = load_file(str(straight.last / weights))
    b = load_file(str(resumed.last / weights))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_continued_pretraining(trained_run, corpus_file, tmp_path):
    result, events = run_finetune(
        trained_run, tmp_path / "lm", [corpus_file], "train.steps=2", "train.eval_batches=2", task="lm"
    )
    ckpt = ckpt_io.read_checkpoint(result.last)
    assert ckpt.kind == "lm" and ckpt.task.init_from.endswith("best")
    evals = [d for k, d in events if k == "eval"]
    assert math.isfinite(evals[-1]["val_bpb"]) and evals[-1]["metric"] == "val_loss"


def test_a_large_pretrained_base_gets_a_gentler_default_rate(trained_run, tmp_path, monkeypatch):
    """3e-4 suits the small models llmkit pretrains; a base of 100M parameters or more starts at
    5e-5 (at 3e-4 Gemma 3 270M forgot what it knew, docs/benchmarks.md). LoRA keeps 1e-3, and a
    rate the user gives always wins."""
    import llmkit.core.jobs.finetune as job
    from llmkit.core.config import LARGE_BASE_LR, LORA_LR

    def lr(sets=(), flags=None, size=0):
        if size:
            monkeypatch.setattr(job.recipe, "params", lambda cfg: size)
        flags = {"task": {"kind": "classify"}, **(flags or {})}
        return plan(trained_run, tmp_path / "x", resume=None, config_file=None, sets=list(sets), flags=flags)[
            0
        ].optim.lr

    assert lr() == 3e-4  # the tiny test model
    assert lr(size=135_000_000) == LARGE_BASE_LR
    assert lr(size=135_000_000, flags={"lora": {"enabled": True}}) == LORA_LR
    assert lr(["optim.lr=2e-4"], size=135_000_000) == 2e-4
