"""Task metrics as plain functions: classification (accuracy, per-class P/R/F1, macro-F1,
confusion matrix), extractive QA (exact match, token F1) and bits per byte.

Translation metrics (chrF, BLEU) are left to the fine-tuning work (issue 4), which decides between
a hand-written implementation and sacrebleu.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter


def accuracy(pred: list, gold: list) -> float:
    if len(pred) != len(gold):
        raise ValueError("pred and gold differ in length")
    return sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


def confusion_matrix(pred: list, gold: list, labels: list) -> list[list[int]]:
    """matrix[i][j]: items of gold label i predicted as label j."""
    index = {label: i for i, label in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for p, g in zip(pred, gold):
        m[index[g]][index[p]] += 1
    return m


def per_class(pred: list, gold: list, labels: list) -> dict:
    """label -> {precision, recall, f1, support}; an empty denominator counts as 0."""
    out = {}
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        fp = sum(p == label and g != label for p, g in zip(pred, gold))
        fn = sum(p != label and g == label for p, g in zip(pred, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return out


def macro_f1(pred: list, gold: list, labels: list) -> float:
    scores = per_class(pred, gold, labels)
    return sum(s["f1"] for s in scores.values()) / max(len(labels), 1)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation, with French articles: lower case, no punctuation, no articles."""
    text = unicodedata.normalize("NFC", text.lower())
    text = "".join(ch if ch not in string.punctuation and ch not in "«»’" else " " for ch in text)
    text = re.sub(r"\b(le|la|les|l|un|une|des|du|de|d|the|a|an)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per byte of the text those tokens encode."""
    return loss_nats_per_token * tokens / (n_bytes or 1) / math.log(2)
