"""``llmkit split``: one file of examples cut into train, dev (and test) files.

The cut is a fixed shuffle (``seed``), so the same file always splits the same way. With ``by``
(a field or column: an article's title, a speaker, a source document), rows that share its value
land on the same side: questions about one article never sit in train and dev at once, which is
how a held-out score stays honest. Sizes are rows: a count (``200``) or a share (``10%``); with
``by`` a side gets whole groups until it holds at least that many rows.

Each output keeps the input's format: JSONL rows as JSON objects, CSV/TSV with the same header.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from llmkit.core.atomic import atomic_write
from llmkit.core.errors import ConfigError, DataError
from llmkit.core.text.examples import FORMATS, iter_rows


def parse_size(text: str, total: int, flag: str) -> int:
    """Rows for ``200`` (a count) or ``10%`` (a share of ``total``, rounded, at least 1 when > 0)."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            share = float(raw[:-1]) / 100
            if not 0 <= share < 1:
                raise ValueError
            return max(1, round(share * total)) if share > 0 else 0
        count = int(raw)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ConfigError(
            f"{flag}: expected a number of rows (200) or a share below 100% (10%), not {text!r}"
        ) from None


def split_file(
    path: Path, out: Path, *, dev: str, test: str = "0", by: str | None = None, seed: int = 0
) -> dict[str, tuple[Path, int]]:
    """Write ``out/STEM.{train,dev[,test]}.EXT``; {side: (path, rows)}. Existing outputs are refused."""
    path = Path(path)
    rows = [row for _, row in iter_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows to split")
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        if by is not None and by not in row:
            raise DataError(f"{path}: row {i + 1} has no field {by!r} (the --by field)")
        key = json.dumps(row[by], sort_keys=True, ensure_ascii=False) if by is not None else i
        groups.setdefault(key, []).append(i)
    want = {"dev": parse_size(dev, len(rows), "--dev"), "test": parse_size(test, len(rows), "--test")}
    if want["dev"] + want["test"] >= len(rows):
        raise ConfigError(
            f"--dev and --test take {want['dev'] + want['test']} of {len(rows)} rows: nothing left to train on"
        )
    order = sorted(groups, key=str)  # a stable order before the seeded shuffle: same file, same split
    random.Random(seed).shuffle(order)
    sides: dict[str, list[int]] = {"dev": [], "test": [], "train": []}
    for key in order:
        side = next((s for s in ("dev", "test") if len(sides[s]) < want[s]), "train")
        sides[side].extend(groups[key])
    if not sides["train"]:
        raise ConfigError(f"--by {by}: the groups are too large to leave rows for training; ask for fewer dev rows")
    suffix = path.suffix.lower()
    written = {}
    for side in ("train", "dev", "test"):
        if side == "test" and not want["test"]:
            continue
        target = out / f"{path.stem}.{side}{suffix}"
        if target.exists():
            raise ConfigError(f"{target} exists: choose another -o folder (nothing was written)")
        written[side] = (target, sorted(sides[side]))
    out.mkdir(parents=True, exist_ok=True)
    kind = FORMATS[suffix]
    for target, idx in written.values():
        atomic_write(target, _render([rows[i] for i in idx], kind, list(rows[0])))
    return {side: (target, len(idx)) for side, (target, idx) in written.items()}


def _render(rows: list[dict], kind: str, header: list[str]) -> str:
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
