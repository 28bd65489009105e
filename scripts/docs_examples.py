"""Run the examples of the docs and check (or rewrite) the outputs shown beside them.

An example in a page (docs/*.md, README.md) is a marked pair of blocks, the commands and what they
print:

    <!-- example: NAME [cheap] [pictures=WORLD_DIR:DOCS_DIR] -->
    ```bash
    llmkit inspect runs/quickstart --text "…" --tokens -o runs/inspect
    ```
    <!-- output -->
    ```text
    tokens: 13 (3.85 characters each), …
    ```

Examples run in a scratch world, never in the checkout: a temporary folder holding links to the
repository's ``llmkit/`` and ``examples/`` (so the commands read the files the docs name) and its
own ``runs/``, where the docs' model is trained first: the quick start's (``tiny``, 200 steps on
the bundled sample), in fp32 on one thread so every machine trains the same weights.

    python scripts/docs_examples.py               # check every example (exit 1 on a difference)
    python scripts/docs_examples.py --cheap       # only those marked cheap (what tests/test_docs.py runs)
    python scripts/docs_examples.py --write       # rewrite the outputs (and copy the pictures) from real runs

Numbers are compared within 5% (``--exact`` for equality): a timing or the last digit of a loss
may move from one machine to the next, the words around them may not.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODEL = [
    "llmkit pretrain --preset tiny --steps 200 --out runs/quickstart --quiet",
    "--set train.dtype=fp32 --set train.compile=false --set train.threads=1 --set train.report=false",
]
EXAMPLE = re.compile(
    r"<!-- example: (?P<head>[^>]*?) -->\n```(?:bash|sh)\n(?P<commands>.*?)```\n"
    r"(?:<!-- output -->\n```text\n(?P<output>.*?)```\n)?",
    re.S,
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


@dataclass
class Example:
    page: Path
    name: str
    cheap: bool
    pictures: tuple[str, str] | None
    commands: str
    output: str | None
    span: tuple[int, int]
    """Where the output block's text sits in the page."""


def examples(pages=PAGES) -> list[Example]:
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in EXAMPLE.finditer(text):
            words = m.group("head").split()
            pictures = next((w.split("=", 1)[1].split(":") for w in words if w.startswith("pictures=")), None)
            span = m.span("output") if m.group("output") is not None else (-1, -1)
            found.append(
                Example(
                    page,
                    words[0],
                    "cheap" in words,
                    tuple(pictures) if pictures else None,
                    m.group("commands"),
                    m.group("output"),
                    span,
                )
            )
    return found


def make_world(where: Path | None = None) -> Path:
    """A scratch folder with the repository's inputs linked in and the docs' model trained."""
    world = Path(where or tempfile.mkdtemp(prefix="llmkit-docs-"))
    world.mkdir(parents=True, exist_ok=True)
    for name in ("llmkit", "examples"):
        if not (world / name).exists():
            (world / name).symlink_to(ROOT / name)
    if not (world / "runs" / "quickstart" / "best").is_dir():
        run(" ".join(MODEL), world)
    return world


def run(commands: str, world: Path) -> str:
    """The commands' output (stdout and stderr, in order), run by bash in the world."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "100",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=world,
        env=env,
        capture_output=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}:\n{commands}\n{r.stdout}")
    return "".join(line.rstrip() + "\n" for line in r.stdout.splitlines())  # no trailing spaces (rich pads)


def same(shown: str, got: str, *, exact: bool = False, tolerance: float = 0.05) -> bool:
    """Whether an output matches the one shown: the same words, numbers within ``tolerance``."""
    if exact:
        return shown.rstrip() == got.rstrip()
    if NUMBER.sub("N", shown).rstrip() != NUMBER.sub("N", got).rstrip():  # the words, and how many numbers
        return False
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(got)):
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        if abs(x - y) > tolerance * max(abs(x), abs(y), 1e-12):
            return False
    return True


def write(example: Example, got: str, world: Path) -> None:
    if example.output is not None:
        text = example.page.read_text(encoding="utf-8")
        current = examples([example.page])
        mine = next(e for e in current if e.name == example.name)
        text = text[: mine.span[0]] + got.rstrip("\n") + "\n" + text[mine.span[1] :]
        example.page.write_text(text, encoding="utf-8")
    if example.pictures:
        src, dest = world / example.pictures[0], ROOT / example.pictures[1]
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.glob("*")):
            shutil.copy2(f, dest / f.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cheap", action="store_true", help="only the examples marked cheap")
    ap.add_argument("--write", action="store_true", help="rewrite the outputs shown from real runs")
    ap.add_argument("--exact", action="store_true", help="numbers must be equal too")
    ap.add_argument("--world", type=Path, help="reuse this scratch folder (kept afterwards)")
    ap.add_argument("--only", help="comma-separated example names")
    args = ap.parse_args(argv)
    chosen = [
        e for e in examples() if (e.cheap or not args.cheap) and (not args.only or e.name in args.only.split(","))
    ]
    world = make_world(args.world)
    failed = 0
    try:
        for e in chosen:
            if e.pictures:  # only this run's pictures are copied into the docs
                shutil.rmtree(world / e.pictures[0], ignore_errors=True)
            got = run(e.commands, world)
            where = f"{e.page.relative_to(ROOT)}: {e.name}"
            if args.write:
                write(e, got, world)
                print(f"wrote {where}")
            elif e.output is not None and not same(e.output, got, exact=args.exact):
                failed += 1
                print(f"DIFFERS {where}\n--- shown\n{e.output}--- got\n{got}", file=sys.stderr)
            else:
                print(f"ok {where}")
    finally:
        if args.world is None:
            shutil.rmtree(world, ignore_errors=True)
    print(f"{len(chosen) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
