#!/usr/bin/env bash
# The small preset on 25 public-domain French novels, 10 minutes of training.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/corpus_fr
[ -d "$DATA" ] || { echo "skipped: $DATA not present (the shared data folder sits beside the repository)"; exit 0; }
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
OUT=${OUT:-runs/novels-fr}
rm -rf "$OUT"
$LLMKIT pretrain "$DATA" -o "$OUT" --preset small --time 10m \
  --set train.steps=0 --set train.eval_every=25 --set train.eval_batches=8 --set optim.warmup_steps=30
$LLMKIT generate "$OUT" --prompt "Emma regardait par la fenêtre" --max-new-tokens 80 --seed 0
