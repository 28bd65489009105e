"""LoRA by module swap, and task metrics against hand-computed values."""

import math

import pytest
import torch
from conftest import need_module

from llmkit.core.model.lora import LoRALinear, adapter_state, apply_lora, merge_lora, trainable_parameters
from llmkit.core.model.transformer import Transformer
from llmkit.core.tasks import metrics
from llmkit.core.training.loop import lm_loss


def _pair(cfg):
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    torch.manual_seed(0)
    adapted = Transformer(cfg).eval()
    return base, adapted


def test_lora_at_initialisation_equals_the_base_model(tiny_model_cfg):
    base, adapted = _pair(tiny_model_cfg)
    wrapped = apply_lora(adapted, rank=4, alpha=8)
    assert len(wrapped) == 4 * tiny_model_cfg.n_layer
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(base(x), adapted(x))


def test_merged_equals_unmerged(tiny_model_cfg):
    _, model = _pair(tiny_model_cfg)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.05)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_only_adapter_parameters_train(tiny_model_cfg):
    _, model = _pair(tiny_model_cfg)
    apply_lora(model, rank=2, alpha=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert trainable_parameters(model) == sum(v.numel() for v in adapter_state(model).values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 13))
    for _ in range(3):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_lora(Transformer(tiny_model_cfg), targets=("nothing",))


def test_classification_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    labels = ["a", "b", "c"]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert metrics.confusion_matrix(pred, gold, labels) == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    pc = metrics.per_class(pred, gold, labels)
    # a: P 2/2, R 2/3 -> F1 0.8; b: P 1/2, R 1/2 -> 0.5; c: P 1/2, R 1/1 -> 2/3
    assert pc["a"]["f1"] == pytest.approx(0.8) and pc["b"]["f1"] == pytest.approx(0.5)
    assert pc["c"]["f1"] == pytest.approx(2 / 3) and pc["a"]["support"] == 3
    assert metrics.macro_f1(pred, gold, labels) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_qa_metrics_by_hand():
    assert metrics.exact_match("La Tour Eiffel.", "tour eiffel") == 1.0
    assert metrics.exact_match("en 1889", "1889") == 0.0
    # pred tokens: en 1889 ; gold: 1889 -> P 1/2, R 1 -> F1 2/3
    assert metrics.token_f1("en 1889", "1889") == pytest.approx(2 / 3)
    assert metrics.token_f1("Paris", "Lyon") == 0.0


def test_bits_per_byte():
    # ln 2 nats per token, one byte per token: exactly one bit per byte
    assert metrics.bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)


def test_bleu_by_hand():
    # 4-gram precisions 3/4, 2/3, 1/2 and 0/1 (smoothed to 1/(2*1)); equal lengths: no brevity penalty.
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert metrics.bleu(["a b c d"], ["a b c e"]) == pytest.approx(expected)
    assert metrics.bleu(["le chat dort ."], ["le chat dort ."]) == pytest.approx(100.0)
    assert metrics.bleu(["x y z w"], ["a b c d"]) == 0.0
    # brevity penalty: 4 hypothesis tokens against 8 reference tokens
    short = metrics.bleu(["a b c d"], ["a b c d e f g h"])
    assert short == pytest.approx(100 * math.exp(1 - 8 / 4))


def test_chrf_by_hand():
    # "ab" vs "abc": 1-grams P 1, R 2/3; 2-grams P 1, R 1/2; higher orders absent on a side.
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert metrics.chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    assert metrics.chrf(["le chat"], ["lechat"]) == pytest.approx(100.0)  # whitespace is ignored
    assert metrics.chrf([""], ["abc"]) == 0.0


def test_chrf_and_bleu_agree_with_sacrebleu():
    sacrebleu = need_module("sacrebleu", "the reference for chrF/BLEU: a development dependency, pip install -e .[dev]")
    import random

    rng = random.Random(0)
    words = (
        "le chat noir dort sur la table , mais 3-4 chiens l'ont vu . Il fait « beau » ; dit-il ! 12.5 € & co".split()
    )
    for _ in range(200):
        refs = [" ".join(rng.choices(words, k=rng.randint(1, 15))) for _ in range(rng.randint(1, 5))]
        hyps = [" ".join(rng.choices(words, k=rng.randint(0, 15))) if rng.random() < 0.6 else r for r in refs]
        assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
        assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
