#!/usr/bin/env bash
# Encode the sentences of the bundled sample with the quick-start model, then search them.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
RUN=${RUN:-runs/quickstart}
[ -d "$RUN" ] || { echo "no model at $RUN: run 'bash scripts/quickstart.sh' first (or set RUN)"; exit 1; }
mkdir -p runs/encode-example
.venv/bin/python - <<'PY' > runs/encode-example/phrases.txt
import pathlib, re
text = " ".join(p.read_text() for p in sorted(pathlib.Path("llmkit/sample").glob("*.txt")))
print("\n".join(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 30))
PY
$LLMKIT encode "$RUN" runs/encode-example/phrases.txt -o runs/encode-example/phrases.npy --layer 2
$LLMKIT encode "$RUN" --query "Le fromage mûrit dans des caves." --index runs/encode-example/phrases.npy --top-k 5
$LLMKIT encode "$RUN" --query "Les oiseaux chantent au printemps." --index runs/encode-example/phrases.npy --top-k 5
