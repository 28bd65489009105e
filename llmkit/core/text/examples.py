"""Labelled examples for fine-tuning and evaluation: reading task files and turning them into
token sequences.

Files are JSONL, CSV or TSV (by extension); fields are mapped by the task config
(``text_field``/``label_field`` for classify, ``prompt_field``/``response_field`` or
``instruction``/``input``/``output`` or a ``messages`` list for instruct, ``src_field``/``tgt_field``
for translate, ``query_field``/``positive_field`` (optional ``negative_field``) or bitext
``src_field``/``tgt_field`` for embed). Every error names the file and line. Blank rows are skipped and counted; long
examples are truncated and counted; callers report the counts.

Prompt/response examples are rendered with the task's template (``{prompt}`` marks the input):
the template's text is the prompt, the response follows and ends with EOS. The same template is
applied by ``generate`` to a checkpoint's prompts, so a model sees at inference what it was
trained on.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.core.config import TaskConfig
from llmkit.core.errors import DataError
from llmkit.core.files.corpus import read_text
from llmkit.core.files.records import iter_rows as iter_table
from llmkit.core.text.templates import chat_instruction
from llmkit.core.text.templates import render as render_chat

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class Example:
    """One example: a text and its label (classify), chat turns [(role, content)] whose last turn
    is the response (instruct, translate), or a query (``text``) with the passages that answer it
    and, optionally, passages that do not (embed)."""

    line: int
    text: str = ""
    label: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)
    positives: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        return "\n\n".join(c for r, c in self.turns[:-1] if r == "user")

    @property
    def response(self) -> str:
        return self.turns[-1][1] if self.turns else ""


@dataclass
class ExampleSet:
    path: str
    examples: list[Example]
    blank: int = 0
    """Rows skipped because the text (or prompt/response) was empty."""


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL/CSV/TSV file; a malformed JSON line is an error naming it."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown format {path.suffix or '(no extension)'!r}; use .jsonl, .csv or .tsv")
    text = read_text(path)
    yield from iter_table(io.StringIO(text), str(path), kind)


def _need(row: dict, key: str, path: Path, n: int, flag: str, kinds: tuple[type, ...] = (str,)) -> Any:
    """A field of a row, which must be present and of one of ``kinds`` (text by default): a number
    where text is expected, or a list as a label, is refused rather than trained on as its repr."""
    if key not in row or row[key] is None:
        raise DataError(f"{path}: line {n} has no field {key!r} (choose it with {flag})")
    value = row[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = "text" if kinds == (str,) else "text or a whole number"
        raise DataError(
            f"{path}: line {n}: field {key!r} must be {wanted}, not {type(value).__name__} "
            f"({json.dumps(value, ensure_ascii=False)[:40]})"
        )
    return value


def _turns(row: dict, task: TaskConfig, path: Path, n: int) -> list[tuple[str, str]]:
    """The turns of an instruct or translate row, in any of the accepted shapes."""
    if task.kind == "translate":
        return [
            ("user", str(_need(row, task.src_field, path, n, "--src-field"))),
            ("assistant", str(_need(row, task.tgt_field, path, n, "--tgt-field"))),
        ]
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{path}: line {n}: messages must be a list of {{role, content}} objects")
        turns = [(str(m["role"]), str(m["content"])) for m in msgs]
        bad = [r for r, _ in turns if r not in ("system", "user", "assistant")]
        if bad:
            raise DataError(f"{path}: line {n}: unknown role {bad[0]!r} (system, user or assistant)")
        if not turns or turns[-1][0] != "assistant":
            raise DataError(f"{path}: line {n}: messages must end with an assistant turn")
        return turns
    if task.prompt_field in row or task.response_field in row:
        return [
            ("user", str(_need(row, task.prompt_field, path, n, "--prompt-field"))),
            ("assistant", str(_need(row, task.response_field, path, n, "--response-field"))),
        ]
    if "instruction" in row:
        prompt = str(row["instruction"])
        if str(row.get("input") or "").strip():
            prompt += "\n\n" + str(row["input"])
        return [("user", prompt), ("assistant", str(_need(row, "output", path, n, "an output field")))]
    raise DataError(
        f"{path}: line {n} has no field {task.prompt_field!r} (choose it with --prompt-field; "
        "instruction/input/output and messages are read too)"
    )


def _texts(row: dict, key: str, path: Path, n: int, flag: str, *, required: bool) -> tuple[str, ...]:
    """A field holding one text or a list of texts (an embedding row's positives or negatives)."""
    if key not in row or row[key] is None:
        if required:
            _need(row, key, path, n, flag)
        return ()
    value = row[key]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: line {n}: field {key!r} must be a text or a list of texts")
    return tuple(v for v in values if v.strip())


def _retrieval_example(row: dict, task: TaskConfig, path: Path, n: int) -> Example:
    """A query and its passages: {query, positive, negative?}, or a bitext pair {src, tgt}."""
    if task.query_field not in row and task.src_field in row:  # a translation pair: find the one from the other
        return Example(n, text=str(_need(row, task.src_field, path, n, "--src-field")),
                       positives=_texts(row, task.tgt_field, path, n, "--tgt-field", required=True))  # fmt: skip
    return Example(
        n,
        text=str(_need(row, task.query_field, path, n, "--query-field")),
        positives=_texts(row, task.positive_field, path, n, "--positive-field", required=True),
        negatives=_texts(row, task.negative_field, path, n, "--negative-field", required=False),
    )


def read_examples(path: Path, task: TaskConfig) -> ExampleSet:
    """All examples of a task file, blank ones skipped and counted."""
    path = Path(path)
    examples, blank = [], 0
    for n, row in iter_rows(path):
        if task.kind == "classify":
            text = str(_need(row, task.text_field, path, n, "--text-field"))
            label = str(_need(row, task.label_field, path, n, "--label-field", (str, int))).strip()
            if not text.strip() or not label:
                blank += 1
                continue
            examples.append(Example(n, text=text, label=label))
        elif task.kind == "embed":
            example = _retrieval_example(row, task, path, n)
            if not example.text.strip() or not example.positives:
                blank += 1
                continue
            examples.append(example)
        else:
            turns = _turns(row, task, path, n)
            if not all(c.strip() for r, c in turns if r != "system"):
                blank += 1
                continue
            examples.append(Example(n, turns=turns))
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({blank} blank rows skipped)" if blank else ""))
    return ExampleSet(str(path), examples, blank)


def label_map(train: ExampleSet) -> tuple[str, ...]:
    """The labels of a training set, sorted; a single class is an error."""
    labels = tuple(sorted({e.label for e in train.examples}))
    if len(labels) < 2:
        raise DataError(f"{train.path}: only one class ({labels[0]!r}); a classifier needs at least two")
    return labels


def drop_unseen(dev: ExampleSet, labels: tuple[str, ...]) -> tuple[ExampleSet, Counter]:
    """Dev examples whose label the classifier cannot predict are set aside and counted by label."""
    known = set(labels)
    unseen = Counter(e.label for e in dev.examples if e.label not in known)
    kept = [e for e in dev.examples if e.label in known]
    if not kept:
        raise DataError(f"{dev.path}: none of its labels were seen in training ({', '.join(sorted(unseen)[:5])})")
    return ExampleSet(dev.path, kept, dev.blank), unseen


def holdout(train: ExampleSet, fraction: float, seed: int) -> tuple[ExampleSet, ExampleSet]:
    """A deterministic (train, validation) split of one file: a fixed shuffle, the tail held out."""
    order = list(range(len(train.examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    if len(order) - n_val < 1:
        raise DataError(f"{train.path}: {len(order)} example(s) are too few to hold some out; give --val")
    val_idx = set(order[-n_val:])
    keep = [e for i, e in enumerate(train.examples) if i not in val_idx]
    held = [e for i, e in enumerate(train.examples) if i in val_idx]
    return ExampleSet(train.path, keep, train.blank), ExampleSet(f"{train.path} (held out)", held, 0)


# --- token sequences ------------------------------------------------------------------------------


def fill(template: str, prompt: str) -> str:
    # str.replace, not str.format: braces in the user's text or template stay as they are.
    return template.replace("{prompt}", prompt)


def encode_prompt(tok, template: str, turns: list[tuple[str, str]], *, tools: list | None = None) -> list[int]:
    """Token ids of everything before the response: system text, then each user turn through the
    template, earlier assistant turns followed by EOS. With the template ``chat``, the model's own
    chat template renders the whole conversation, ending with the assistant's opening (``tools``
    given to a template with a tool format); with ``chat:TEXT``, each user turn goes through TEXT
    (``{prompt}`` marks it) first."""
    instruction = chat_instruction(template)
    if instruction is not None:  # the chat template writes the BOS a model expects (its bos_token), if any
        turns = [(role, fill(instruction, c) if role == "user" else c) for role, c in turns]
        return tok.encode(render_chat(tok, turns, add_generation_prompt=True, tools=tools))
    ids: list[int] = [tok.bos_id] if tok.expects_bos else []
    for role, content in turns:
        if role == "system":
            ids += tok.encode(content + "\n\n")
        elif role == "user":
            ids += tok.encode(fill(template, content))
        else:
            ids += tok.encode(content) + [tok.eos_id]
    return ids


@dataclass
class Sequence:
    ids: list[int]
    """prompt + response + EOS, at most context + 1 tokens (inputs are ids[:-1], targets ids[1:])."""
    n_prompt: int
    """How many leading ids are prompt (masked out of the loss when mask_prompt)."""
    truncated: bool
    length: int = 0
    """Tokens the example would take untruncated (prompt + response + EOS)."""


def pair_sequence(tok, template: str, turns: list[tuple[str, str]], context: int) -> Sequence:
    """Render one prompt/response example. Too long: the prompt keeps its most recent tokens and
    the response its first ones, the response getting at least half the room."""
    prompt = encode_prompt(tok, template, turns[:-1])
    response = tok.encode(turns[-1][1]) + [tok.eos_id]
    room = context + 1
    length = len(prompt) + len(response)
    truncated = length > room
    if truncated:
        keep_response = min(len(response), max(room - len(prompt), room // 2))
        keep_prompt = room - keep_response
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
        response = response[:keep_response]
    return Sequence(prompt + response, len(prompt), truncated, length)


def classify_ids(tok, text: str, context: int) -> tuple[list[int], int]:
    """A text's token ids for classification (its first ``context`` tokens), and its full length."""
    ids = tok.encode_text(text)
    return ids[:context], len(ids)


def context_report(lengths: list[int], context: int, room: int | None = None) -> dict[str, int]:
    """How many examples a context cuts, and the context that would fit 95% of them (and all)."""
    room = context if room is None else room
    ordered = sorted(lengths)
    if not ordered:
        return {"truncated": 0, "fits_95": 0, "fits_all": 0}
    fits_95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    extra = room - context  # a pair sequence holds context + 1 tokens (inputs and shifted targets)
    return {"truncated": sum(n > room for n in ordered), "fits_95": fits_95 - extra, "fits_all": ordered[-1] - extra}
