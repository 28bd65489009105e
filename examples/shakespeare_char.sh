#!/usr/bin/env bash
# nanoGPT's CPU Shakespeare configuration, character-level, 3 minutes (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/shakespeare/input.txt
[ -f "$DATA" ] || { echo "skipped: $DATA not present (the shared data folder sits beside the repository)"; exit 0; }
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
OUT=${OUT:-runs/shakespeare-char}
rm -rf "$OUT"
$LLMKIT pretrain "$DATA" -o "$OUT" --time 3m \
  --set tokenizer.model_type=char --set tokenizer.byte_fallback=false \
  --set model.context=64 --set model.d_model=128 --set model.n_layer=4 --set model.n_head=4 \
  --set model.n_kv_head=4 --set model.dropout=0.0 \
  --set optim.lr=1e-3 --set optim.beta2=0.99 --set optim.warmup_steps=100 \
  --set train.batch_size=12 --set train.eval_every=250 --set train.patience=0 --set train.steps=0
$LLMKIT generate "$OUT" --prompt "ROMEO:" --max-new-tokens 200 --seed 0
