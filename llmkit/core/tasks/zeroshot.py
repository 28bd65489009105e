"""Zero-shot classification by likelihood: which label does a language model find most probable
after a prompt? No training, no head: every label is scored as a continuation of the text put
through a template, the way evaluation harnesses score multiple choice.

The template holds ``{text}`` and, at its end, ``{label}``; the text before ``{label}`` is the
prompt and the label (with the space before it, which BPE tokenizers attach to the next word) the
continuation. A label's score is the sum of its tokens' log-probabilities (``sum``, the default:
lm-evaluation-harness's ``acc``), or that sum per character (``char``, its ``acc_norm``) or per
token (``token``), which penalise long labels less. On SIB-200 dev with Gemma 3 270M and the
template ``Text: {text}\nTopic: {label}`` the sum was right 0.515 of the time, per character 0.273
and per token 0.263 (docs/benchmarks.md); a template in the labels' language matters more still
(the French default template with the set's English labels: 0.232).
Only the continuation's positions go through the output head (a 262k-word vocabulary costs
nothing at the others).
"""

from __future__ import annotations

import torch

from llmkit.core.errors import ConfigError

DEFAULT_TEMPLATE = "Texte : {text}\nCatégorie : {label}"
NORMALIZE = ("char", "token", "sum")


def parse_labels(text: str) -> tuple[str, ...]:
    """Comma-separated labels, stripped; at least two, none repeated."""
    labels = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels: expected at least two different comma-separated labels, not {text!r}")
    return labels


def split_template(template: str) -> tuple[str, str]:
    """(prompt part, the whitespace that opens the continuation) of a template ending in {label}."""
    if template.count("{text}") != 1 or not template.endswith("{label}") or template.count("{label}") != 1:
        raise ConfigError("the zero-shot template needs {text} once and must end with {label}")
    prompt = template[: -len("{label}")]
    stripped = prompt.rstrip(" ")
    return stripped, prompt[len(stripped) :]


def continuation_rows(tok, texts: list[str], labels: list[str], template: str, context: int):
    """Token rows (prompt + label) for every (text, label) pair, text-major, each with how many of
    its last tokens are the label; and how many prompts were cut (from the left) to fit."""
    prompt_part, space = split_template(template)
    conts = [tok.encode(space + label) for label in labels]
    rows, cut = [], 0
    for text in texts:
        prompt = ([tok.bos_id] if tok.expects_bos else []) + tok.encode(prompt_part.replace("{text}", text))
        room = context + 1 - max(len(c) for c in conts)
        if len(prompt) > room:  # keep the end of the prompt: the words next to the label
            prompt, cut = prompt[len(prompt) - room :], cut + 1
        rows += [(prompt + c, len(c)) for c in conts]
    return rows, cut


@torch.no_grad()
def label_scores(
    model,
    tok,
    texts: list[str],
    labels: list[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    normalize: str = "sum",
    batch_size: int = 32,
    device="cpu",
) -> tuple[torch.Tensor, int]:
    """Scores (N texts, K labels), higher is likelier; and how many prompts were cut to the context."""
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize: expected one of {', '.join(NORMALIZE)}, not {normalize!r}")
    if len(set(labels)) < 2:
        raise ConfigError("zero-shot classification needs at least two different labels")
    rows, cut = continuation_rows(tok, texts, labels, template, model.cfg.context)
    scores = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        T = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), right-padded: causal, so padding is unseen
        y = torch.full((len(chunk), T), -100, dtype=torch.long)  # (B, T): targets at the label's tokens only
        for b, (ids, n) in enumerate(chunk):
            t = torch.tensor(ids)
            x[b, : len(ids) - 1] = t[:-1]
            y[b, len(ids) - 1 - n : len(ids) - 1] = t[-n:]
        keep = y != -100
        logits = model(x.to(device), logits_where=keep.to(device)).float()  # (targets, V)
        logp = logits.log_softmax(-1).gather(-1, y[keep].to(device)[:, None])[:, 0].cpu()  # (targets,)
        row_of = keep.nonzero()[:, 0]  # (targets,): the row each target belongs to
        scores[start : start + len(chunk)] = torch.zeros(len(chunk)).index_add_(0, row_of, logp)
    scores = scores.view(len(texts), len(labels))  # (N, K)
    if normalize == "char":
        scores = scores / torch.tensor([max(len(label), 1) for label in labels], dtype=torch.float)
    elif normalize == "token":
        scores = scores / torch.tensor([n for _, n in rows[: len(labels)]], dtype=torch.float)
    return scores, cut
