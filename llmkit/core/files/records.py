"""Items from line-oriented inputs: one per non-blank line, JSONL (a field) or CSV/TSV (a column).

Shared by every command that reads a list of texts (generate's prompts, encode's items), so the
formats and their error messages (file and line number) are the same everywhere. Lazy: items are
yielded as the lines are read.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator

from llmkit.core.errors import DataError


def iter_objects(lines: Iterable[str], name: str, start: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSONL line, the first numbered ``start``; a line
    that is not a JSON object is an error naming it."""
    for n, line in enumerate(lines, start):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}: line {n} is not a JSON object")
        if "\\ud" in line or "\\uD" in line:  # an escaped surrogate: valid JSON, but no text when alone
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{name}: line {n} holds a lone surrogate (\\ud800-\\udfff): not text") from None
        yield n, obj


def iter_rows(lines: Iterable[str], name: str, kind: str, *, column: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a 'jsonl' | 'csv' | 'tsv' input: JSON objects, or CSV/TSV rows keyed
    by the header. With ``column``, a CSV/TSV header without it is an error naming the columns."""
    if kind == "jsonl":
        yield from iter_objects(lines, name)
        return
    csv.field_size_limit(FIELD_CHARS)  # the module's default, 128 KiB, refuses a long document
    reader = csv.DictReader(lines, delimiter="\t" if kind == "tsv" else ",")
    try:
        if column is not None and (not reader.fieldnames or column not in reader.fieldnames):
            raise DataError(f"{name}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{name}: line {reader.line_num} is not valid {kind.upper()} ({e})") from None


FIELD_CHARS = 64 << 20
"""The longest CSV/TSV field read (64M characters): one field is one item, held whole."""


def iter_records(
    lines: Iterable[str], name: str, kind: str, *, field: str = "text", column: str | None = None
) -> Iterator[str]:
    """kind 'lines' | 'jsonl' | 'csv' | 'tsv' -> the text of each item, lazily."""
    if kind == "jsonl":
        for n, obj in iter_rows(lines, name, kind):
            if field not in obj:
                raise DataError(f"{name}: line {n} has no field {field!r} (choose it with --field)")
            yield str(obj[field])
    elif kind in ("csv", "tsv"):
        for _, row in iter_rows(lines, name, kind, column=column):
            yield row[column] or ""
    else:
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def read_prompts(text: str, name: str, field: str = "prompt") -> list[str]:
    """Prompts of a file or stdin: JSONL when the first non-blank line is an object, else lines."""
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise DataError(f"{name}: no prompts (the file is empty)")
    kind = "jsonl" if first.lstrip().startswith("{") else "lines"
    return list(iter_records(io.StringIO(text), name, kind, field=field))
