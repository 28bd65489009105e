#!/usr/bin/env bash
# The corpus path: JSON lines compressed with gzip, a folder of text, two sources mixed by weight,
# an explicit validation set, duplicates dropped, and a resumed run that needs no corpus argument.
# Uses the bundled sample and the project's example files only (seconds on a laptop).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
OUT=${OUT:-runs/example-corpus}
rm -rf "$OUT" && mkdir -p "$OUT/data"

# A JSON-lines source (one document per line, text in the field "contenu"), gzip-compressed, with
# one record written twice: it is counted as a duplicate and dropped.
.venv/bin/python - "$OUT/data/paragraphes.jsonl.gz" <<'PY'
import gzip, json, sys
from pathlib import Path
lines = [l for p in sorted(Path("llmkit/sample").glob("*.txt")) for l in p.read_text().split("\n") if l.strip()]
rows = [{"id": i, "contenu": l} for i, l in enumerate(lines)] + [{"id": -1, "contenu": lines[0]}]
with gzip.open(sys.argv[1], "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
PY

# Two sources by weight (70% of the windows from the folder, 30% from the JSON lines); each
# evaluation prints the validation loss of each source beside the total.
$LLMKIT pretrain --mix llmkit/sample/=0.7 --mix "$OUT/data/paragraphes.jsonl.gz=0.3" --text-field contenu \
  --preset tiny --steps 60 --set train.eval_every=30 -o "$OUT/mix"

# The sources travel in the run's config: resuming needs no corpus argument.
$LLMKIT pretrain -o "$OUT/mix" --resume auto --steps 80

# An explicit validation set instead of each document's tail.
$LLMKIT pretrain llmkit/sample/ --val examples/data/traduction.jsonl --text-field src \
  --tokenizer "$OUT/mix/tokenizer" --preset tiny --steps 40 -o "$OUT/val"
