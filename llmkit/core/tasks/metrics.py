"""Task metrics as plain functions: classification (accuracy, per-class P/R/F1, macro-F1,
confusion matrix), extractive QA (exact match, token F1), translation (corpus chrF and BLEU) and
bits per byte.

chrF and BLEU follow sacrebleu's default definitions (chrF: character 6-grams, beta 2, whitespace
ignored; BLEU: 4-grams, 13a tokenization, exponential smoothing, corpus brevity penalty), written
here in ~70 lines rather than adding sacrebleu and its five dependencies to every install. A test
checks both against sacrebleu itself (a development dependency) on varied sentences.
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


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hyps: list[str], refs: list[str], *, order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015) on a 0-100 scale: n-gram statistics summed over the corpus;
    precision and recall averaged over the orders both sides have; then their F-beta."""
    if len(hyps) != len(refs):
        raise ValueError("hyps and refs differ in length")
    stats = [[0, 0, 0] for _ in range(order)]  # per order: hyp n-grams, ref n-grams, matches
    for hyp, ref in zip(hyps, refs):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, order + 1):
            hc, rc = _char_ngrams(h, n), _char_ngrams(r, n)
            s = stats[n - 1]
            s[0] += sum(hc.values()) if rc else 0  # as sacrebleu: no reference n-grams, nothing to miss
            s[1] += sum(rc.values())
            s[2] += sum((hc & rc).values())
    precision = recall = 0.0
    effective = 0
    for n_hyp, n_ref, n_match in stats:
        if n_hyp and n_ref:  # orders absent on either side are left out of the averages
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if not effective:
        return 0.0
    precision, recall = precision / effective, recall / effective
    factor = beta**2
    denom = factor * precision + recall
    return 100.0 * (1 + factor) * precision * recall / denom if denom else 0.0


_BLEU_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation, not the apostrophe
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """The mteval-v13a tokenization BLEU is conventionally reported with."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _BLEU_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def bleu(hyps: list[str], refs: list[str], *, order: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) on a 0-100 scale, one reference per sentence."""
    if len(hyps) != len(refs):
        raise ValueError("hyps and refs differ in length")
    matches, totals = [0] * order, [0] * order
    sys_len = ref_len = 0
    for hyp, ref in zip(hyps, refs):
        h, r = tokenize_13a(hyp), tokenize_13a(ref)
        sys_len, ref_len = sys_len + len(h), ref_len + len(r)
        for n in range(1, order + 1):
            hc = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum((hc & rc).values())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if sys_len == 0 or not any(matches):
        return 0.0
    log_sum, smooth = 0.0, 1.0
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:  # 'exp' smoothing: each further zero-match order halves the stand-in count
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * t))
        else:
            log_sum += math.log(m / t)
    brevity = 1.0 if sys_len >= ref_len else math.exp(1.0 - ref_len / sys_len)
    return 100.0 * brevity * math.exp(log_sum / order)
